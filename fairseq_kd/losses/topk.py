"""The teacher's distribution from its top-k tokens plus one tail bucket.

An offline teacher cache stores, per target position, the teacher's ``k``
most probable token ids (``ids`` ``[B, T, k]``, sorted by decreasing
probability) and their log-probabilities (``topk_lprobs`` ``[B, T, k]``,
normalised over the whole vocabulary, fp16 on disk).  The teacher is then
known exactly on the partition of the vocabulary into ``k + 1`` buckets: each
of its top-k tokens, and the tail (every other token), whose mass is
``1 - sum_j p_t(id_j)``.  The student's distribution is projected on the same
partition (:func:`student_buckets`: its log-probabilities at the ``k`` ids and
the log of its remaining mass), and every divergence of
:mod:`fairseq_kd.losses` is taken between these two ``k + 1``-bucket
distributions.

Why the tail bucket rather than renormalising over the ``k`` (pytorch_translate's
form): the bucketed teacher keeps its true probabilities, so on a confident
position the loss is the full-vocabulary loss up to the tail's inner shape, and
a flat teacher (large tail) still tells the student how much mass to leave
outside the top-k; renormalising would push the student to put all its mass on
the ``k`` ids (an over-confident target) and cannot express the reverse KL or
skew divergences, which need the teacher's density where the student puts
mass.  Grouping outcomes never increases an f-divergence, so each bucketed
divergence is a lower bound of the full one, equal to it when the tail is
empty.  For the forward KL the gradient on the student's logits is exactly the
full one, ``p_s(v) - p_t(v)``, at the teacher's top-k tokens, and
``p_s(v) * (1 - tail_t / tail_s)`` on a tail token: the teacher's tail mass is
spread like the student's own tail.  Self-Evolution's gold one-hot is projected in the same way: the
gold token's bucket is its position among the ids, or the tail
(:func:`bucket_target`).

Everything is torch only; the student side keeps one ``[B, T, V]`` tensor
(its log-softmax, shared with the NLL).
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_kd.losses.block_max import argmax_ids
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

#: the top-k mass is capped at ``1 - TAIL_EPSILON`` (fp32's epsilon) before the
#: tail's log is taken: fp16 rounding of the cached values can make their sum
#: exceed 1, and a student sure of its top-k would give ``log 0``
TAIL_EPSILON = 2.0**-23


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` (Maechler's stable branches), ``x``
    capped at ``log(1 - TAIL_EPSILON)``."""
    x = x.clamp(max=math.log1p(-TAIL_EPSILON))
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def with_tail(top_lprobs: Tensor) -> Tensor:
    """``[..., k]`` log-probabilities of k tokens -> ``[..., k + 1]`` with the
    log of the remaining mass appended as the last bucket."""
    tail = log1mexp(torch.logsumexp(top_lprobs, dim=-1, keepdim=True))
    return torch.cat([top_lprobs, tail], dim=-1)


def teacher_buckets(topk_lprobs: Tensor) -> Tensor:
    """The cached teacher as a float32 (float64 stays) ``[B, T, k + 1]`` log-distribution."""
    if topk_lprobs.dtype in (torch.float16, torch.bfloat16):
        topk_lprobs = topk_lprobs.float()
    return with_tail(topk_lprobs)


def student_buckets(student_lprobs: Tensor, ids: Tensor) -> Tensor:
    """The student's ``[B, T, V]`` log-probabilities projected on the teacher's
    buckets: ``[B, T, k + 1]`` (its log-probabilities at ``ids``, then the log
    of its mass elsewhere); gradients flow into ``student_lprobs``."""
    return with_tail(student_lprobs.gather(-1, ids))


def bucket_target(target: Tensor, ids: Tensor) -> Tensor:
    """``[B, T]`` bucket of the gold token: its position among ``ids`` (the
    first if repeated), or ``k`` (the tail) when it is not a top-k token."""
    hit = ids.eq(target.unsqueeze(-1))
    k = ids.size(-1)
    positions = torch.arange(k, device=ids.device).expand_as(ids)
    return torch.where(hit, positions, torch.full_like(positions, k)).min(dim=-1).values


def topk_divergence(
    student_lprobs: Tensor, ids: Tensor, topk_lprobs: Tensor, mask: Tensor,
    divergence: str = "kl", skew_lambda: float = 0.1,
) -> Tensor:
    """Per-position ``[B, T]`` divergence (:data:`~fairseq_kd.losses.DIVERGENCES`)
    between the bucketed teacher and the bucketed student (zero where ``mask``
    is False).  ``student_lprobs`` are already softened by the cache's
    temperature; the cached values were computed at it."""
    return divergence_from_log_probs(
        student_buckets(student_lprobs, ids), teacher_buckets(topk_lprobs), mask, divergence, skew_lambda
    )


def topk_agreement(student_logits: Tensor, ids: Tensor, target: Tensor, padding_idx: int) -> Tensor:
    """Number of non-pad positions where the student's argmax is the teacher's (``ids[..., 0]``)."""
    same = argmax_ids(student_logits).eq(ids[..., 0])
    return (same & non_pad_mask(target, padding_idx)).sum()


def word_kd_topk_loss(
    student_logits: Tensor,
    ids: Tensor,
    topk_lprobs: Tensor,
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    divergence: str = "kl",
    skew_lambda: float = 0.1,
):
    """:func:`~fairseq_kd.losses.word_kd_loss` with the teacher given by its
    top-k: ``(1 - alpha) * LS-NLL + alpha * s * D(buckets_t, buckets_s^tau)``.
    Returns ``(loss, nll_loss, kd_loss)`` sums (``kd_loss`` unscaled)."""
    student_lprobs = log_probs(student_logits)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, target, padding_idx, epsilon)
    soft = student_lprobs if temperature == 1.0 else log_probs(student_logits, temperature)
    mask = non_pad_mask(target, padding_idx)
    kd_loss = topk_divergence(soft, ids, topk_lprobs, mask, divergence, skew_lambda).sum()
    scale = temperature**2 if temperature_scale else 1.0
    return (1.0 - alpha) * ls_loss + alpha * scale * kd_loss, nll_loss, kd_loss


def self_evolution_kd_topk(
    student_lprobs: Tensor,
    ids: Tensor,
    topk_lprobs: Tensor,
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
    teacher = teacher_buckets(topk_lprobs).detach()
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
    terms = self_evolution_kd_topk(soft, ids, topk_lprobs, target, mask, **sekd_options)
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
    student, teacher = student_buckets(student_lprobs, ids), teacher_buckets(topk_lprobs)
    if log_epsilon == 0.0:
        kl = kl_from_log_probs(student, teacher, mask)
    else:
        kl = floored_kl_from_probs(student.exp(), teacher.exp(), mask, log_epsilon)
    if not ranking:
        return kl.sum(), None
    rank = hierarchical_ranking_topk(student_lprobs.exp(), ids, teacher[..., :-1].exp(), topk)
    return kl.sum(), rank.masked_fill(~mask, 0.0).sum()
