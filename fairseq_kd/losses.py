"""Pure loss functions for knowledge distillation of sequence models.

Everything here is torch only (no fairseq import) so that it can be tested,
differentiated and reused by every criterion of the plugin.

Conventions (those of fairseq's criterions):

* ``student_logits`` and ``teacher_logits`` are ``[B, T, V]`` scores before the
  softmax; ``target`` is ``[B, T]`` token ids, right-padded with ``padding_idx``.
* Every loss is a **sum** over the non-pad target positions (EOS included);
  the trainer divides by ``sample_size`` (the number of target tokens).
* Softmaxes are taken in float32 when the input is half or bfloat16 (as
  fairseq's ``utils.log_softmax`` does under ``--fp16``).
* A teacher "logit" may equally be a log-probability (for instance the
  log-space average of an ensemble): ``log_softmax`` of a log-distribution is
  the distribution itself, so every function below accepts either.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "log_probs",
    "label_smoothed_nll",
    "kl_divergence",
    "top1_agreement",
    "DIVERGENCES",
    "divergence_from_log_probs",
    "reverse_kl_from_log_probs",
    "skew_kl_from_log_probs",
    "legacy_label_smoothed_nll",
    "legacy_nll_from_log_probs",
    "select_hard_tokens",
    "self_evolution_kd",
    "self_evolution_kd_loss",
    "SEKDTerms",
    "tie_kd_kl",
    "hierarchical_ranking",
    "tie_kd_terms",
]


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last dimension, in at
    least float32 precision (half and bfloat16 inputs are upcast; float64
    stays float64, which ``gradcheck`` needs)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def non_pad_mask(target: Tensor, padding_idx: int) -> Tensor:
    """``[B, T]`` boolean mask of the positions that count as targets."""
    return target.ne(padding_idx)


def nll_from_log_probs(
    lprobs: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """:func:`label_smoothed_nll` for already normalised float32 log-probabilities."""
    mask = non_pad_mask(target, padding_idx)
    nll = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    nll_sum = nll.masked_fill(~mask, 0.0).sum()
    if epsilon == 0.0:
        return nll_sum, nll_sum
    smooth_sum = (-lprobs.sum(dim=-1)).masked_fill(~mask, 0.0).sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_sum + eps_i * smooth_sum
    return loss, nll_sum


def label_smoothed_nll(
    student_logits: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """Label-smoothed negative log-likelihood, fairseq >= 0.10 formula.

    With ``eps_i = epsilon / (V - 1)``::

        loss = (1 - epsilon - eps_i) * sum_m nll + eps_i * sum_m (-sum_v log p_s(v))

    which puts ``1 - epsilon`` on the gold token and ``eps_i`` on every other
    token.  Returns ``(loss_sum, nll_sum)``, both summed over non-pad positions.
    """
    return nll_from_log_probs(log_probs(student_logits), target, padding_idx, epsilon)


def _xlogy_ratio(p_log: Tensor, q_log: Tensor) -> Tensor:
    """Per-position ``sum_v p (log p - log q)`` with ``0 * log 0 = 0``."""
    p = p_log.exp()
    pointwise = p * (p_log - q_log)
    return torch.where(p > 0, pointwise, torch.zeros_like(pointwise)).sum(dim=-1)


def kl_from_log_probs(
    student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor
) -> Tensor:
    """Per-position ``KL(p_t || p_s)`` (``[B, T]``, zero where ``mask`` is False).

    ``0 * log 0 = 0``: a teacher that puts exactly zero mass on a token (-inf
    log-probability) does not turn the sum into NaN."""
    return _xlogy_ratio(teacher_lprobs, student_lprobs).masked_fill(~mask, 0.0)


def kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    padding_idx: int,
    temperature: float = 1.0,
) -> Tensor:
    """Exact ``sum_m KL(p_teacher^tau || p_student^tau)``.

    Both distributions are softened by the same temperature
    (``softmax(logits / tau)``, float32).  No ``tau^2`` factor is applied here:
    the criterion decides how to scale the term.
    """
    mask = non_pad_mask(target, padding_idx)
    return kl_from_log_probs(
        log_probs(student_logits, temperature),
        log_probs(teacher_logits, temperature),
        mask,
    ).sum()


def top1_agreement(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, padding_idx: int
) -> Tensor:
    """Number of non-pad positions where student and teacher have the same argmax."""
    mask = non_pad_mask(target, padding_idx)
    same = student_logits.argmax(dim=-1).eq(teacher_logits.argmax(dim=-1))
    return (same & mask).sum()


def word_kd_loss(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    divergence: str = "kl",
    skew_lambda: float = 0.1,
):
    """Word-level KD: ``(1 - alpha) * LS-NLL + alpha * s * D(p_t^tau, p_s^tau)``.

    ``D`` is the forward KL by default; ``divergence`` selects another member
    of :data:`DIVERGENCES` (see :func:`divergence_from_log_probs`).
    ``s = tau^2`` when ``temperature_scale`` (Hinton et al.'s convention, which
    keeps gradient magnitudes comparable across temperatures) and 1 otherwise.
    The student's log-softmax is computed once and shared by both terms when
    ``tau == 1``.  Returns ``(loss, nll_loss, kd_loss)`` sums;
    ``kd_loss`` is the unscaled divergence sum (``None`` without a teacher, in
    which case ``loss`` is the plain LS-NLL).
    """
    student_lprobs = log_probs(student_logits)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, target, padding_idx, epsilon)
    if teacher_logits is None:
        return ls_loss, nll_loss, None
    mask = non_pad_mask(target, padding_idx)
    if temperature == 1.0:
        student_soft = student_lprobs
    else:
        student_soft = log_probs(student_logits, temperature)
    kd_loss = divergence_from_log_probs(
        student_soft, log_probs(teacher_logits, temperature), mask, divergence, skew_lambda
    ).sum()
    scale = temperature**2 if temperature_scale else 1.0
    loss = (1.0 - alpha) * ls_loss + alpha * scale * kd_loss
    return loss, nll_loss, kd_loss


# ---------------------------------------------------------------------------
# The divergence family: reverse KL and DistiLLM's skew KL / skew reverse KL
# ---------------------------------------------------------------------------

#: ``kl``: KL(p_t || p_s) (mode-covering, Word-KD); ``rkl``: KL(p_s || p_t)
#: (mode-seeking); ``skl``: KL(p_t || l*p_t + (1-l)*p_s); ``srkl``:
#: KL(p_s || l*p_s + (1-l)*p_t)  (Ko et al., DistiLLM, ICML 2024)
DIVERGENCES = ("kl", "rkl", "skl", "srkl")


def reverse_kl_from_log_probs(student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-position ``KL(p_s || p_t)``.  A token the teacher gives exactly zero
    probability contributes 0 instead of infinity, as DistiLLM's reference
    ``reverse_kl`` does (``masked_fill(isinf, 0)``)."""
    p = student_lprobs.exp()
    pointwise = p * (student_lprobs - teacher_lprobs)
    pointwise = pointwise.masked_fill(torch.isinf(teacher_lprobs) | (p == 0), 0.0)
    return pointwise.sum(dim=-1).masked_fill(~mask, 0.0)


