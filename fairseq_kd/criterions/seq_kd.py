"""Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016).

The student is trained on the teacher's beam-search translations of the
training sources (``teacher_target``, loaded by the distillation task with
``--teacher-target-subset``)::

    loss = LS-NLL(teacher_target)                                  (Seq-KD)
         + w * LS-NLL(gold)                    (--seq-kd-gold-weight w > 0)

With ``--kd-alpha a > 0`` the teacher-target term becomes Word-KD on the
teacher's prefixes, ``(1 - a) * LS-NLL + a * s * KL(p_t^tau || p_s^tau)``, the
"Word-KD + Seq-KD" combination; only then is a live teacher needed
(``--teacher-path``).  The sums are over teacher-target tokens, and
``sample_size`` is the number of teacher-target tokens (or sentences with
``--sentence-avg``).  Validation batches have no teacher target: the loss is
the plain LS-NLL of the gold target, comparable across criterions.

Logged: ``nll_loss`` (teacher target in training, gold in validation),
``gold_nll_loss`` (with ``w > 0``), ``kd_loss`` and ``kd_top1_agree`` (with
``a > 0``).
"""

import math
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.logging import metrics

from fairseq_kd import losses
from fairseq_kd.criterions.base import KDCriterion, KDCriterionConfig
from fairseq_kd.errors import DistillationError


@dataclass
class SeqKDConfig(KDCriterionConfig):
    kd_alpha: float = field(
        default=0.0,
        metadata={
            "help": "weight of word-level KD on the teacher-target prefixes (Word-KD + Seq-KD, "
            "needs --teacher-path); 0 trains on the teacher targets alone without a live teacher"
        },
    )
    seq_kd_gold_weight: float = field(
        default=0.0,
        metadata={"help": "add this weight times the label-smoothed NLL of the gold target; 0 is pure Seq-KD"},
    )


@register_criterion("seq_kd", dataclass=SeqKDConfig)
class SeqKDCriterion(KDCriterion):
    #: the distillation task refuses to build this criterion without --teacher-target-subset
    needs_teacher_target = True

    def __init__(self, task, cfg: SeqKDConfig):
        super().__init__(task, cfg)
        if cfg.seq_kd_gold_weight < 0:
            raise DistillationError(f"--seq-kd-gold-weight must be >= 0, got {cfg.seq_kd_gold_weight}")
        self.gold_weight = cfg.seq_kd_gold_weight
        # a live teacher only for the word-level term
        self.needs_teacher = cfg.kd_alpha > 0

    def forward(self, model, sample, reduce=True, teacher=None):
        if "teacher_target" not in sample:
            if model.training:
                raise DistillationError(
                    "seq_kd: the training batch has no teacher_target; use --task "
                    "distillation_translation --teacher-target-subset NAME"
                )
            return self.gold_forward(model, sample)
        if self.needs_teacher and teacher is None and model.training:
            raise DistillationError(
                f"seq_kd with --kd-alpha {self.alpha} needs a live teacher: use --task "
                f"distillation_translation --teacher-path CHECKPOINT"
            )
        net_input = dict(sample["net_input"], prev_output_tokens=sample["teacher_prev_output_tokens"])
        student_logits = model(**net_input)[0]
        teacher_target = sample["teacher_target"]
        distribution = teacher.distribution(net_input) if teacher is not None and self.alpha > 0 else None
        # before the KL reuses the teacher's storage
        ids = None if distribution is None else self.agreement_ids(student_logits, distribution)
        loss, nll_loss, kd_loss = losses.word_kd_loss(
            student_logits,
            distribution,
            teacher_target,
            self.padding_idx,
            release_teacher=True,
            **self.kd_loss_options(),
        )
        ntokens = sample["teacher_ntokens"]
        sample_size = teacher_target.size(0) if self.sentence_avg else ntokens
        logging_output = {
            "ntokens": ntokens,
            "nsentences": teacher_target.size(0),
            "sample_size": sample_size,
        }
        if kd_loss is not None:
            logging_output["kd_loss"] = kd_loss.data
            self.add_agreement(logging_output, ids, teacher_target)
        if self.gold_weight > 0:
            gold_loss, gold_nll = losses.label_smoothed_nll(
                model(**sample["net_input"])[0], sample["target"], self.padding_idx, self.eps
            )
            loss = loss + self.gold_weight * gold_loss
            logging_output["gold_nll_loss"] = gold_nll.data
            logging_output["gold_ntokens"] = sample["ntokens"]
        logging_output["loss"] = loss.data
        logging_output["nll_loss"] = nll_loss.data
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        gold_ntokens = sum(log.get("gold_ntokens", 0) for log in logging_outputs)
        if gold_ntokens > 0:
            gold_nll = sum(log.get("gold_nll_loss", 0) for log in logging_outputs)
            metrics.log_scalar("gold_nll_loss", gold_nll / gold_ntokens / math.log(2), gold_ntokens, round=3)
