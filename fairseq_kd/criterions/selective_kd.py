"""Selective KD (Wang, Yan, Meng, Zhou, *Selective Knowledge Distillation for
Neural Machine Translation*, ACL 2021; code LeslieOverfitting/selective_distillation).

Only the hardest tokens are distilled, difficulty being the student's own
gold NLL (detached)::

    loss = LS-NLL(gold) + alpha * sum_{selected} KL(p_t || p_s)

with ``alpha = --kd-alpha = 1`` by default, as in the reference code: the NLL
term has no ``(1 - alpha)``.  ``--selective-strategy batch_level`` selects the hardest
``--selective-ratio`` of this batch's tokens (per GPU); ``global_level`` takes
the threshold over a FIFO queue of the last ``--selective-queue-size`` token
difficulties, the current batch included (the README recommends 30k for
WMT'14 En-De).  The queue is training state that fairseq would not save (the
criterion has no parameters): the distillation tasks keep it in the
checkpoint's ``task_state`` (:meth:`SelectiveKDCriterion.kd_state_dict`) and
hand it back on resume, so a resumed run selects exactly the tokens an
uninterrupted one would.  Under data parallelism each rank has its own queue;
the checkpoint holds rank 0's, which every rank resumes from.

The label smoothing is fairseq's current formula by default, so the NLL term
matches every other criterion of this plugin; ``--legacy-label-smoothing``
selects the older ``eps/V`` formula of the reference code, which reproduces
its numbers exactly.
"""

from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from fairseq_kd import losses
from fairseq_kd.criterions.base import KDCriterion, KDCriterionConfig
from fairseq_kd.errors import DistillationError


@dataclass
class SelectiveKDConfig(KDCriterionConfig):
    kd_alpha: float = field(
        default=1.0,
        metadata={"help": "weight of the selected tokens' KL; the NLL term keeps weight 1 (the reference uses 1)"},
    )
    selective_strategy: ChoiceEnum(["batch_level", "global_level"]) = field(
        default="batch_level",
        metadata={"help": "threshold of the hardest tokens taken over this batch, or over a FIFO queue of past tokens"},
    )
    selective_ratio: float = field(
        default=0.5,
        metadata={"help": "fraction of tokens distilled: those whose gold NLL is in the top ratio, in (0, 1]"},
    )
    selective_queue_size: int = field(
        default=30000,
        metadata={"help": "token difficulties kept by the global_level queue"},
    )
    legacy_label_smoothing: bool = field(
        default=False,
        metadata={"help": "smooth with eps/V on (1 - eps) * NLL, the pre-0.10 formula the reference code uses"},
    )


@register_criterion("selective_kd", dataclass=SelectiveKDConfig)
class SelectiveKDCriterion(KDCriterion):
    training_state = True  # the global_level queue
    ratio_keys = KDCriterion.ratio_keys + (("kd_selected", "kd_tokens", "kd_selected_frac"),)

    def __init__(self, task, cfg: SelectiveKDConfig):
        super().__init__(task, cfg)
        if not 0.0 < cfg.selective_ratio <= 1.0:
            raise DistillationError(f"--selective-ratio must be in (0, 1], got {cfg.selective_ratio}")
        if cfg.selective_queue_size < 1:
            raise DistillationError(f"--selective-queue-size must be >= 1, got {cfg.selective_queue_size}")
        self.global_level = str(cfg.selective_strategy) == "global_level"
        self.history = None  # 1-D tensor of past token difficulties (global_level)

    def label_smoothed(self, lprobs, target):
        if self.cfg.legacy_label_smoothing:
            return losses.legacy_nll_from_log_probs(lprobs, target, self.padding_idx, self.eps)
        return losses.nll_from_log_probs(lprobs, target, self.padding_idx, self.eps)

    def kd_state_dict(self):
        """The global_level queue, saved in the checkpoint by the distillation tasks."""
        return {"selective_history": None if self.history is None else self.history.detach().cpu()}

    def load_kd_state_dict(self, state):
        history = state.get("selective_history")
        self.history = None if history is None else history[-self.cfg.selective_queue_size:].float()

    def push_history(self, difficulty, keep: bool = True):
        """The queue with ``difficulty`` appended (what the threshold is taken over); kept only with ``keep``."""
        new = difficulty.detach().float()
        history = new if self.history is None else torch.cat([self.history.to(new.device), new])
        history = history[-self.cfg.selective_queue_size:]
        if keep:
            self.history = history
        return history

    def teacher_cache_error(self, manifest):
        return None  # the selected tokens' KL is taken on the teacher's top-k + tail buckets

    def forward(self, model, sample, reduce=True, teacher=None, reference=True):
        """``reference=False`` (source-only rows): the selected tokens' KL alone, no NLL of the prefixes
        (they are no reference), and the queue is left as it is."""
        # the teacher first: its logits are freed before the student's exist
        distribution = self.teacher_distribution(sample, teacher)
        student_logits, target = self.student_forward(model, sample)
        lprobs = losses.log_probs(student_logits)  # one log-softmax for the NLL and the difficulty
        loss, nll_loss = self.label_smoothed(lprobs, target)
        logging_output = self.base_logging_output(sample, loss, nll_loss)
        if teacher is None:
            return loss, self.sample_size(sample), logging_output

        mask = losses.non_pad_mask(target, self.padding_idx)
        student_lprobs = lprobs if self.temperature == 1.0 else losses.log_probs(student_logits, self.temperature)
        difficulty = -lprobs.detach().gather(-1, target.unsqueeze(-1)).squeeze(-1)
        history = self.push_history(difficulty[mask], keep=reference) if self.global_level else None
        selected = losses.select_hard_tokens(difficulty, mask, self.cfg.selective_ratio, history)
        ids = self.agreement_ids(student_logits, distribution)  # before the KL reuses the teacher's storage
        # KL(p_t || p_s) on the selected positions only
        kd_loss = distribution.divergence(student_lprobs, selected, "kl", self.temperature, release=True,
                                          rows=selected.reshape(-1).nonzero().squeeze(1)).sum()
        loss = losses.kd_mix(loss if reference else None, kd_loss, self.mix_alpha(reference), self.kd_scale,
                             ls_weight=1.0)
        logging_output.update(loss=loss.data, kd_loss=kd_loss.data, kd_selected=selected.sum())
        self.add_agreement(logging_output, ids, target)
        return loss, self.sample_size(sample), logging_output
