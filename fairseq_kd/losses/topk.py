"""The teacher's distribution from its top-k tokens plus one tail bucket (the offline cache's form).

Teacher and student are both seen on ``k + 1`` buckets: the teacher's top-k ids and the tail (every
other token), whose log-mass the cache stores (computed in float32 at build time); the student's tail is
a chunked log-sum-exp over its tail entries.  Every divergence is taken between these two bucketed
distributions; docs/teacher_cache.md says why a tail bucket rather than renormalising.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_kd.losses.block_max import topk_ids
from fairseq_kd.losses.chunked import TAIL_FLOOR, bucket_log_probs
from fairseq_kd.losses.common import log_probs, nll_from_log_probs, non_pad_mask
from fairseq_kd.losses.divergences import divergence_from_log_probs, kl_from_log_probs
from fairseq_kd.losses.ranking import floored_kl_from_probs
from fairseq_kd.losses.self_evolution import (
    SEKDTerms,
    gold_teacher_log_mixture,
    sekd_divergence,
    sekd_hard_mask,
    sekd_ratios,
)

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


def topk_divergence(
    student_lprobs: Tensor, ids: Tensor, topk_lprobs: Tensor, tail: Tensor, mask: Tensor,
    divergence: str = "kl", skew_lambda: float = 0.1, jsd_beta: float = 0.5,
) -> Tensor:
    """Per-position ``[B, T]`` divergence (:data:`~fairseq_kd.losses.DIVERGENCES`)
    between the bucketed teacher and the bucketed student (zero where ``mask``
    is False).  ``student_lprobs`` are already softened by the cache's
    temperature; the cached values were computed at it."""
    return divergence_from_log_probs(
        student_buckets(student_lprobs, ids), teacher_buckets(topk_lprobs, tail), mask, divergence, skew_lambda,
        jsd_beta=jsd_beta,
    )


def word_kd_topk_loss(
    student_logits: Tensor,
    ids: Tensor,
    topk_lprobs: Tensor,
    tail: Tensor,
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    divergence: str = "kl",
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
):
    """:func:`~fairseq_kd.losses.word_kd_loss` with the teacher given by its
    top-k: ``(1 - alpha) * LS-NLL + alpha * s * D(buckets_t, buckets_s^tau)``.
    Returns ``(loss, nll_loss, kd_loss)`` sums (``kd_loss`` unscaled)."""
    student_lprobs = log_probs(student_logits)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, target, padding_idx, epsilon)
    soft = student_lprobs if temperature == 1.0 else log_probs(student_logits, temperature)
    mask = non_pad_mask(target, padding_idx)
    kd_loss = topk_divergence(soft, ids, topk_lprobs, tail, mask, divergence, skew_lambda, jsd_beta).sum()
    scale = temperature**2 if temperature_scale else 1.0
    return (1.0 - alpha) * ls_loss + alpha * scale * kd_loss, nll_loss, kd_loss


def self_evolution_kd_topk(
    student_lprobs: Tensor,
    ids: Tensor,
    topk_lprobs: Tensor,
    tail: Tensor,
    target: Tensor,
    mask: Tensor,
    gt_weight: float = 0.5,
    hard_criterion: str = "ratio",
    threshold: float = 1.0,
    hard_ratio: float = 0.5,
    lam: float = 0.5,
    lambda_mode: str = "const",
    lambda_max: float = 0.9,
    divergence: str = "fkl",
    prior_side: str = "student",
) -> SEKDTerms:
    """:func:`~fairseq_kd.losses.self_evolution_kd` on the buckets: the gold
    one-hot, the prior ``r``, the proxy and the difficulty are all formed on
    the ``k + 1`` buckets (the gold token's bucket is :func:`bucket_target`).
    ``student_lprobs`` are the student's tempered ``[B, T, V]`` log-probabilities."""
    student = student_buckets(student_lprobs, ids)
    teacher = teacher_buckets(topk_lprobs, tail).detach()
    gold = bucket_target(target, ids)
    with torch.no_grad():
        prior = gold_teacher_log_mixture(teacher, gold, gt_weight)
        difficulty = kl_from_log_probs(student.detach(), prior, mask).clamp_min(0.0)
        hard = sekd_hard_mask(difficulty, mask, hard_criterion, threshold, hard_ratio)
        ratio = sekd_ratios(difficulty, hard, lam, lambda_mode, lambda_max)
    kd = sekd_divergence(student, teacher, gold, ratio, mask, gt_weight, divergence, prior_side)
    return SEKDTerms(kd.sum(), hard.sum(), difficulty.sum(), ratio.sum())


def self_evolution_kd_topk_loss(
    student_logits: Tensor,
    ids: Tensor,
    topk_lprobs: Tensor,
    tail: Tensor,
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    nll_weight: float = 0.0,
    **sekd_options,
):
    """:func:`~fairseq_kd.losses.self_evolution_kd_loss` with the teacher given
    by its top-k (:func:`self_evolution_kd_topk`).  Returns ``(loss, nll_loss, terms)``."""
    student_lprobs = log_probs(student_logits)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, target, padding_idx, epsilon)
    soft = student_lprobs if temperature == 1.0 else log_probs(student_logits, temperature)
    mask = non_pad_mask(target, padding_idx)
    terms = self_evolution_kd_topk(soft, ids, topk_lprobs, tail, target, mask, **sekd_options)
    scale = temperature**2 if temperature_scale else 1.0
    loss = (1.0 - alpha) * ls_loss + alpha * scale * terms.kd_loss
    if nll_weight != 0.0:
        loss = loss + nll_weight * nll_loss
    return loss, nll_loss, terms


