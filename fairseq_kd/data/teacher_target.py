"""The teacher's translations of the training data, next to the gold targets.

Sequence-level KD (Kim & Rush, 2016) trains the student on the teacher's
beam-search output.  :class:`TeacherTargetDataset` wraps fairseq's
``LanguagePairDataset`` (source + gold target) and adds, for every example,
the teacher's translation of the same source, binarized with the same target
dictionary (``python -m fairseq_kd.decoding binarize``).  A collated batch
then holds, besides fairseq's usual keys:

* ``teacher_target`` ``[B, T']``: right-padded, each row ending in EOS;
* ``teacher_prev_output_tokens`` ``[B, T']``: the same rows shifted right,
  starting with EOS (teacher forcing on the teacher's prefixes);
* ``teacher_ntokens``: the number of non-pad tokens of ``teacher_target``.

Rows are in the same order as ``target`` and ``net_input`` (fairseq sorts a
batch by source length).  An example whose teacher target is empty (EOS only)
is left out of training: that is how ``merge --on-degenerate drop`` removes a
bad hypothesis while keeping the files line-aligned.
"""

import logging
import os
from typing import Optional

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset, FairseqDataset, data_utils, indexed_dataset

from fairseq_kd.errors import DistillationError

logger = logging.getLogger(__name__)

__all__ = ["TeacherTargetDataset", "teacher_target_prefix", "load_teacher_target"]


def teacher_target_prefix(data_path: str, name: str, src: str, tgt: str) -> str:
    """``DATA/{name}.{src}-{tgt}.{tgt}``: where ``binarize`` writes the teacher targets."""
    return os.path.join(data_path, f"{name}.{src}-{tgt}.{tgt}")


def gold_target_prefix(data_path: str, split: str, src: str, tgt: str, impl=None) -> str:
    """The gold target file of ``split`` as fairseq's translation task finds it."""
    for a, b in ((src, tgt), (tgt, src)):
        prefix = os.path.join(data_path, f"{split}.{a}-{b}.{tgt}")
        if indexed_dataset.dataset_exists(prefix, impl=impl):
            return prefix
    return os.path.join(data_path, f"{split}.{src}-{tgt}.{tgt}")


def load_teacher_target(
    data_path: str, name: str, split: str, src: str, tgt: str, tgt_dict, num_examples: int, impl=None
):
    """Load subset ``name`` (the teacher's translations of ``split``) and check it
    has exactly ``num_examples`` lines; errors name the teacher and gold files."""
    prefix = teacher_target_prefix(data_path, name, src, tgt)
    dataset = None
    for candidate in (prefix, os.path.join(data_path, f"{name}.{tgt}-{src}.{tgt}")):
        dataset = data_utils.load_indexed_dataset(candidate, tgt_dict, impl)
        if dataset is not None:
            prefix = candidate
            break
    if dataset is None:
        raise DistillationError(
            f"teacher target {prefix}.bin/.idx not found; decode the {split} split with the teacher "
            f"and binarize it (python -m fairseq_kd.decoding binarize --data {data_path} --name {name}), "
            f"or fix --teacher-target-subset"
        )
    if len(dataset) != num_examples:
        gold = gold_target_prefix(data_path, split, src, tgt, impl)
        raise DistillationError(
            f"teacher target {prefix}.bin has {len(dataset)} lines but the gold data {gold}.bin has "
            f"{num_examples}: the teacher targets must translate the same {split} split line by line; "
            f"re-run fairseq-kd-decode merge and binarize on it"
        )
    return dataset


class TeacherTargetDataset(BaseWrapperDataset):
    """A ``LanguagePairDataset`` whose examples also carry ``teacher_target``."""

    def __init__(self, dataset, teacher_target, drop_empty: bool = True):
        super().__init__(dataset)
        if len(teacher_target) != len(dataset):
            raise ValueError(
                f"{len(teacher_target)} teacher targets for {len(dataset)} examples"
            )
        self.teacher_target = teacher_target
        self.teacher_sizes = np.asarray(teacher_target.sizes, dtype=np.int64)
        self.drop_empty = drop_empty
        self.pad = dataset.tgt_dict.pad() if dataset.tgt_dict is not None else dataset.src_dict.pad()
        self.eos = dataset.eos

    def _gold_sizes(self) -> Optional[np.ndarray]:
        return self.dataset.tgt_sizes

    def __getitem__(self, index):
        item = self.dataset[index]
        teacher = self.teacher_target[index].long()
        if len(teacher) == 0 or teacher[-1] != self.eos:
            teacher = torch.cat([teacher, teacher.new_tensor([self.eos])])
        item["teacher_target"] = teacher
        return item

    def collater(self, samples, pad_to_length=None):
        batch = self.dataset.collater(samples, pad_to_length=pad_to_length)
        if len(batch) == 0:
            return batch
        by_id = {s["id"]: s["teacher_target"] for s in samples}
        rows = [by_id[i] for i in batch["id"].tolist()]
        left_pad = self.dataset.left_pad_target
        multiple = getattr(self.dataset, "pad_to_multiple", 1)
        batch["teacher_target"] = data_utils.collate_tokens(
            rows, self.pad, self.eos, left_pad, False, pad_to_multiple=multiple
        )
        batch["teacher_prev_output_tokens"] = data_utils.collate_tokens(
            rows, self.pad, self.eos, left_pad, True, pad_to_multiple=multiple
        )
        batch["teacher_ntokens"] = sum(len(r) for r in rows)
        return batch

    # -- sizes: an example is as long as its longest side ------------------------

    def num_tokens(self, index):
        return max(self.dataset.num_tokens(index), int(self.teacher_sizes[index]))

    def num_tokens_vec(self, indices):
        return np.maximum(self.dataset.num_tokens_vec(indices), self.teacher_sizes[indices])

    def size(self, index):
        src, tgt = self.dataset.size(index)
        return src, max(tgt, int(self.teacher_sizes[index]))

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        # FairseqDataset's implementation, so that num_tokens_vec above is used
        return FairseqDataset.batch_by_size(
            self, indices, max_tokens, max_sentences, required_batch_size_multiple
        )

    def filter_indices_by_size(self, indices, max_sizes):
        gold = self._gold_sizes()
        tgt_sizes = self.teacher_sizes if gold is None else np.maximum(gold, self.teacher_sizes)
        indices, ignored = data_utils.filter_paired_dataset_indices_by_size(
            self.dataset.src_sizes, tgt_sizes, indices, max_sizes
        )
        if self.drop_empty:
            empty = self.teacher_sizes[indices] <= 1
            if empty.any():
                logger.info(
                    "%d examples with an empty teacher target (dropped at merge time) are left out",
                    int(empty.sum()),
                )
                indices = indices[~empty]
        return indices, ignored

    @property
    def supports_prefetch(self):
        return getattr(self.dataset, "supports_prefetch", False) and getattr(
            self.teacher_target, "supports_prefetch", False
        )

    def prefetch(self, indices):
        self.dataset.prefetch(indices)
        self.teacher_target.prefetch(indices)
