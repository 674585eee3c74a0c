"""What is decoded: a :class:`Corpus` of source sentences (token ids) and,
when known, their BPE'd references, read from a binarized split
(:func:`corpus_from_split`) or from a plain-text, already-BPE'd file
(:func:`corpus_from_text`)."""

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import read_text_lines


@dataclass
class Corpus:
    """Source sentences (token ids) and, when known, their references (BPE'd text)."""

    dataset: object  # fairseq LanguagePairDataset over the source side only
    src_dict: object
    references: Optional[Callable[[int], str]]
    description: str

    def __len__(self) -> int:
        return len(self.dataset)

    def source_text(self, index: int) -> str:
        return self.src_dict.string(self.dataset.src[index])

    def reference_text(self, index: int) -> Optional[str]:
        return self.references(index) if self.references is not None else None

    @classmethod
    def from_lines(cls, src_lines: Sequence[str], ref_lines: Optional[Sequence[str]], src_dict, tgt_dict, description):
        from fairseq.data import LanguagePairDataset

        src = [src_dict.encode_line(line, add_if_not_exist=False, append_eos=True).long() for line in src_lines]
        sizes = np.array([len(s) for s in src], dtype=np.int64)
        dataset = LanguagePairDataset(src, sizes, src_dict, tgt_dict=tgt_dict, shuffle=False)
        refs = None
        if ref_lines is not None:
            ref_lines = [line.strip() for line in ref_lines]
            refs = ref_lines.__getitem__
        return cls(dataset, src_dict, refs, description)


def corpus_from_text(input_path: str, reference_path: Optional[str], src_dict, tgt_dict) -> Corpus:
    """A plain-text, already-BPE'd source file (and optionally its BPE'd references)."""
    src_lines = list(read_text_lines(input_path))
    ref_lines = None
    if reference_path:
        ref_lines = list(read_text_lines(reference_path))
        if len(ref_lines) != len(src_lines):
            raise DistillationError(
                f"{reference_path} has {len(ref_lines)} lines but {input_path} has {len(src_lines)}; "
                f"the references must be aligned with the source line by line"
            )
    return Corpus.from_lines(src_lines, ref_lines, src_dict, tgt_dict, os.path.abspath(input_path))


def corpus_from_split(data: str, split: str, src: str, tgt: str, src_dict, tgt_dict) -> Corpus:
    """The source side (and gold target, as references) of a binarized split."""
    from fairseq.data import LanguagePairDataset, data_utils, indexed_dataset

    prefix = None
    for a, b in ((src, tgt), (tgt, src)):
        candidate = os.path.join(data, f"{split}.{a}-{b}.")
        if indexed_dataset.dataset_exists(candidate + src, impl=None):
            prefix = candidate
            break
    if prefix is None:
        raise DistillationError(
            f"binarized split {os.path.join(data, f'{split}.{src}-{tgt}.{src}')}.bin/.idx not found; "
            f"check --data, --split and --source-lang/--target-lang"
        )
    src_ds = data_utils.load_indexed_dataset(prefix + src, src_dict, None)
    tgt_ds = data_utils.load_indexed_dataset(prefix + tgt, tgt_dict, None)
    if tgt_ds is not None and len(tgt_ds) != len(src_ds):
        raise DistillationError(
            f"{prefix + tgt}.bin has {len(tgt_ds)} lines but {prefix + src}.bin has {len(src_ds)}"
        )
    dataset = LanguagePairDataset(src_ds, src_ds.sizes, src_dict, tgt_dict=tgt_dict, shuffle=False)
    refs = (lambda i: tgt_dict.string(tgt_ds[i])) if tgt_ds is not None else None
    return Corpus(dataset, src_dict, refs, os.path.abspath(prefix + src))
