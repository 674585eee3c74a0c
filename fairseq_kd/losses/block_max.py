"""Argmax and top-k ids over a vocabulary through block maxima.

``torch.argmax`` and ``torch.topk`` over the last dimension of a ``[tokens, V]`` tensor track an index
per element and are not vectorised on the CPU: measured here (one thread, 512 x 8,000 float32) they
cost 4-6 ms, more than the ``exp`` of the same tensor and ten times its ``amax``.  The KD losses call
them on every pass (the agreement statistics, TIE-KD's ranking and next prefix, the cache build).

Both functions here cut the last dimension into blocks of ``W`` entries (the largest of 128, 64, 32,
16, 8 that divides ``V``; fairseq pads its dictionaries to a multiple of 8), take every block's
maximum in one vectorised ``amax`` pass, and then look for the answer among the ``k`` best blocks
only.  That is exact: an entry outside the ``k`` blocks with the largest maxima is at most each of
those ``k`` maxima, so ``k`` entries of those blocks are at least as large as it.

* :func:`argmax_ids` equals ``x.argmax(-1)`` everywhere, ties and NaN included: the first block
  holding the maximum holds its first occurrence (``amax`` and ``argmax`` both propagate NaN, so a
  row with NaN gives the index of its first NaN, as ``torch.argmax`` does).
* :func:`topk_ids` returns the ids of ``x.topk(k, -1)`` (sorted by decreasing value); among tied
  values the order is unspecified, as it is for ``torch.topk``.

Neither is differentiable (ids only): gather the values with ``x.gather(-1, ids)``, which
backpropagates exactly as ``torch.topk``'s values do.  Small or oddly sized vocabularies fall back
to ``torch.argmax`` / ``torch.topk``.
"""

from typing import Optional

import torch
from torch import Tensor

#: block widths tried, largest first (fewer blocks, one cheaper second stage)
BLOCK_WIDTHS = (128, 64, 32, 16, 8)


def block_width(vocab_size: int, k: int = 1) -> Optional[int]:
    """Width of the blocks for ``vocab_size`` entries (None: use torch's own kernels), such that there are
    at least 8 blocks and the ``k`` best blocks hold at most a quarter of the entries."""
    for width in BLOCK_WIDTHS:
        if vocab_size % width == 0 and vocab_size // width >= max(8, 4 * k):
            return width
    return None


@torch.no_grad()
def argmax_ids(x: Tensor) -> Tensor:
    """``x.argmax(dim=-1)`` (the first maximum of every row), computed through block maxima."""
    vocab = x.size(-1)
    width = block_width(vocab)
    if width is None:
        return x.argmax(dim=-1)
    lead = x.shape[:-1]
    best = x.reshape(*lead, vocab // width, width).amax(dim=-1).argmax(dim=-1, keepdim=True)  # first best block
    candidates = best * width + torch.arange(width, device=x.device)  # [..., W]
    return candidates.gather(-1, x.gather(-1, candidates).argmax(dim=-1, keepdim=True)).squeeze(-1)


@torch.no_grad()
def topk_ids(x: Tensor, k: int) -> Tensor:
    """The ids ``[..., k]`` of ``x.topk(k, dim=-1)``, by decreasing value, computed through block maxima."""
    vocab = x.size(-1)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the size of the last dimension), got {k}")
    if k == 1:
        return argmax_ids(x).unsqueeze(-1)
    width = block_width(vocab, k)
    if width is None:
        return x.topk(k, dim=-1)[1]
    lead = x.shape[:-1]
    blocks = x.reshape(*lead, vocab // width, width).amax(dim=-1).topk(k, dim=-1, sorted=False)[1]
    candidates = (blocks.unsqueeze(-1) * width + torch.arange(width, device=x.device)).flatten(-2)  # [..., k*W]
    return candidates.gather(-1, x.gather(-1, candidates).topk(k, dim=-1)[1])
