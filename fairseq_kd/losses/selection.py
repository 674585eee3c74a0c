"""Selective KD (Wang et al., ACL 2021): distil only the hardest tokens.

The token selection (batch or global threshold) and the pre-0.10 fairseq
label smoothing (``eps / V``) the reference code uses.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_kd.losses.common import log_probs, non_pad_mask


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
