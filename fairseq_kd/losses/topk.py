"""The teacher's distribution from its top-k tokens plus one tail bucket (the offline cache's form).

Teacher and student are both seen on ``k + 1`` buckets: the teacher's top-k ids and the tail (every
other token), whose log-mass the cache stores (computed in float32 at build time); the student's tail is
a chunked log-sum-exp over its tail entries.  :class:`~fairseq_kd.losses.teacher.TopKTeacher` takes
every divergence between these two bucketed distributions; docs/teacher_cache.md says why a tail bucket
rather than renormalising.
"""

from typing import Tuple

import torch
from torch import Tensor

from fairseq_kd.losses.block_max import topk_ids
from fairseq_kd.losses.chunked import TAIL_FLOOR, bucket_log_probs


def teacher_buckets(topk_lprobs: Tensor, tail: Tensor) -> Tensor:
    """The cached teacher as a float32 (float64 stays) ``[B, T, k + 1]`` log-distribution: its top-k
    log-probabilities and its tail's log-mass ``[B, T]`` (computed in float32 when the cache was built)."""
    if topk_lprobs.dtype in (torch.float16, torch.bfloat16):
        topk_lprobs = topk_lprobs.float()
    tail = tail.to(topk_lprobs.dtype).clamp(min=TAIL_FLOOR).unsqueeze(-1)  # an empty tail stays finite
    return torch.cat([topk_lprobs, tail], dim=-1)


def topk_with_tail(lprobs: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(ids [..., k], values [..., k], tail [...])`` of log-probabilities ``[..., V]``: the ``k`` largest
    (by decreasing value, :func:`~fairseq_kd.losses.block_max.topk_ids`) and the log of the mass outside
    them (a log-sum-exp over the rest, :func:`~fairseq_kd.losses.chunked.bucket_log_probs`)."""
    with torch.no_grad():
        ids = topk_ids(lprobs, k)
        buckets = bucket_log_probs(lprobs, ids)
    return ids, buckets[..., :-1], buckets[..., -1]


def student_buckets(student_lprobs: Tensor, ids: Tensor) -> Tensor:
    """The student's ``[B, T, V]`` log-probabilities projected on the teacher's
    buckets: ``[B, T, k + 1]`` (its log-probabilities at ``ids``, then the log
    of its mass elsewhere, :func:`~fairseq_kd.losses.chunked.bucket_log_probs`); gradients flow into
    ``student_lprobs``."""
    return bucket_log_probs(student_lprobs, ids)


def bucket_target(target: Tensor, ids: Tensor) -> Tensor:
    """``[B, T]`` bucket of the gold token: its position among ``ids`` (the
    first if repeated), or ``k`` (the tail) when it is not a top-k token."""
    hit = ids.eq(target.unsqueeze(-1))
    k = ids.size(-1)
    positions = torch.arange(k, device=ids.device).expand_as(ids)
    return torch.where(hit, positions, torch.full_like(positions, k)).min(dim=-1).values