def hierarchical_ranking_topk(student_probs: Tensor, ids: Tensor, topk_probs: Tensor, topk: int) -> Tensor:
    """TIE-KD's ranking loss (:func:`~fairseq_kd.losses.hierarchical_ranking_from_probs`)
    from the teacher's cached top ``k >= topk`` tokens (``ids`` sorted by
    decreasing probability, ``topk_probs`` their probabilities).

    The loss needs the teacher's top ``topk`` tokens (the first ``topk`` ids)
    and ``p_t`` at the student's own top ``topk`` tokens, only to test
    ``p_t(t_i) > p_t(s_j)``: a student token outside the cached ids has
    ``p_t(s_j) <= p_t(id_k) <= p_t(t_i)`` and is given probability 0, which
    decides every such test as the full teacher does (ties at the k-th value
    aside).  Per position ``[B, T]``, no pad masking."""
    if not 1 <= topk <= ids.size(-1):
        raise ValueError(f"topk must be in [1, {ids.size(-1)}] (the cached k), got {topk}")
    teacher_ids, teacher_top = ids[..., :topk], topk_probs[..., :topk]  # t_i, p_t(t_i)
    student_top, student_ids = student_probs.topk(topk, dim=-1)  # p_s(s_j), s_j
    student_at_teacher = student_probs.gather(-1, teacher_ids)  # p_s(t_i)
    match = student_ids.unsqueeze(-1).eq(ids.unsqueeze(-2))  # [B, T, topk (s_j), k]
    teacher_at_student = (match * topk_probs.unsqueeze(-2)).sum(dim=-1)  # p_t(s_j), 0 outside the ids

    top1_level = torch.relu(student_at_teacher - student_at_teacher[..., :1]).sum(dim=-1)
    student_violation = torch.relu(student_top.unsqueeze(-2) - student_at_teacher.unsqueeze(-1))
    teacher_prefers = teacher_top.unsqueeze(-1) > teacher_at_student.unsqueeze(-2)
    return top1_level + (student_violation * teacher_prefers).sum(dim=(-2, -1))


def tie_kd_topk_terms(
    student_logits: Tensor,
    ids: Tensor,
    topk_lprobs: Tensor,
    tail: Tensor,
    target: Tensor,
    padding_idx: int,
    topk: int = 5,
    ranking: bool = True,
    log_epsilon: float = 1e-6,
) -> Tuple[Tensor, Optional[Tensor]]:
    """TIE-KD's gold-prefix pass (:func:`~fairseq_kd.losses.tie_kd_terms`) from
    the cache: ``(kl_sum, rank_sum)``.  The KL is taken on the buckets (with the
    reference's ``log(p + eps)`` floor on the bucket probabilities unless
    ``log_epsilon == 0``); the ranking loss is exact (:func:`hierarchical_ranking_topk`)."""
    mask = non_pad_mask(target, padding_idx)
    student_lprobs = log_probs(student_logits)
    student, teacher = student_buckets(student_lprobs, ids), teacher_buckets(topk_lprobs, tail)
    if log_epsilon == 0.0:
        kl = kl_from_log_probs(student, teacher, mask)
    else:
        kl = floored_kl_from_probs(student.exp(), teacher.exp(), mask, log_epsilon)
    if not ranking:
        return kl.sum(), None
    rank = hierarchical_ranking_topk(student_lprobs.exp(), ids, teacher[..., :-1].exp(), topk)
    return kl.sum(), rank.masked_fill(~mask, 0.0).sum()