def skew_kl_from_log_probs(
    student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor, skew_lambda: float, reverse: bool = False
) -> Tensor:
    """Per-position skew KL ``KL(p_t || l*p_t + (1-l)*p_s)``, or with ``reverse``
    the skew reverse KL ``KL(p_s || l*p_s + (1-l)*p_t)``.

    The mixture is formed in log space with ``logaddexp`` (stable for tiny
    probabilities).  This is the *true* KL, as in KDFlow's implementation;
    DistiLLM's reference SKL drops the constant ``sum p_t log p_t`` (a
    cross-entropy, larger by the teacher's entropy, same gradient).
    ``0 < l < 1``; at ``l = 0`` both reduce to the plain KL / reverse KL.
    """
    if not 0.0 <= skew_lambda < 1.0:
        raise ValueError(f"skew lambda must be in [0, 1), got {skew_lambda}")
    anchor, other = (student_lprobs, teacher_lprobs) if reverse else (teacher_lprobs, student_lprobs)
    if skew_lambda == 0.0:
        mixture = other
    else:
        mixture = torch.logaddexp(anchor + math.log(skew_lambda), other + math.log1p(-skew_lambda))
    return _xlogy_ratio(anchor, mixture).masked_fill(~mask, 0.0)


def divergence_from_log_probs(
    student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor, divergence: str = "kl", skew_lambda: float = 0.1
) -> Tensor:
    """Per-position divergence ``[B, T]`` named by ``divergence`` (:data:`DIVERGENCES`)."""
    if divergence == "kl":
        return kl_from_log_probs(student_lprobs, teacher_lprobs, mask)
    if divergence == "rkl":
        return reverse_kl_from_log_probs(student_lprobs, teacher_lprobs, mask)
    if divergence in ("skl", "srkl"):
        return skew_kl_from_log_probs(student_lprobs, teacher_lprobs, mask, skew_lambda, reverse=divergence == "srkl")
    raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")


# ---------------------------------------------------------------------------
# Selective KD (Wang et al., ACL 2021): distil only the hardest tokens
# ---------------------------------------------------------------------------


