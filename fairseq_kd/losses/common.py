"""Shared helpers of the loss functions: softmaxes, the pad mask, the label-smoothed NLL (summed and per
position), its floor, the KD mix, the ``0 * log 0`` convention, the ensemble average in log space and the
top-1 agreement.  The conventions every module of :mod:`fairseq_kd.losses` follows are in its package
docstring.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_kd.losses.chunked import _chunks, _flat, chunk_rows


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


def probs(logits: Tensor) -> Tensor:
    """``softmax(logits)`` over the last dimension, float32 for half or bfloat16
    inputs and float64 for float64 inputs (the dtype rules of :func:`log_probs`)."""
    return log_probs(logits).exp()


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


class _LabelSmoothedNLLFromLogits(torch.autograd.Function):
    """:func:`label_smoothed_nll_per_position` of ``log_probs(logits)``, keeping only the log-probabilities,
    whose storage backward turns into the gradient w.r.t. the logits chunk by chunk (no other
    full-size tensor).  Each chunk's gradient is what autograd computes for the same expression, op for
    op: the log-probabilities' gradient (the gather's and the sum's, added), then torch's own
    log-softmax backward."""

    @staticmethod
    def forward(ctx, logits, target, padding_idx, epsilon):
        lprobs = log_probs(logits)
        ls, nll = label_smoothed_nll_per_position(lprobs, target, padding_idx, epsilon)
        nll = nll.clone() if nll is ls else nll  # epsilon 0: one tensor, but only ``ls`` is differentiable
        ctx.save_for_backward(lprobs, target)
        ctx.options = (padding_idx, epsilon, logits.dtype)
        ctx.mark_non_differentiable(nll)
        return ls, nll

    @staticmethod
    def backward(ctx, grad_ls, grad_nll):
        lprobs, target = ctx.saved_tensors
        padding_idx, epsilon, dtype = ctx.options
        vocab = lprobs.size(-1)
        eps_i = epsilon / (vocab - 1)
        keep = non_pad_mask(target, padding_idx).reshape(-1)
        grad_ls, target = grad_ls.reshape(-1), target.reshape(-1, 1)
        # the gradients autograd gives the log-probabilities: -c * g on the target, -eps_i * g everywhere
        on_target = -(grad_ls * (1.0 - epsilon - eps_i) if epsilon != 0.0 else grad_ls).masked_fill(~keep, 0.0)
        everywhere = -(grad_ls * eps_i).masked_fill(~keep, 0.0) if epsilon != 0.0 else None
        flat = _flat(lprobs)  # overwritten chunk by chunk: a second backward fails (the saved tensor changed)
        for sel in _chunks(flat.size(0), chunk_rows(vocab), None):
            out = flat[sel]
            if everywhere is None:
                grad = torch.zeros_like(out).scatter_add_(-1, target[sel], on_target[sel].unsqueeze(-1))
            else:
                grad = everywhere[sel].unsqueeze(-1).expand_as(out) + torch.zeros_like(out).scatter_add_(
                    -1, target[sel], on_target[sel].unsqueeze(-1))
            flat[sel] = torch._log_softmax_backward_data(grad, out, -1, out.dtype)
        return lprobs.to(dtype), None, None, None


def label_smoothed_nll_from_logits(
    logits: Tensor, target: Tensor, padding_idx: int, epsilon: float
) -> Tuple[Tensor, Tensor]:
    """Per-position ``(loss, nll)`` ``[B, T]`` of :func:`label_smoothed_nll_per_position` on
    ``log_probs(logits)`` (the same values), differentiable in ``loss`` only: saves one
    ``[B, T, V]`` tensor, in whose storage backward builds the logits' gradient."""
    return _LabelSmoothedNLLFromLogits.apply(logits, target, padding_idx, epsilon)


def kd_scale(temperature: float = 1.0, temperature_scale: bool = True) -> float:
    """The factor ``s`` of the KD term: ``tau^2`` when ``temperature_scale`` (Hinton et al.'s convention,
    which keeps gradient magnitudes comparable across temperatures), else 1."""
    return temperature**2 if temperature_scale else 1.0


def kd_mix(ls_loss: Optional[Tensor], kd_loss, alpha: float, scale: float = 1.0, ls_weight: Optional[float] = None):
    """The KD criterions' combination ``(1 - alpha) * LS + alpha * s * KD`` (``s = scale``, :func:`kd_scale`).

    ``ls_weight`` replaces ``1 - alpha`` as the LS term's weight (Selective KD's ``LS + alpha * KD``); the LS
    term is left out when ``ls_loss`` is None (a decoder pass that has none) or its weight is ``1 - 1``."""
    kd = alpha * scale * kd_loss
    weight = 1.0 - alpha if ls_weight is None else ls_weight
    if ls_loss is None or (ls_weight is None and alpha == 1.0):
        return kd
    return weight * ls_loss + kd


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


def _xlogy_ratio(p_log: Tensor, q_log: Tensor) -> Tensor:
    """Per-position ``sum_v p (log p - log q)`` with ``0 * log 0 = 0``.

    ``p * (log p - log q)`` is NaN exactly where ``p = 0`` (``0 * -inf`` or
    ``0 * nan``), so ``nan_to_num`` (keeping the infinities) is that
    convention without a comparison over the vocabulary."""
    pointwise = p_log.exp() * (p_log - q_log)
    return pointwise.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1)


def log_mean_exp(stacked_lprobs: Tensor, dim: int = 0) -> Tensor:
    """``log(mean_i exp(x_i))`` along ``dim``: the probability average of an
    ensemble, computed in log space."""
    return torch.logsumexp(stacked_lprobs, dim=dim) - math.log(stacked_lprobs.size(dim))


def top1_agreement(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, padding_idx: int
) -> Tensor:
    """Number of non-pad positions where student and teacher have the same argmax."""
    return agreement_from_ids(student_logits.argmax(dim=-1), teacher_logits.argmax(dim=-1), target, padding_idx)


def agreement_from_ids(student_ids: Tensor, teacher_ids: Tensor, target: Tensor, padding_idx: int) -> Tensor:
    """:func:`top1_agreement` from already computed argmaxes ``[B, T]`` (a tensor: no device sync)."""
    return (student_ids.eq(teacher_ids) & non_pad_mask(target, padding_idx)).sum()


def teacher_log_probs(teacher: Tensor, temperature: float = 1.0, normalized: bool = False) -> Tensor:
    """The teacher's (tempered) log-probabilities: ``teacher`` itself when it already
    holds normalised log-probabilities (``normalized``, as the live teacher returns)
    and ``temperature == 1``, else :func:`log_probs` of it."""
    if normalized and temperature == 1.0:
        return teacher.float() if teacher.dtype in (torch.float16, torch.bfloat16) else teacher
    return log_probs(teacher, temperature)
