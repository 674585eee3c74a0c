"""Shared plumbing of the KD criterions: config fields, metrics, teacher calls.

Every KD criterion receives the teacher as an argument of ``forward``
(``teacher=...``, passed by the distillation task in ``train_step`` only) and
never stores it, so the teacher is not saved, wrapped or cast with the
student.  During validation ``teacher`` is ``None`` and every criterion
reports the plain label-smoothed NLL of the gold target, so validation losses
compare directly with a student trained without KD.

With ``--teacher-cache`` the task passes the batch's
:class:`~fairseq_kd.teacher.cached.CachedTeacher` instead: either way
:meth:`KDCriterion.teacher_distribution` is the teacher's
:class:`~fairseq_kd.losses.teacher.TeacherDistribution` on the gold prefixes, which every loss of
:mod:`fairseq_kd.losses` reads.  A criterion that accepts the cache overrides
:meth:`KDCriterion.teacher_cache_error`.

What a criterion needs from the distillation tasks is declared in one place, :class:`Requirements`
(:meth:`KDCriterion.requirements`, read by the tasks through :func:`requirements`); docs/architecture.md.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from torch import nn
from fairseq.logging import metrics
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from fairseq_kd import losses
from fairseq_kd.losses import block_max, common
from fairseq_kd.errors import DistillationError


@dataclass(frozen=True)
class Requirements:
    """What a criterion needs from the distillation tasks: declared by the criterion
    (:meth:`KDCriterion.requirements`), read by the tasks only (:func:`requirements`)."""

    #: distils from a teacher: the task loads the live one, or reads ``--teacher-cache`` where
    #: :meth:`KDCriterion.teacher_cache_error` allows it, and hands it over as ``teacher=``
    teacher: bool = False
    #: trains on the teacher's translations (``--teacher-target-subset``)
    teacher_target: bool = False
    #: calls the student's encoder and decoder outside the wrapper's forward (refused under torch's DDP and
    #: fully_sharded, whose gradient sync runs through that forward only)
    calls_model_parts: bool = False
    #: generates with the student's parts outside the wrapper's forward, without gradient (refused under
    #: fully_sharded, whose parameters are sharded there)
    generates: bool = False
    #: takes ``backward=`` (``optimizer.backward``), calls it on each decoder pass's share of the loss and
    #: returns the total detached (:class:`fairseq_kd.losses.PassBackward`): the task runs no backward
    backward_per_pass: bool = False
    #: has training state beyond parameters (``kd_state_dict`` / ``load_kd_state_dict``), saved in the
    #: checkpoint's ``task_state``
    training_state: bool = False
    #: the temperature a teacher cache must have been built at
    temperature: float = 1.0
    #: why the criterion cannot distil source-only rows (``iterative_distillation``); None: it can, through
    #: ``forward(..., reference=False)``, which returns its distillation term alone
    source_only_error: Optional[str] = (
        "has no distillation term for source-only examples (--unlabeled-subset): use a KD criterion with a "
        "live teacher, e.g. word_kd or tie_kd")


def requirements(criterion) -> Requirements:
    """What ``criterion`` needs from the task: a KD criterion's declaration, nothing for any other fairseq
    criterion (which the distillation tasks train as fairseq's own tasks do).  Under data parallelism
    fairseq's trainer hands the task a criterion with parameters inside its wrapper (``.module``)."""
    while not isinstance(criterion, KDCriterion) and isinstance(getattr(criterion, "module", None), nn.Module):
        criterion = criterion.module
    return criterion.requirements() if isinstance(criterion, KDCriterion) else Requirements()


@dataclass
class KDCriterionConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.1,
        metadata={"help": "epsilon of the label-smoothed NLL term (fairseq >= 0.10 formula)"},
    )
    kd_alpha: float = field(
        default=0.5,
        metadata={"help": "weight of the distillation term; the NLL term gets 1 - kd_alpha"},
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature of both teacher and student in the KD term"},
    )
    kd_temperature_scale: bool = field(
        default=True,
        metadata={"help": "multiply the KD term by temperature^2 (Hinton et al.); a no-op at temperature 1"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")


class KDCriterion(FairseqCriterion):
    """Base class: ``forward(model, sample, reduce=True, teacher=None, reference=True)``; the class and
    instance flags below feed :meth:`requirements`."""

    needs_teacher = True
    needs_teacher_target = False
    calls_model_parts = False
    generates = False
    backward_per_pass = False
    training_state = False

    def __init__(self, task, cfg: KDCriterionConfig):
        super().__init__(task)
        if not 0.0 <= cfg.kd_alpha <= 1.0:
            raise DistillationError(f"--kd-alpha must be in [0, 1], got {cfg.kd_alpha}")
        if not (math.isfinite(cfg.kd_temperature) and cfg.kd_temperature > 0):
            raise DistillationError(f"--kd-temperature must be a finite number > 0, got {cfg.kd_temperature}")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise DistillationError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
        self.cfg = cfg
        self.sentence_avg = cfg.sentence_avg
        self.eps = cfg.label_smoothing
        self.alpha = cfg.kd_alpha
        self.temperature = cfg.kd_temperature

    def requirements(self) -> Requirements:
        """This criterion's :class:`Requirements`."""
        if not self.needs_teacher:
            source_only = Requirements.source_only_error
        elif self.needs_teacher_target:
            source_only = ("trains on teacher targets of the bitext, which source-only examples do not have: use "
                           "word_kd (or tie_kd) with --prefix-source offline for the teacher's labels of the "
                           "source-only split")
        else:
            source_only = None
        return Requirements(
            teacher=self.needs_teacher, teacher_target=self.needs_teacher_target,
            calls_model_parts=self.calls_model_parts, generates=self.generates,
            backward_per_pass=self.backward_per_pass, training_state=self.training_state,
            temperature=self.temperature, source_only_error=source_only)

    def kd_state_dict(self) -> dict:
        """Training state beyond parameters (with ``training_state``), saved in the checkpoint's ``task_state``."""
        return {}

    def load_kd_state_dict(self, state: dict) -> None:
        """Restore :meth:`kd_state_dict` on resume."""

    def mix_alpha(self, reference: bool = True) -> float:
        """The KD term's weight: ``--kd-alpha`` on rows with a reference target; 1 on rows without one
        (``reference=False``: source-only rows), whose loss is then the distillation term alone."""
        return self.alpha if reference else 1.0

    @property
    def kd_scale(self) -> float:
        """The KD term's factor ``tau^2`` or 1 (:func:`fairseq_kd.losses.kd_scale`)."""
        return losses.kd_scale(self.temperature, self.cfg.kd_temperature_scale)

    def sample_size(self, sample) -> int:
        return sample["target"].size(0) if self.sentence_avg else sample["ntokens"]

    def kd_loss_options(self, reference: bool = True) -> dict:
        """Keyword arguments of ``losses.word_kd_loss`` (and the other objectives) set by the shared flags."""
        return dict(epsilon=self.eps, alpha=self.mix_alpha(reference), temperature=self.temperature,
                    temperature_scale=self.cfg.kd_temperature_scale)

    def student_forward(self, model, sample):
        """``(student_logits, target)`` of the student on the gold prefixes."""
        net_output = model(**sample["net_input"])
        return net_output[0], model.get_targets(sample, net_output)

    def teacher_forced_kd(self, model, sample, teacher, loss_fn, reference: bool = True, **options):
        """``loss_fn(student_logits, teacher_distribution, target, pad, **kd_loss_options(reference), **options)``
        on the gold prefixes (None for the distribution without a teacher), and ``(ids, target)`` with ``ids``
        the :meth:`agreement_ids` (None without a teacher)."""
        # the teacher first: its logits are freed before the student's exist
        distribution = self.teacher_distribution(sample, teacher)
        student_logits, target = self.student_forward(model, sample)
        ids = None if distribution is None else self.agreement_ids(student_logits, distribution)
        result = loss_fn(student_logits, distribution, target, self.padding_idx, **self.kd_loss_options(reference),
                         **options)
        return result, (ids, target)

    @staticmethod
    def teacher_distribution(sample, teacher):
        """The teacher's :class:`~fairseq_kd.losses.teacher.TeacherDistribution` on ``sample``'s gold
        prefixes (None without a teacher): the live teacher's log-probabilities or the batch's cached top-k."""
        return None if teacher is None else teacher.distribution(sample["net_input"])

    def teacher_cache_error(self, manifest) -> Optional[str]:
        """Why this criterion cannot train from the teacher cache of ``manifest`` (None: it can)."""
        return f"criterion {self.__class__.__name__} needs the live teacher; pass --teacher-path instead"

    def gold_forward(self, model, sample):
        """Validation: the label-smoothed NLL of the gold target."""
        student_logits, target = self.student_forward(model, sample)
        loss, nll_loss = losses.label_smoothed_nll(student_logits, target, self.padding_idx, self.eps)
        return loss, self.sample_size(sample), self.base_logging_output(sample, loss, nll_loss)

    def base_logging_output(self, sample, loss, nll_loss):
        return {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": self.sample_size(sample),
        }

    @staticmethod
    def agreement_ids(student_logits, teacher):
        """``(student argmax, teacher argmax)`` ``[B, T]`` for the top-1 agreement, the student's by block
        maxima (:func:`~fairseq_kd.losses.block_max.argmax_ids`), the teacher's from its distribution
        ``teacher``.  Taken before the loss: a live teacher's storage is reused by the KL (``release_teacher``)."""
        return block_max.argmax_ids(student_logits.detach()), teacher.argmax()

    def add_agreement(self, logging_output, ids, target, key="kd"):
        """Top-1 agreement of the ``(student, teacher)`` argmaxes ``ids`` (:meth:`agreement_ids`), logged as
        ``{key}_agree`` over ``{key}_tokens``.  Both are tensors (summed and read by ``reduce_metrics``
        as fairseq's own criterions do), so logging forces no device sync."""
        student_ids, teacher_ids = ids
        logging_output[f"{key}_agree"] = common.agreement_from_ids(student_ids, teacher_ids, target, self.padding_idx)
        logging_output[f"{key}_tokens"] = target.ne(self.padding_idx).sum()

    def kd_logging_output(self, sample, loss, nll_loss, kd_loss, ids, target):
        """:meth:`base_logging_output` plus, with a teacher (``kd_loss`` not None), ``kd_loss`` and the
        agreement of the argmaxes ``ids``."""
        logging_output = self.base_logging_output(sample, loss, nll_loss)
        if kd_loss is not None:
            logging_output["kd_loss"] = kd_loss.data
            self.add_agreement(logging_output, ids, target)
        return logging_output

    # -- metrics ---------------------------------------------------------------

    #: extra summed keys logged per token in nats (name -> logged name)
    per_token_keys = ("kd_loss",)
    #: (count key, total key, logged name) ratios
    ratio_keys = (("kd_agree", "kd_tokens", "kd_top1_agree"),)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        loss_sum, nll_sum = total("loss"), total("nll_loss")
        ntokens, sample_size = total("ntokens"), total("sample_size")
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        cls.reduce_kd_metrics(logging_outputs, ntokens)

    @classmethod
    def reduce_kd_metrics(cls, logging_outputs, ntokens) -> None:
        """The :attr:`per_token_keys` (per one of ``ntokens`` tokens) and the :attr:`ratio_keys`."""
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        for key in cls.per_token_keys:
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(key, total(key) / ntokens, ntokens, round=4)
        for count_key, total_key, name in cls.ratio_keys:
            denominator = total(total_key)
            if denominator > 0:
                metrics.log_scalar(name, total(count_key) / denominator, denominator, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
