"""Shared helpers of the loss functions: softmaxes, the pad mask, the
label-smoothed NLL (summed and per position), its floor, the ``0 * log 0``
convention, the ensemble average in log space and the top-1 agreement.

Conventions (those of fairseq's criterions), followed by every module of
:mod:`fairseq_kd.losses`:

* ``student_logits`` and ``teacher_logits`` are ``[B, T, V]`` scores before the
  softmax; ``target`` is ``[B, T]`` token ids, right-padded with ``padding_idx``.
* Every loss is a **sum** over the non-pad target positions (EOS included);
  the trainer divides by ``sample_size`` (the number of target tokens).
* Softmaxes are taken in float32 when the input is half or bfloat16 (as
  fairseq's ``utils.log_softmax`` does under ``--fp16``).
* A teacher "logit" may equally be a log-probability (for instance the
  log-space average of an ensemble): ``log_softmax`` of a log-distribution is
  the distribution itself, so every function accepts either.
"""

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


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
    """Per-position ``sum_v p (log p - log q)`` with ``0 * log 0 = 0``."""
    p = p_log.exp()
    pointwise = p * (p_log - q_log)
    return torch.where(p > 0, pointwise, torch.zeros_like(pointwise)).sum(dim=-1)


def log_mean_exp(stacked_lprobs: Tensor, dim: int = 0) -> Tensor:
    """``log(mean_i exp(x_i))`` along ``dim``: the probability average of an
    ensemble, computed in log space."""
    return torch.logsumexp(stacked_lprobs, dim=dim) - math.log(stacked_lprobs.size(dim))


def top1_agreement(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, padding_idx: int
) -> Tensor:
    """Number of non-pad positions where student and teacher have the same argmax."""
    mask = non_pad_mask(target, padding_idx)
    same = student_logits.argmax(dim=-1).eq(teacher_logits.argmax(dim=-1))
    return (same & mask).sum()
