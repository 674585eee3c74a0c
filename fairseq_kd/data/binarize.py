"""Binarize a text file with an existing dictionary, atomically."""

import os

from fairseq.binarizer import FileBinarizer, VocabularyDatasetBinarizer
from fairseq.data import indexed_dataset


def binarize_text(text_path: str, dictionary, prefix: str, workers: int = 1, dataset_impl: str = "mmap"):
    """Binarize ``text_path`` (one sentence per line, EOS appended) with
    ``dictionary`` into ``prefix.{bin,idx}``; returns fairseq's binarizer summary.

    Both files are written under a temporary prefix and renamed, the index
    last: a reader sees a complete ``.idx``/``.bin`` pair or no ``.idx`` at all.
    """
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    summary = FileBinarizer.multiprocess_dataset(
        text_path, dataset_impl, VocabularyDatasetBinarizer(dictionary, append_eos=True),
        tmp_prefix, vocab_size=len(dictionary), num_workers=workers,
    )
    final_idx, final_bin = indexed_dataset.index_file_path(prefix), indexed_dataset.data_file_path(prefix)
    if os.path.exists(final_idx):
        os.remove(final_idx)
    os.replace(indexed_dataset.data_file_path(tmp_prefix), final_bin)
    os.replace(indexed_dataset.index_file_path(tmp_prefix), final_idx)
    return summary
