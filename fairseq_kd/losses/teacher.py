"""The teacher's distribution on a batch, in the one form every KD objective of :mod:`fairseq_kd.losses` reads.

:class:`DenseTeacher` holds the live teacher's (or an ensemble's) ``[B, T, V]`` log-probabilities,
:class:`TopKTeacher` the offline cache's top-k plus tail bucket.  Both answer the same questions: the
argmax and top-k ids, the probabilities at given ids, and the divergences, each taken between the
student and the teacher on their common support (the vocabulary, or the ``k + 1`` buckets).  See
docs/architecture.md.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_kd.losses.block_max import argmax_ids, topk_ids
from fairseq_kd.losses.chunked import check_not_released
from fairseq_kd.losses.common import teacher_log_probs
from fairseq_kd.losses.divergences import divergence_from_log_probs
from fairseq_kd.losses.topk import bucket_target, student_buckets, teacher_buckets


class TeacherDistribution:
    """The teacher's distribution at the target positions of one batch (``[B, T]`` positions)."""

    #: whether the divergences may build the student's gradient in the teacher's storage when asked
    releasable = False

    def argmax(self) -> Tensor:
        """``[B, T]``: the teacher's most probable token."""
        raise NotImplementedError

    def top(self, k: int) -> Tuple[Tensor, Tensor]:
        """``(ids, log-probabilities)`` ``[B, T, k]`` of the teacher's ``k`` most probable tokens, by decreasing
        probability."""
        raise NotImplementedError

    def probs_at(self, ids: Tensor) -> Tensor:
        """``[B, T, n]``: the teacher's probabilities of the tokens ``ids`` ``[B, T, n]`` (0 where unknown)."""
        raise NotImplementedError

    def align(self, student_lprobs: Tensor, temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        """``(student, teacher)`` log-distributions on one support, from the student's ``[B, T, V]``
        (tempered) log-probabilities; gradients flow into ``student_lprobs``."""
        raise NotImplementedError

    def gold(self, target: Tensor) -> Tensor:
        """``[B, T]``: the index of each gold token in the support of :meth:`align`."""
        raise NotImplementedError

    def full_log_probs(self, temperature: float = 1.0) -> Tensor:
        """``[B, T, V]``: the teacher's (tempered) log-probabilities over the whole vocabulary."""
        raise NotImplementedError

    def divergence(
        self, student_lprobs: Tensor, mask: Tensor, divergence: str = "kl", temperature: float = 1.0,
        skew_lambda: float = 0.1, jsd_beta: float = 0.5, release: bool = False, rows: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-position divergence ``[B, T]`` (zero where ``mask`` is False) between this teacher and the
        student's (tempered) log-probabilities, on their common support
        (:func:`~fairseq_kd.losses.divergences.divergence_from_log_probs`; ``release`` where
        :attr:`releasable`, ``rows`` a restriction of the work to those flattened positions inside ``mask``)."""
        student, teacher = self.align(student_lprobs, temperature)
        return divergence_from_log_probs(student, teacher, mask, divergence, skew_lambda, release and self.releasable,
                                         jsd_beta, rows=rows)


class DenseTeacher(TeacherDistribution):
    """``[B, T, V]`` teacher log-probabilities (``normalized``, as the live teacher returns them) or logits.

    With ``release`` a divergence builds the student's gradient in their storage, after which they can no
    longer be read (:class:`~fairseq_kd.losses.chunked.ReleasedTensorError`): take :meth:`argmax` and
    :meth:`top` before."""

    releasable = True

    def __init__(self, lprobs: Tensor, normalized: bool = True):
        self.lprobs, self.normalized = lprobs, normalized

    @classmethod
    def from_logits(cls, logits: Tensor) -> "DenseTeacher":
        """A teacher given by scores before the softmax (or any log-distribution)."""
        return cls(logits, normalized=False)

    def full_log_probs(self, temperature: float = 1.0) -> Tensor:
        check_not_released(self.lprobs)
        return teacher_log_probs(self.lprobs, temperature, self.normalized)

    def argmax(self) -> Tensor:
        check_not_released(self.lprobs)
        return argmax_ids(self.lprobs)

    def top(self, k: int) -> Tuple[Tensor, Tensor]:
        vocab = self.lprobs.size(-1)
        if not 1 <= k <= vocab:
            raise ValueError(f"topk must be in [1, {vocab}] (the vocabulary size), got {k}")
        lprobs = self.full_log_probs()
        ids = topk_ids(lprobs, k)
        return ids, lprobs.gather(-1, ids)

    def probs_at(self, ids: Tensor) -> Tensor:
        return self.full_log_probs().gather(-1, ids).exp()

    def align(self, student_lprobs: Tensor, temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        return student_lprobs, self.full_log_probs(temperature)

    def gold(self, target: Tensor) -> Tensor:
        return target


class TopKTeacher(TeacherDistribution):
    """The cached teacher: its top-k ``ids`` ``[B, T, k]`` (by decreasing probability), their float16
    log-probabilities ``lprobs`` and the log of its mass outside them ``tail`` ``[B, T]`` (float32), all
    computed at the cache's temperature (which the task checks is the criterion's: ``temperature`` is
    not applied again).  Teacher and student are compared on the ``k + 1`` buckets
    (:mod:`fairseq_kd.losses.topk`)."""

    def __init__(self, ids: Tensor, lprobs: Tensor, tail: Tensor):
        self.ids, self.lprobs, self.tail = ids, lprobs, tail

    def buckets(self) -> Tensor:
        """``[B, T, k + 1]``: the teacher's log-distribution on the buckets (float32)."""
        return teacher_buckets(self.lprobs, self.tail)

    def full_log_probs(self, temperature: float = 1.0) -> Tensor:
        raise ValueError("the cached teacher holds its top-k only, not the full distribution: use the live teacher")

    def argmax(self) -> Tensor:
        return self.ids[..., 0]

    def top(self, k: int) -> Tuple[Tensor, Tensor]:
        if not 1 <= k <= self.ids.size(-1):
            raise ValueError(f"topk must be in [1, {self.ids.size(-1)}] (the cached k), got {k}")
        return self.ids[..., :k], self.buckets()[..., :k]

    def probs_at(self, ids: Tensor) -> Tensor:
        """A token outside the cached ids gets probability 0: at most the k-th cached one's, which decides
        every "does the teacher prefer a cached token" test as the full teacher does (ties aside)."""
        match = ids.unsqueeze(-1).eq(self.ids.unsqueeze(-2))  # [B, T, n, k]
        return (match * self.buckets()[..., :-1].exp().unsqueeze(-2)).sum(dim=-1)

    def align(self, student_lprobs: Tensor, temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        return student_buckets(student_lprobs, self.ids), self.buckets()

    def gold(self, target: Tensor) -> Tensor:
        return bucket_target(target, self.ids)
