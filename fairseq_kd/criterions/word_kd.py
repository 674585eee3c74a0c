"""Word-level knowledge distillation (Kim & Rush, EMNLP 2016; Hinton et al. 2015).

``loss = (1 - alpha) * LS-NLL(gold) + alpha * s * sum_m KL(p_t^tau || p_s^tau)``
with ``s = tau^2`` (``--kd-temperature-scale``, default) or 1.  The teacher is
evaluated on the same gold prefixes (teacher forcing).  This is the exact KL
(the value differs from the cross-entropy form by the teacher's entropy, the
gradient is the same), as in the NMT-KD reference implementation.

``--kd-divergence`` swaps the KL for the baselines users compare against:
the reverse KL (mode-seeking), DistiLLM's skew KL / skew reverse KL
(Ko et al., ICML 2024) with ``--skew-lambda``, and GKD's generalized
Jensen-Shannon divergence (Agarwal et al., ICLR 2024) with ``--jsd-beta``; see
:func:`fairseq_kd.losses.divergence_from_log_probs` and docs/on_policy_kd.md.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from fairseq_kd import losses
from fairseq_kd.criterions.base import KDCriterion, KDCriterionConfig
from fairseq_kd.errors import DistillationError
from fairseq_kd.losses.topk_ablation import TOPK_MODES, word_kd_ablation_loss


@dataclass
class WordKDConfig(KDCriterionConfig):
    kd_divergence: ChoiceEnum(losses.DIVERGENCES) = field(
        default="kl",
        metadata={
            "help": "kl: KL(teacher || student); rkl: KL(student || teacher); skl / srkl: "
            "DistiLLM's skew KL / skew reverse KL, the second argument mixed with the first; jsd: GKD's "
            "generalized Jensen-Shannon divergence (--jsd-beta)"
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "jsd: B of B*KL(teacher || M) + (1-B)*KL(student || M), M = B*teacher + (1-B)*student, "
                  "in (0, 1); about B * forward KL near 0, (1-B) * reverse KL near 1 (unscaled, as GKD)"},
    )
    skew_lambda: float = field(
        default=0.1,
        metadata={"help": "share of the first argument in the second one's mixture (skl, srkl), in [0, 1)"},
    )
    kd_topk_mode: ChoiceEnum(TOPK_MODES) = field(
        default="all",
        metadata={"help": "TIE-KD's ablations: all (Word-KD); no-top1: the teacher's top-1 probability moved "
                  "onto the gold token; top1-only: -max(p_t) log p_s(argmax p_t)"},
    )


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(KDCriterion):
    def __init__(self, task, cfg: WordKDConfig):
        super().__init__(task, cfg)
        if not 0.0 <= cfg.skew_lambda < 1.0:
            raise DistillationError(f"--skew-lambda must be in [0, 1), got {cfg.skew_lambda}")
        if not 0.0 < cfg.jsd_beta < 1.0:
            raise DistillationError(
                f"--jsd-beta must be in (0, 1), got {cfg.jsd_beta}; its end points are --kd-divergence kl (B -> 0) "
                f"and rkl (B -> 1)")

    @property
    def loss_function(self):
        """Word-KD, or its top-1 ablations (--kd-topk-mode; they need the full teacher distribution)."""
        return losses.word_kd_loss if str(self.cfg.kd_topk_mode) == "all" else word_kd_ablation_loss

    @property
    def ablation(self):
        mode = str(self.cfg.kd_topk_mode)
        return {"release_teacher": True} if mode == "all" else {"topk_mode": mode}

    def teacher_cache_error(self, manifest):
        if str(self.cfg.kd_topk_mode) != "all":
            return f"--kd-topk-mode {self.cfg.kd_topk_mode} needs the full teacher distribution: pass --teacher-path"
        return None  # every divergence is taken on the teacher's top-k + tail buckets

    @property
    def divergence_options(self) -> dict:
        """The divergence and its parameters, as the loss functions take them."""
        return dict(divergence=str(self.cfg.kd_divergence), skew_lambda=self.cfg.skew_lambda,
                    jsd_beta=self.cfg.jsd_beta)

    def forward(self, model, sample, reduce=True, teacher=None, reference=True):
        (loss, nll_loss, kd_loss), tensors = self.teacher_forced_kd(
            model, sample, teacher, self.loss_function, reference, **self.divergence_options, **self.ablation,
        )
        logging_output = self.kd_logging_output(sample, loss, nll_loss, kd_loss, *tensors)
        return loss, self.sample_size(sample), logging_output
