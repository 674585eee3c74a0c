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
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "log_probs",
    "label_smoothed_nll",
    "kl_divergence",
    "top1_agreement",
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


def kl_from_log_probs(
    student_lprobs: Tensor, teacher_lprobs: Tensor, mask: Tensor
) -> Tensor:
    """Per-position ``KL(p_t || p_s)`` (``[B, T]``, zero where ``mask`` is False)."""
    teacher_probs = teacher_lprobs.exp()
    # 0 * log 0 = 0: a teacher that puts exactly zero mass on a token (-inf
    # log-probability) must not turn the sum into NaN.
    pointwise = teacher_probs * (teacher_lprobs - student_lprobs)
    pointwise = torch.where(teacher_probs > 0, pointwise, torch.zeros_like(pointwise))
    return pointwise.sum(dim=-1).masked_fill(~mask, 0.0)


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
):
    """Word-level KD: ``(1 - alpha) * LS-NLL + alpha * s * KL(p_t^tau || p_s^tau)``.

    ``s = tau^2`` when ``temperature_scale`` (Hinton et al.'s convention, which
    keeps gradient magnitudes comparable across temperatures) and 1 otherwise.
    The student's log-softmax is computed once and shared by both terms when
    ``tau == 1``.  Returns ``(loss, nll_loss, kd_loss)`` sums;
    ``kd_loss`` is the unscaled KL sum (``None`` without a teacher, in which
    case ``loss`` is the plain LS-NLL).
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
    kd_loss = kl_from_log_probs(
        student_soft, log_probs(teacher_logits, temperature), mask
    ).sum()
    scale = temperature**2 if temperature_scale else 1.0
    loss = (1.0 - alpha) * ls_loss + alpha * scale * kd_loss
    return loss, nll_loss, kd_loss


def log_mean_exp(stacked_lprobs: Tensor, dim: int = 0) -> Tensor:
    """``log(mean_i exp(x_i))`` along ``dim``: the probability average of an
    ensemble, computed in log space."""
    return torch.logsumexp(stacked_lprobs, dim=dim) - math.log(stacked_lprobs.size(dim))
