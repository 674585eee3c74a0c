"""Divergences between teacher and student distributions and Word-KD.

The forward KL ``KL(p_t || p_s)`` (Word-KD, mode-covering), the reverse KL
``KL(p_s || p_t)`` (mode-seeking), DistiLLM's skew KL / skew reverse KL
(Ko et al., ICML 2024) and GKD's generalized Jensen-Shannon divergence
(Agarwal et al., ICLR 2024; docs/on_policy_kd.md), per position or summed, and
:func:`word_kd_loss`, the LS-NLL + divergence combination of ``word_kd``,
``seq_kd`` and ``on_policy_kd``.

Every divergence is computed in chunks of target positions
(:func:`~fairseq_kd.losses.chunked.pair_divergence`,
:func:`~fairseq_kd.losses.chunked.chunked_rows`): beyond the student's
log-softmax (shared with the NLL) and the teacher's log-probabilities, no
``[B, T, V]`` tensor is held, in forward or backward, except the gradient.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from fairseq_kd.losses.chunked import _chunks, _flat, check_not_released, chunk_rows
from fairseq_kd.losses.chunked import chunked_rows, pair_divergence
from fairseq_kd.losses.common import _xlogy_ratio, kd_mix, kd_scale, log_probs, nll_from_log_probs, non_pad_mask


#: ``kl``: KL(p_t || p_s) (mode-covering, Word-KD); ``rkl``: KL(p_s || p_t)
#: (mode-seeking); ``skl``: KL(p_t || l*p_t + (1-l)*p_s); ``srkl``:
#: KL(p_s || l*p_s + (1-l)*p_t)  (Ko et al., DistiLLM, ICML 2024); ``jsd``: the generalized JSD
#: B*KL(p_t || M) + (1-B)*KL(p_s || M), M = B*p_t + (1-B)*p_s  (Agarwal et al., GKD, ICLR 2024)
DIVERGENCES = ("kl", "rkl", "skl", "srkl", "jsd")


def kl_from_log_probs(
    student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor, release_teacher: bool = False,
    rows: Optional[Tensor] = None,
) -> Tensor:
    """Per-position ``KL(p_t || p_s)`` (``[B, T]``, zero where ``mask`` is False).

    ``0 * log 0 = 0``: a teacher that puts exactly zero mass on a token (-inf
    log-probability) does not turn the sum into NaN.  ``release_teacher``: the
    (gradient-free) teacher tensor is not read after backward, which then builds
    the student's gradient in its storage (see :func:`pair_divergence`, as ``rows``)."""
    return pair_divergence(teacher_lprobs, student_lprobs, mask, "kl", rows=rows, overwrite_p=release_teacher)


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


def word_kd_loss(
    student_logits: Tensor,
    teacher,
    target: Tensor,
    padding_idx: int,
    epsilon: float,
    alpha: float,
    temperature: float = 1.0,
    temperature_scale: bool = True,
    divergence: str = "kl",
    skew_lambda: float = 0.1,
    release_teacher: bool = False,
    jsd_beta: float = 0.5,
    supervised: Optional[Tensor] = None,
):
    """Word-level KD: ``(1 - alpha) * LS-NLL + alpha * s * D(p_t^tau, p_s^tau)`` (:func:`~fairseq_kd.losses.common.kd_mix`).

    ``teacher`` is a :class:`~fairseq_kd.losses.teacher.TeacherDistribution` (the live teacher's
    log-probabilities or the cache's top-k) or None.  ``D`` is the forward KL by default; ``divergence``
    selects another member of :data:`DIVERGENCES` (see :func:`divergence_from_log_probs`), ``skew_lambda``
    and ``jsd_beta`` parametrise them; ``s = tau^2`` when ``temperature_scale``, else 1.  The student's
    log-softmax is computed once and shared by both terms when ``tau == 1``; ``release_teacher`` lets
    backward reuse the teacher's storage (forward KL; see :func:`kl_from_log_probs`).  ``supervised``
    (``[B]`` booleans, default all True) names the rows whose target is a reference (gold or Seq-KD): the
    LS-NLL is summed over those rows only, the divergence over every row (``on_policy_kd``'s
    student-generated rows have no reference to smooth).  Returns ``(loss, nll_loss, kd_loss)`` sums;
    ``kd_loss`` is the unscaled divergence sum (``None`` without a teacher, in which case ``loss`` is the
    plain LS-NLL).
    """
    student_lprobs = log_probs(student_logits)
    nll_target = target if supervised is None else target.masked_fill(~supervised.unsqueeze(-1), padding_idx)
    ls_loss, nll_loss = nll_from_log_probs(student_lprobs, nll_target, padding_idx, epsilon)
    if teacher is None:
        return ls_loss, nll_loss, None
    mask = non_pad_mask(target, padding_idx)
    student_soft = student_lprobs if temperature == 1.0 else log_probs(student_logits, temperature)
    kd_loss = teacher.divergence(student_soft, mask, divergence, temperature, skew_lambda, jsd_beta,
                                 release_teacher).sum()
    return kd_mix(ls_loss, kd_loss, alpha, kd_scale(temperature, temperature_scale)), nll_loss, kd_loss


