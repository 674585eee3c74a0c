"""Bitext and source-only examples in one training set, and the batch surgery
that separates them again.

:class:`MixedSourceDataset` concatenates the training split (a
``LanguagePairDataset`` with gold targets) and a *source-only* split (the
same dictionaries, no reference; binarized with ``fairseq-preprocess
--only-source`` or ``python -m fairseq_kd.unlabeled``).  Indices below
``num_bitext`` are bitext examples, the others source-only ones.  A collated
batch is an ordinary fairseq translation batch plus

* ``has_reference`` ``[B]`` bool: True for the rows with a gold target;
* ``ntokens``: the number of *gold* target tokens (the bitext rows only).

Source-only rows carry, as ``target``/``prev_output_tokens``, either their
offline label (the teacher's translation, binarized next to them by
``python -m fairseq_kd.decoding binarize``) or, when the prefix is made on
the fly during training, a placeholder ``[EOS]`` that
:func:`with_prefixes` replaces.  Why one batch with a marker rather than
separate bitext and source-only batches: fairseq's batching, shuffling,
checkpointed iterator position and ``--update-freq`` then work unchanged,
and a batch mixes both kinds in proportion to their sizes, so no ratio has to
be tuned for the mix to be even over an epoch.

The task splits each batch with :func:`select_rows` (rows of one kind,
padding columns no row needs removed, so a sub-batch is exactly the batch
fairseq would have collated from those examples alone) and builds the
source-only sub-batch on generated prefixes with :func:`with_prefixes`.
"""

import logging
from typing import List, Optional, Sequence

import numpy as np
import torch
from fairseq.data import FairseqDataset, LanguagePairDataset, data_utils
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["MixedSourceDataset", "select_rows", "with_prefixes", "trim_padding", "source_only_dataset"]


class MixedSourceDataset(FairseqDataset):
    """``bitext`` examples followed by ``source_only`` examples.

    ``source_only`` is a ``LanguagePairDataset`` whose target is None (the
    prefixes are generated during training) or the offline labels.  With
    labels, an example whose label is empty (EOS only: ``fairseq-kd-decode merge
    --on-degenerate drop``) is left out of training.  Without labels the
    batching length of a source-only example is its source length: the
    generated prefix is not known yet, and a translation is about as long as
    its source.
    """

    def __init__(self, bitext: LanguagePairDataset, source_only: LanguagePairDataset):
        if not isinstance(bitext, LanguagePairDataset) or bitext.tgt is None:
            raise ValueError("the bitext part must be a LanguagePairDataset with targets")
        if not isinstance(source_only, LanguagePairDataset):
            raise ValueError("the source-only part must be a LanguagePairDataset")
        self.bitext = bitext
        self.source_only = source_only
        self.num_bitext = len(bitext)
        self.has_labels = source_only.tgt is not None
        self.pad = bitext.tgt_dict.pad()
        self.eos = bitext.eos
        self.shuffle = bitext.shuffle
        src_only_sizes = np.asarray(source_only.src_sizes, dtype=np.int64)
        label_sizes = (
            np.asarray(source_only.tgt_sizes, dtype=np.int64) if self.has_labels else None
        )
        self.src_sizes = np.concatenate([np.asarray(bitext.src_sizes, dtype=np.int64), src_only_sizes])
        # lengths for batching: the label, or the source as an estimate of the prefix
        self.tgt_sizes = np.concatenate(
            [np.asarray(bitext.tgt_sizes, dtype=np.int64),
             label_sizes if self.has_labels else src_only_sizes]
        )
        # lengths for the max-positions filter: a generated prefix is capped when generated
        self._filter_tgt_sizes = np.concatenate(
            [np.asarray(bitext.tgt_sizes, dtype=np.int64),
             label_sizes if self.has_labels else np.zeros_like(src_only_sizes)]
        )

    def __len__(self):
        return self.num_bitext + len(self.source_only)

    def __getitem__(self, index):
        index = int(index)
        if index < self.num_bitext:
            item = self.bitext[index]
        else:
            item = self.source_only[index - self.num_bitext]
            if item.get("target") is None:
                item["target"] = torch.tensor([self.eos], dtype=torch.long)
        item["id"] = index
        return item

    def collater(self, samples, pad_to_length=None):
        batch = self.bitext.collater(samples, pad_to_length=pad_to_length)
        if len(batch) == 0:
            return batch
        has_reference = batch["id"] < self.num_bitext
        batch["has_reference"] = has_reference
        batch["ntokens"] = int(batch["target"][has_reference].ne(self.pad).sum())
        return batch

    # -- sizes -------------------------------------------------------------------

    @property
    def sizes(self):
        return np.vstack((self.src_sizes, self.tgt_sizes)).T

    def num_tokens(self, index):
        return max(int(self.src_sizes[index]), int(self.tgt_sizes[index]))

    def num_tokens_vec(self, indices):
        return np.maximum(self.src_sizes[indices], self.tgt_sizes[indices])

    def size(self, index):
        return int(self.src_sizes[index]), int(self.tgt_sizes[index])

    def ordered_indices(self):
        """Shuffled (under fairseq's per-epoch numpy seed), then sorted by target
        and source length, as ``LanguagePairDataset`` does without buckets."""
        if self.shuffle:
            indices = np.random.permutation(len(self)).astype(np.int64)
        else:
            indices = np.arange(len(self), dtype=np.int64)
        indices = indices[np.argsort(self.tgt_sizes[indices], kind="mergesort")]
        return indices[np.argsort(self.src_sizes[indices], kind="mergesort")]

    def filter_indices_by_size(self, indices, max_sizes):
        indices, ignored = data_utils.filter_paired_dataset_indices_by_size(
            self.src_sizes, self._filter_tgt_sizes, indices, max_sizes
        )
        if self.has_labels:
            empty = (indices >= self.num_bitext) & (self.tgt_sizes[indices] <= 1)
            if empty.any():
                logger.info(
                    "%d source-only examples with an empty label (dropped at merge time) are left out",
                    int(empty.sum()),
                )
                indices = indices[~empty]
        return indices, ignored

    @property
    def supports_prefetch(self):
        return False

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        for part in (self.bitext, self.source_only):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)