def legacy_label_smoothed_nll(
    student_logits: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """Label-smoothed NLL of fairseq < 0.10 (``eps_i = epsilon / V``)::

        loss = (1 - epsilon) * sum_m nll + (epsilon / V) * sum_m (-sum_v log p_s(v))

    as the Selective-KD reference code computes it.  Returns ``(loss, nll)``.
    """
    return legacy_nll_from_log_probs(log_probs(student_logits), target, padding_idx, epsilon)


def legacy_nll_from_log_probs(
    lprobs: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """:func:`legacy_label_smoothed_nll` for already normalised log-probabilities."""
    mask = non_pad_mask(target, padding_idx)
    nll = (-lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)).masked_fill(~mask, 0.0).sum()
    smooth = (-lprobs.sum(-1)).masked_fill(~mask, 0.0).sum()
    return (1.0 - epsilon) * nll + epsilon / lprobs.size(-1) * smooth, nll


def selection_threshold(values: Tensor, ratio: float) -> Tensor:
    """The ``ceil(n * ratio)``-th largest of the 1-D ``values``: tokens whose
    difficulty is ``>=`` it form the hardest ``ratio`` fraction (ties included,
    as in the reference code).  ``ratio`` in ``(0, 1]``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"selection ratio must be in (0, 1], got {ratio}")
    k = max(1, math.ceil(values.numel() * ratio))
    return torch.topk(values, k).values[-1]


def select_hard_tokens(
    difficulty: Tensor, mask: Tensor, ratio: float, history: Optional[Tensor] = None
) -> Tensor:
    """Boolean ``[B, T]`` mask of the tokens to distil.

    ``difficulty`` is the student's per-token gold NLL (detached).  Without
    ``history`` the threshold is taken over this batch's non-pad tokens
    (Selective-KD's ``batch_level``); with ``history`` (a 1-D tensor of past
    difficulties, the current batch's already appended: ``global_level``) over
    that queue.
    """
    pool = difficulty[mask] if history is None else history
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    return (difficulty >= selection_threshold(pool, ratio)) & mask


def log_mean_exp(stacked_lprobs: Tensor, dim: int = 0) -> Tensor:
    """``log(mean_i exp(x_i))`` along ``dim``: the probability average of an
    ensemble, computed in log space."""
    return torch.logsumexp(stacked_lprobs, dim=dim) - math.log(stacked_lprobs.size(dim))


# ---------------------------------------------------------------------------
# Hybrid gated token/sentence-level KD (Wei et al., IJCAI 2024, arXiv
# 2404.14827; no public code).  Verified: L = G * L_token + (1 - G) * L_sentence.
# How G is trained is a reconstruction, argued in docs/hybrid_gated_kd.md.
# ---------------------------------------------------------------------------


def label_smoothed_nll_per_position(
    lprobs: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """Per-position ``(loss, nll)`` ``[B, T]`` of :func:`label_smoothed_nll`
    (zero on pads); their sums are the sums of :func:`nll_from_log_probs`."""
    mask = non_pad_mask(target, padding_idx)
    nll = (-lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)).masked_fill(~mask, 0.0)
    if epsilon == 0.0:
        return nll, nll
    smooth = (-lprobs.sum(dim=-1)).masked_fill(~mask, 0.0)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


def label_smoothing_floor(epsilon: float, vocab_size: int) -> float:
    """Smallest value of the per-token label-smoothed NLL (fairseq >= 0.10 formula).

    The loss is the cross-entropy ``CE(q, p_s)`` to the smoothed one-hot
    ``q`` (``1 - epsilon`` on the target, ``epsilon / (V - 1)`` elsewhere), so
    ``LS-NLL - floor = KL(q || p_s) >= 0`` with ``floor = H(q)``.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    floor = 0.0
    if 0.0 < epsilon < 1.0:
        floor -= (1.0 - epsilon) * math.log1p(-epsilon)
    if epsilon > 0.0:
        floor -= epsilon * math.log(epsilon / (vocab_size - 1))
    return floor


def gated_mixture(token_loss: Tensor, sentence_loss: Tensor, gate) -> Tensor:
    """``sum(G * L_token + (1 - G) * L_sentence)``: the hybrid loss of Wei et al.

    ``gate`` (a float or a tensor broadcastable to the losses) is the weight of
    the token level.  The losses are per gate unit: one scalar per batch for a
    scalar gate, ``[B]`` per-sentence sums for a sentence gate, ``[B, T]``
    per-position values (both on the same prefixes) for a token gate.
    """
    return (gate * token_loss + (1.0 - gate) * sentence_loss).sum()


def bernoulli_kl_from_logits(logits: Tensor, prior: float) -> Tensor:
    """Elementwise ``KL(Bernoulli(sigmoid(z)) || Bernoulli(prior))``, stable for any ``z``
    (computed with ``logsigmoid``; its derivative in ``z`` is
    ``sigmoid'(z) * (z - logit(prior))``)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    gate = torch.sigmoid(logits)
    return gate * (F.logsigmoid(logits) - math.log(prior)) + (1.0 - gate) * (
        F.logsigmoid(-logits) - math.log1p(-prior)
    )


def gate_objective(
    gate_logits: Tensor,
    token_excess: Tensor,
    sentence_excess: Tensor,
    token_count: Tensor,
    sentence_count: Tensor,
    prior: float = 0.5,
    prior_weight: float = 1.0,
) -> Tensor:
    """Training objective of a learned gate ``G = sigmoid(z)``, one term per gate unit::

        J = sum_u w_u * [ G_u * (a_u - b_u) + lambda * KL(Bernoulli(G_u) || Bernoulli(prior)) ]

    with ``a_u = token_excess / token_count`` and ``b_u = sentence_excess /
    sentence_count`` the per-token *excess* losses of the two levels (each
    level's loss minus its smallest attainable value; both detached here, so
    ``J`` trains the gate only), ``w_u = (token_count + sentence_count) / 2``
    and ``lambda = prior_weight``.  ``G * (a - b)`` is, per token, the part of
    the hybrid loss that depends on G; the prior term bounds the gate away from
    0 and 1: the unique minimum in ``z`` for given losses is
    :func:`gate_equilibrium`.  Units with zero counts contribute nothing.
    """
    token_count, sentence_count = token_count.to(gate_logits), sentence_count.to(gate_logits)
    gap = (
        token_excess.detach().to(gate_logits) / token_count.clamp(min=1.0)
        - sentence_excess.detach().to(gate_logits) / sentence_count.clamp(min=1.0)
    )
    weight = 0.5 * (token_count + sentence_count)
    per_unit = torch.sigmoid(gate_logits) * gap
    if prior_weight != 0.0:
        per_unit = per_unit + prior_weight * bernoulli_kl_from_logits(gate_logits, prior)
    return (weight * per_unit).sum()


def gate_equilibrium(gap: Tensor, prior: float = 0.5, prior_weight: float = 1.0) -> Tensor:
    """``argmin_G  G * gap + lambda * KL(Bernoulli(G) || Bernoulli(prior))
    = sigmoid(logit(prior) - gap / lambda)``, for a per-token gap
    ``gap = a - b`` between the excess losses of the token and the sentence
    level (``lambda = prior_weight > 0``)."""
    if prior_weight <= 0:
        raise ValueError(f"prior_weight must be > 0 for a finite equilibrium, got {prior_weight}")
    return torch.sigmoid(math.log(prior / (1.0 - prior)) - gap / prior_weight)


# ---------------------------------------------------------------------------
# TIE-KD: KL with the reference's log floor, and the hierarchical ranking loss
# (Zhang et al., ACL 2023; official code songmzhang/NMT-KD @ 53c2244,
# ``compute_advanced_kd_loss``)
# ---------------------------------------------------------------------------

#: floor added inside the logarithms of TIE-KD's KL by the reference code
TIE_KD_LOG_EPSILON = 1e-6


def probs(logits: Tensor) -> Tensor:
    """``softmax(logits)`` over the last dimension, float32 for half or bfloat16
    inputs and float64 for float64 inputs (the dtype rules of :func:`log_probs`)."""
    return log_probs(logits).exp()


def floored_kl_from_probs(
    student_probs: Tensor, teacher_probs: Tensor, mask: Tensor, log_epsilon: float
) -> Tensor:
    """Per-position ``sum_v p_t * (log(p_t + eps) - log(p_s + eps))`` (``[B, T]``,
    zero where ``mask`` is False)."""
    teacher_log = torch.log(teacher_probs + log_epsilon)
    student_log = torch.log(student_probs + log_epsilon)
    return (teacher_probs * (teacher_log - student_log)).sum(dim=-1).masked_fill(~mask, 0.0)


def tie_kd_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    padding_idx: int,
    log_epsilon: float = TIE_KD_LOG_EPSILON,
) -> Tensor:
    """``sum_m KL(p_t || p_s)`` as TIE-KD's reference code computes it.

    The reference takes ``log(softmax(x) + 1e-6)`` instead of ``log_softmax(x)``
    on both sides (``log_epsilon=1e-6``, the default); ``log_epsilon=0`` gives
    the exact KL of :func:`kl_divergence` (computed with ``log_softmax``, hence
    the same values and gradients as ``word_kd``).

    Why the floor is the default: it is what the published numbers were trained
    with, and the spec's test vectors (17.663123 vs 17.668200 exact) are only
    reproduced with it.  What it changes: every log-probability is clipped at
    about ``log 1e-6 = -13.8``, so a token the teacher finds plausible but the
    student gives far less than 1e-6 contributes at most ``p_t * 13.8`` and its
    gradient is damped by ``p_s / (p_s + 1e-6)``, i.e. the student is barely
    pushed to raise tokens it has all but ruled out.  With large vocabularies
    the two values drift apart more than on the 10-word test vectors; use the
    exact KL to compare with ``word_kd`` or other criterions.
    """
    mask = non_pad_mask(target, padding_idx)
    if log_epsilon == 0.0:
        return kl_from_log_probs(log_probs(student_logits), log_probs(teacher_logits), mask).sum()
    if log_epsilon < 0:
        raise ValueError(f"log_epsilon must be >= 0, got {log_epsilon}")
    return floored_kl_from_probs(probs(student_logits), probs(teacher_logits), mask, log_epsilon).sum()


def hierarchical_ranking_from_probs(student_probs: Tensor, teacher_probs: Tensor, topk: int) -> Tensor:
    """Per-position TIE-KD ranking loss ``[B, T]`` (no pad masking).

    With ``t_i`` the teacher's own top-k tokens and ``s_j`` the student's, both
    sorted by decreasing probability, and zero-margin hinges on probabilities:

    * top-1 level: ``sum_j max(0, p_s(t_j) - p_s(t_1))`` -- among the teacher's
      top-k, the teacher's argmax must get the largest student probability;
    * top-k level: ``sum_{i,j} max(0, p_s(s_j) - p_s(t_i)) * [p_t(t_i) > p_t(s_j)]``
      -- whenever the teacher strictly prefers ``t_i`` to ``s_j`` the student
      must not prefer ``s_j`` (so pairs with ``s_j == t_i`` count zero).

    The teacher only selects tokens and pairs; the gradient flows through the
    student's probabilities.  ``torch.topk`` breaks ties in an unspecified order.
    """
    vocab = student_probs.size(-1)
    if not 1 <= topk <= vocab:
        raise ValueError(f"topk must be in [1, {vocab}] (the vocabulary size), got {topk}")
    teacher_top, teacher_ids = teacher_probs.topk(topk, dim=-1)  # p_t(t_i)      [B,T,k]
    student_top, student_ids = student_probs.topk(topk, dim=-1)  # p_s(s_j)      [B,T,k]
    student_at_teacher = student_probs.gather(-1, teacher_ids)  # p_s(t_i)      [B,T,k]
    teacher_at_student = teacher_probs.gather(-1, student_ids)  # p_t(s_j)      [B,T,k]

    top1_level = torch.relu(student_at_teacher - student_at_teacher[..., :1]).sum(dim=-1)

    # [B, T, k (teacher's t_i), k (student's s_j)]
    student_violation = torch.relu(student_top.unsqueeze(-2) - student_at_teacher.unsqueeze(-1))
    teacher_prefers = teacher_top.unsqueeze(-1) > teacher_at_student.unsqueeze(-2)
    topk_level = (student_violation * teacher_prefers).sum(dim=(-2, -1))
    return top1_level + topk_level


def hierarchical_ranking(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    padding_idx: int,
    topk: int = 5,
) -> Tensor:
    """TIE-KD's hierarchical ranking loss (top-1 level + top-k level), summed
    over the non-pad target positions; see :func:`hierarchical_ranking_from_probs`.

    No temperature, no margin and no weight, as in the reference code; the
    softmaxes are float32 (float64 for float64 inputs).
    """
    per_position = hierarchical_ranking_from_probs(probs(student_logits), probs(teacher_logits), topk)
    return per_position.masked_fill(~non_pad_mask(target, padding_idx), 0.0).sum()


def tie_kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    padding_idx: int,
    topk: int = 5,
    ranking: bool = True,
    log_epsilon: float = TIE_KD_LOG_EPSILON,
) -> Tuple[Tensor, Optional[Tensor]]:
    """One TIE-KD iteration: ``(kl_sum, rank_sum)`` over the non-pad positions,
    sharing the softmaxes between both terms.  ``rank_sum`` is ``None`` when
    ``ranking`` is False; ``log_epsilon`` is that of :func:`tie_kd_kl`."""
    if log_epsilon < 0:
        raise ValueError(f"log_epsilon must be >= 0, got {log_epsilon}")
    mask = non_pad_mask(target, padding_idx)
    student_lprobs, teacher_lprobs = log_probs(student_logits), log_probs(teacher_logits)
    student_probs, teacher_probs = student_lprobs.exp(), teacher_lprobs.exp()
    if log_epsilon == 0.0:
        kl = kl_from_log_probs(student_lprobs, teacher_lprobs, mask)
    else:
        kl = floored_kl_from_probs(student_probs, teacher_probs, mask, log_epsilon)
    if not ranking:
        return kl.sum(), None
    rank = hierarchical_ranking_from_probs(student_probs, teacher_probs, topk)
    return kl.sum(), rank.masked_fill(~mask, 0.0).sum()


# ---------------------------------------------------------------------------
# Self-Evolution KD (Song, Ding, Zan, Huang, COLING 2025, arXiv 2412.15303).
# No official code and no readable method section: this is the reconstruction
# of methods.md section 3.1, with every alternative reading behind an argument.
# ---------------------------------------------------------------------------

SEKD_HARD_CRITERIA = ("threshold", "ratio", "all")
SEKD_LAMBDA_MODES = ("const", "linear")
SEKD_DIVERGENCES = ("fkl", "rkl")
SEKD_PRIOR_SIDES = ("student", "target")


class SEKDTerms(NamedTuple):
    """Sums over the non-pad positions of one batch."""

    kd_loss: Tensor  #: the distillation term (differentiable)
    n_hard: Tensor  #: number of hard tokens (integer)
    difficulty_sum: Tensor  #: sum of the difficulties d_t (no grad)
    ratio_sum: Tensor  #: sum of the mixing ratios lambda_t (no grad)


def gold_teacher_log_mixture(teacher_lprobs: Tensor, target: Tensor, gt_weight: float) -> Tensor:
    """``log r`` with ``r = gt_weight * e_y + (1 - gt_weight) * p_t`` (``[B, T, V]``).

    ``e_y`` is the one-hot gold vector, so only the gold entry needs a
    ``logaddexp``; elsewhere ``log r = log(1 - gt_weight) + log p_t``.  At
    ``gt_weight = 1`` the non-gold entries are exactly ``-inf`` (``r = e_y``).
    """
    if not 0.0 <= gt_weight <= 1.0:
        raise ValueError(f"gt_weight must be in [0, 1], got {gt_weight}")
    if gt_weight == 0.0:
        return teacher_lprobs
    index = target.unsqueeze(-1)
    if gt_weight == 1.0:
        return torch.full_like(teacher_lprobs, float("-inf")).scatter(-1, index, 0.0)
    rest = teacher_lprobs + math.log1p(-gt_weight)
    gold = torch.logaddexp(rest.gather(-1, index), torch.full_like(rest[..., :1], math.log(gt_weight)))
    return rest.scatter(-1, index, gold)


def log_convex_mixture(log_a: Tensor, log_b: Tensor, weight: Tensor) -> Tensor:
    """``log((1 - w) * a + w * b)`` per position, ``w = weight`` (``[B, T]``, in [0, 1)).

    Where ``w = 0`` the result is ``log_a`` itself: the mixing branch is fed a
    dummy weight there, so neither ``log 0`` nor its gradient ever appears.
    Gradients flow into both ``log_a`` and ``log_b``.
    """
    active = weight > 0
    safe = torch.where(active, weight, torch.full_like(weight, 0.5)).unsqueeze(-1)
    mixed = torch.logaddexp(log_a + torch.log1p(-safe), log_b + torch.log(safe))
    return torch.where(active.unsqueeze(-1), mixed, log_a)


def sekd_hard_mask(
    difficulty: Tensor,
    mask: Tensor,
    criterion: str = "ratio",
    threshold: float = 1.0,
    hard_ratio: float = 0.5,
) -> Tensor:
    """Which non-pad positions are *hard* (``[B, T]`` bool, False on pads).

    * ``threshold``: ``d_t > threshold`` (strict);
    * ``ratio``: the ``k = ceil(hard_ratio * N)`` most difficult of the ``N``
      non-pad positions of the batch; as in Selective-KD's ``batch_level``,
      the gate is the k-th largest difficulty and ties with it are included
      (``d_t >= gate``), so ``k`` is a lower bound; ``hard_ratio = 0`` selects
      nothing;
    * ``all``: every non-pad position (spec alternative 3: a continuous ratio
      over all tokens, best combined with the ``linear`` lambda mode).
    """
    if criterion == "threshold":
        return (difficulty > threshold) & mask
    if criterion == "all":
        return mask.clone()
    if criterion != "ratio":
        raise ValueError(f"unknown hard-token criterion {criterion!r}; use one of {SEKD_HARD_CRITERIA}")
    if not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(f"hard_ratio must be in [0, 1], got {hard_ratio}")
    values = difficulty[mask]
    # the 1e-9 keeps 0.3 * 10 = 3.0000000000000004 from rounding up to 4
    k = min(values.numel(), math.ceil(hard_ratio * values.numel() - 1e-9))
    if k <= 0:
        return torch.zeros_like(mask)
    gate = values.topk(k).values[-1]
    return (difficulty >= gate) & mask


def sekd_ratios(
    difficulty: Tensor, hard: Tensor, lam: float = 0.5, mode: str = "const", lambda_max: float = 0.9
) -> Tensor:
    """``lambda_t = hard_t * clip(g(d_t), 0, lambda_max)`` (``[B, T]``) with

    * ``const``:  ``g(d) = lam``;
    * ``linear``: ``g(d) = lam * d`` -- ``lam`` is then a slope in 1/nat (a
      hard token of difficulty 1 nat gets ``lam``, the ratio grows with the
      difficulty until it saturates at ``lambda_max``).  This choice needs no
      batch statistics, so a token's ratio does not depend on its batch mates.

    ``lambda_max < 1`` keeps part of the student in the proxy: at
    ``lambda_t = 1`` a token would give the student no gradient and, with
    ``gt_weight = 1``, an infinite KL.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not 0.0 <= lambda_max < 1.0:
        raise ValueError(f"lambda_max must be in [0, 1), got {lambda_max}")
    if mode == "const":
        ratio = torch.full_like(difficulty, min(lam, lambda_max))
    elif mode == "linear":
        ratio = (lam * difficulty).clamp(0.0, lambda_max)
    else:
        raise ValueError(f"unknown lambda mode {mode!r}; use one of {SEKD_LAMBDA_MODES}")
    return ratio.masked_fill(~hard, 0.0)


def sekd_divergence(
    student_lprobs: Tensor,
    teacher_lprobs: Tensor,
    target: Tensor,
    ratio: Tensor,
    mask: Tensor,
    gt_weight: float = 0.5,
    divergence: str = "fkl",
    prior_side: str = "student",
) -> Tensor:
    """Stage 2 for given ratios: the per-position divergence ``[B, T]`` (zero on pads).

    ``ratio`` (``lambda_t``) is treated as a constant; gradients flow into
    ``student_lprobs`` only.  With ``r_t = g * e_y + (1 - g) * p_t``:

    ============  =======  ==========================================================
    prior_side    div.     per-position term
    ============  =======  ==========================================================
    ``student``   ``fkl``  ``KL(p_t || q_t)``, ``q_t = (1 - lambda_t) p_s + lambda_t r_t``
    ``student``   ``rkl``  ``KL(q_t || p_t)``
    ``target``    ``fkl``  ``KL(qbar_t || p_s)``, ``qbar_t = (1 - lambda_t) p_t + lambda_t e_y``
    ``target``    ``rkl``  ``KL(p_s || qbar_t)``
    ============  =======  ==========================================================

    Where ``lambda_t = 0`` every row is the plain (forward or reverse) KL
    between teacher and student.  The reverse reading keeps the proxy as the
    student's stand-in and swaps the arguments: ``KL(q_t || p_t)`` reduces on
    easy tokens to the usual reverse KD ``KL(p_s || p_t)`` (methods.md 6.2),
    exactly as the forward reading reduces to Word-KD, whereas e.g.
    ``KL(p_s || q_t)`` would compare the student with a mixture of itself
    and lose that anchor.
    """
    if divergence not in SEKD_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {SEKD_DIVERGENCES}")
    teacher_lprobs = teacher_lprobs.detach()
    if prior_side == "student":
        prior = gold_teacher_log_mixture(teacher_lprobs, target, gt_weight)
        proxy = log_convex_mixture(student_lprobs, prior, ratio.detach())
        if divergence == "fkl":
            return kl_from_log_probs(proxy, teacher_lprobs, mask)
        return kl_from_log_probs(teacher_lprobs, proxy, mask)
    if prior_side == "target":
        gold = gold_teacher_log_mixture(teacher_lprobs, target, 1.0)
        smoothed = log_convex_mixture(teacher_lprobs, gold, ratio.detach())
        if divergence == "fkl":
            return kl_from_log_probs(student_lprobs, smoothed, mask)
        return kl_from_log_probs(smoothed, student_lprobs, mask)
    raise ValueError(f"unknown prior side {prior_side!r}; use one of {SEKD_PRIOR_SIDES}")


def self_evolution_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    padding_idx: int,
    gt_weight: float = 0.5,
    hard_criterion: str = "ratio",
    threshold: float = 1.0,
    hard_ratio: float = 0.5,
    lam: float = 0.5,
    lambda_mode: str = "const",
    lambda_max: float = 0.9,
    divergence: str = "fkl",
    prior_side: str = "student",
    temperature: float = 1.0,
    student_lprobs: Optional[Tensor] = None,
) -> SEKDTerms:
    """Self-Evolution KD term (reconstruction of methods.md 3.1) and its statistics.

    Per non-pad position, with ``p_s``, ``p_t`` softened by ``temperature``
    (float32 for half inputs) and ``e_y`` the one-hot gold:

    Stage 1 (no gradient)::

        r_t      = gt_weight * e_y + (1 - gt_weight) * p_t      # GT (+) teacher
        d_t      = KL(r_t || sg(p_s))                           # difficulty
        hard_t   = d_t > threshold | top hard_ratio of the batch | every token
        lambda_t = hard_t * clip(lam or lam * d_t, 0, lambda_max)

    Stage 2: :func:`sekd_divergence`; the default (``prior_side='student'``,
    ``divergence='fkl'``) is ``KL(p_t || (1 - lambda_t) p_s + lambda_t r_t)``.

    Why the default reading: the abstract says the method integrates the
    teacher and gold distributions "into the student distribution as prior
    knowledge" and the secondary summaries describe a *proxy* distribution
    built for hard tokens only; a per-token convex mixture on the student
    side of the forward KL is the literal reading (the device of DistiLLM's
    skew KL), it leaves easy tokens with vanilla Word-KD, and it
    lower-bounds the student-side density on hard tokens, which fits the
    claimed faster convergence.  Smoothing the target instead
    (``prior_side='target'``), the reverse direction and a ratio over all
    tokens (``hard_criterion='all'``) are the spec's alternatives 1-3.

    ``student_lprobs`` may pass an already computed ``log_probs(student_logits,
    temperature)`` to avoid a second softmax.  Returns sums over the non-pad
    positions; with every ``lambda_t = 0`` (``lam = 0``, ``hard_ratio = 0`` or a
    threshold above every difficulty) ``kd_loss`` equals
    :func:`kl_divergence` (``fkl``) bit for bit.
    """
    mask = non_pad_mask(target, padding_idx)
    if student_lprobs is None:
        student_lprobs = log_probs(student_logits, temperature)
    teacher_lprobs = log_probs(teacher_logits, temperature).detach()
    with torch.no_grad():
        prior = gold_teacher_log_mixture(teacher_lprobs, target, gt_weight)
        difficulty = kl_from_log_probs(student_lprobs.detach(), prior, mask).clamp_min(0.0)
        hard = sekd_hard_mask(difficulty, mask, hard_criterion, threshold, hard_ratio)
        ratio = sekd_ratios(difficulty, hard, lam, lambda_mode, lambda_max)
    kd = sekd_divergence(
        student_lprobs, teacher_lprobs, target, ratio, mask, gt_weight, divergence, prior_side
    )
    return SEKDTerms(kd.sum(), hard.sum(), difficulty.sum(), ratio.sum())


def self_evolution_kd_loss(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    nll_weight: float = 0.0,
    **sekd_options,
):
    """``(1 - alpha) * LS-NLL + alpha * s * L_SEKD + nll_weight * NLL``.

    The combination is :func:`word_kd_loss` with the KL replaced by the
    Self-Evolution term (``s = tau^2`` when ``temperature_scale``), so with
    every ratio at zero and ``nll_weight = 0`` the two losses are equal.  The
    optional extra term is the plain (unsmoothed, ``tau = 1``) gold NLL of the
    spec's ``L = L_KD + beta * L_NLL``; ``alpha = 1, nll_weight = beta`` gives
    that form exactly.  ``sekd_options`` are the keyword arguments of
    :func:`self_evolution_kd`.  Returns ``(loss, nll_loss, terms)``;
    ``terms`` is a :class:`SEKDTerms` (``None`` without a teacher, in which
    case ``loss`` is the plain LS-NLL).
    """
    student_lprobs = log_probs(student_logits)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, target, padding_idx, epsilon)
    if teacher_logits is None:
        return ls_loss, nll_loss, None
    soft = student_lprobs if temperature == 1.0 else None
    terms = self_evolution_kd(
        student_logits, teacher_logits, target, padding_idx,
        temperature=temperature, student_lprobs=soft, **sekd_options,
    )
    scale = temperature**2 if temperature_scale else 1.0
    loss = (1.0 - alpha) * ls_loss + alpha * scale * terms.kd_loss
    if nll_weight != 0.0:
        loss = loss + nll_weight * nll_loss
    return loss, nll_loss, terms