def reverse_kl_from_log_probs(student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-position ``KL(p_s || p_t)``.  A token the teacher gives exactly zero
    probability contributes 0 instead of infinity, as DistiLLM's reference
    ``reverse_kl`` does (``masked_fill(isinf, 0)``)."""
    return pair_divergence(student_lprobs, teacher_lprobs, mask, "kl_finite")


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
        return pair_divergence(anchor, other, mask, "kl")
    log_lambda, log_rest = math.log(skew_lambda), math.log1p(-skew_lambda)

    def skew_rows(anchor_rows, other_rows):
        return _xlogy_ratio(anchor_rows, torch.logaddexp(anchor_rows + log_lambda, other_rows + log_rest))

    return chunked_rows(skew_rows, (anchor, other), mask)


def _jsd_mixture(teacher_rows: Tensor, student_rows: Tensor, beta: float) -> Tensor:
    """``log M`` of one chunk: ``logaddexp(log B + log p_t, log(1-B) + log p_s)``."""
    return torch.logaddexp(teacher_rows + math.log(beta), student_rows + math.log1p(-beta))


def _weighted_log_ratio(log_p: Tensor, log_m: Tensor) -> Tensor:
    """``p * (log p - log M)`` elementwise with ``0 * log 0 = 0`` (the gradient factor of each JSD term)."""
    return (log_p - log_m).mul_(log_p.exp()).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


class _JSD(torch.autograd.Function):
    """Per-row ``JSD_B`` of flattened ``[N, V]`` log-distributions, chunk by chunk, with its hand-written
    gradient: ``d JSD / d log p_s = (1-B) p_s (log p_s - log M)`` and ``d JSD / d log p_t = B p_t (log p_t -
    log M)`` (the terms through ``M`` cancel), so backward recomputes one ``log M`` per chunk and no graph.
    Saves only its inputs."""

    @staticmethod
    def forward(ctx, teacher, student, mask, beta, chunk):
        out = student.new_zeros(student.size(0), dtype=torch.promote_types(teacher.dtype, student.dtype))
        with torch.no_grad():
            for sel in _chunks(student.size(0), chunk, None):
                t, s = teacher[sel], student[sel]
                log_m = _jsd_mixture(t, s, beta)
                out[sel] = beta * _xlogy_ratio(t, log_m) + (1.0 - beta) * _xlogy_ratio(s, log_m)
        out.masked_fill_(~mask, 0.0)
        ctx.save_for_backward(teacher, student, mask)
        ctx.options = (beta, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        teacher, student, mask = ctx.saved_tensors
        beta, chunk = ctx.options
        need_t, need_s = ctx.needs_input_grad[:2]
        g = grad_out.masked_fill(~mask, 0.0).unsqueeze(-1)
        grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_t else None
        grad_s = torch.empty_like(student, memory_format=torch.contiguous_format) if need_s else None
        for sel in _chunks(student.size(0), chunk, None):
            t, s = teacher[sel], student[sel]
            log_m = _jsd_mixture(t, s, beta)
            if need_t:
                grad_t[sel] = _weighted_log_ratio(t, log_m).mul_(beta * g[sel])
            if need_s:
                grad_s[sel] = _weighted_log_ratio(s, log_m).mul_((1.0 - beta) * g[sel])
        return grad_t, grad_s, None, None, None


def jsd_from_log_probs(student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor, beta: float = 0.5) -> Tensor:
    """Per-position generalized Jensen-Shannon divergence (GKD, Agarwal et al., ICLR 2024)::

        JSD_B(p_t || p_s) = B * KL(p_t || M) + (1 - B) * KL(p_s || M),   M = B * p_t + (1 - B) * p_s

    with ``log M = logaddexp(log B + log p_t, log(1-B) + log p_s)``, chunk by chunk (one
    chunk-sized ``log M`` at a time, in forward and in backward, whose gradient is written
    out: :class:`_JSD`).  ``B`` in (0, 1) is the teacher's
    share of the mixture; the value is the unscaled ``JSD_B`` (GKD's), whose limits are
    ``JSD_B / B -> KL(p_t || p_s)`` (forward KL) as ``B -> 0`` and
    ``JSD_B / (1 - B) -> KL(p_s || p_t)`` (reverse KL) as ``B -> 1``: the end points
    themselves are the divergences ``kl`` and ``rkl``.  Zero iff ``p_t = p_s``;
    symmetric at ``B = 0.5``; the gradient reaches ``p_s`` through both terms
    (it appears in ``M``).  ``0 * log 0 = 0`` on either side."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}; its limits are the kl (beta -> 0) and rkl "
                         f"(beta -> 1) divergences")
    check_not_released(student_lprobs, teacher_lprobs)
    out = _JSD.apply(_flat(teacher_lprobs), _flat(student_lprobs), mask.reshape(-1), beta,
                     chunk_rows(student_lprobs.size(-1)))
    return out.view(mask.shape)


def divergence_from_log_probs(
    student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor, divergence: str = "kl", skew_lambda: float = 0.1,
    release_teacher: bool = False, jsd_beta: float = 0.5, rows: Optional[Tensor] = None,
) -> Tensor:
    """Per-position divergence ``[B, T]`` named by ``divergence`` (:data:`DIVERGENCES`);
    ``release_teacher`` and ``rows`` are those of :func:`kl_from_log_probs` (``kl`` only); ``skew_lambda``
    parametrises ``skl``/``srkl``, ``jsd_beta`` ``jsd``."""
    if divergence == "kl":
        return kl_from_log_probs(student_lprobs, teacher_lprobs, mask, release_teacher, rows)
    if rows is not None:
        raise ValueError(f"rows restricts the kl divergence only, not {divergence!r}")
    if divergence == "rkl":
        return reverse_kl_from_log_probs(student_lprobs, teacher_lprobs, mask)
    if divergence in ("skl", "srkl"):
        return skew_kl_from_log_probs(student_lprobs, teacher_lprobs, mask, skew_lambda, reverse=divergence == "srkl")
    if divergence == "jsd":
        return jsd_from_log_probs(student_lprobs, teacher_lprobs, mask, jsd_beta)
    raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