# ---------------------------------------------------------------------------
# Batch surgery
# ---------------------------------------------------------------------------


def trim_padding(tokens: Tensor, pad: int, left_pad: bool) -> Tensor:
    """Drop the padding columns that no row needs (leading ones when
    ``left_pad``, trailing ones otherwise)."""
    if tokens.numel() == 0:
        return tokens
    used = tokens.ne(pad).any(dim=0).nonzero()
    if len(used) == 0:
        return tokens[:, :0]
    if left_pad:
        return tokens[:, int(used[0]):]
    return tokens[:, : int(used[-1]) + 1]


def select_rows(
    sample, rows: Tensor, pad: int, left_pad_source: bool = True, left_pad_target: bool = False
):
    """The sub-batch of ``sample`` made of ``rows`` (a LongTensor of row
    indices), with the padding columns it no longer needs removed.

    Every tensor of ``net_input`` whose first dimension is the batch is
    indexed; ``ntokens`` counts the selected target's non-pad tokens and
    ``has_reference`` is dropped (a sub-batch is of one kind).
    """
    batch_size = sample["id"].size(0)

    def pick(value):
        if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch_size:
            return value.index_select(0, rows)
        return value

    net_input = {key: pick(value) for key, value in sample["net_input"].items()}
    net_input["src_tokens"] = trim_padding(net_input["src_tokens"], pad, left_pad_source)
    sub = {key: pick(value) for key, value in sample.items() if key not in ("net_input", "has_reference")}
    sub["net_input"] = net_input
    sub["nsentences"] = int(rows.numel())
    target = sub.get("target")
    if target is not None:
        target = trim_padding(target, pad, left_pad_target)
        sub["target"] = target
        if "prev_output_tokens" in net_input:
            width = target.size(1)
            prev = net_input["prev_output_tokens"]
            net_input["prev_output_tokens"] = prev[:, prev.size(1) - width:] if left_pad_target else prev[:, :width]
        sub["ntokens"] = int(target.ne(pad).sum())
    return sub


def with_prefixes(
    sample, prefixes: Sequence[Tensor], pad: int, eos: int, left_pad_target: bool = False
):
    """``sample`` (one row per prefix, same order) with ``prefixes`` as its
    target: ``target`` holds them, ``prev_output_tokens`` the same rows
    shifted right behind EOS (teacher forcing on the prefixes), ``ntokens``
    their token count.  Every prefix must end with EOS."""
    rows: List[Tensor] = [p.long() for p in prefixes]
    if len(rows) != sample["id"].size(0):
        raise ValueError(f"{len(rows)} prefixes for a batch of {sample['id'].size(0)}")
    for row in rows:
        if row.numel() == 0 or int(row[-1]) != eos:
            raise ValueError("every prefix must end with EOS")
    target = data_utils.collate_tokens(rows, pad, eos, left_pad_target, False)
    prev = data_utils.collate_tokens(rows, pad, eos, left_pad_target, True)
    out = dict(sample)
    out["net_input"] = dict(sample["net_input"], prev_output_tokens=prev)
    out["target"] = target
    out["ntokens"] = int(target.ne(pad).sum())
    return out


def source_only_dataset(
    source: LanguagePairDataset, labels: Optional[object], tgt_dict
) -> LanguagePairDataset:
    """The source side of ``source`` (a ``LanguagePairDataset``; a target side
    it may have is ignored) with ``labels`` as its target, or none; padding and
    EOS settings are kept."""
    return LanguagePairDataset(
        source.src, source.src_sizes, source.src_dict,
        labels, None if labels is None else np.asarray(labels.sizes), tgt_dict,
        left_pad_source=source.left_pad_source, left_pad_target=source.left_pad_target,
        eos=source.eos, shuffle=source.shuffle, pad_to_multiple=getattr(source, "pad_to_multiple", 1),
    )
