"""Binarize the merged teacher targets with the data directory's own target
dictionary into the same directory under a new subset name
(``DATA/NAME.SRC-TGT.TGT.{bin,idx}``), after checking the line count against
the decoded split's source side."""

import logging
import os
from typing import Optional

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import count_lines, first_lone_carriage_return

logger = logging.getLogger("fairseq_kd.decoding")


def binarize(
    input_path: str,
    data: str,
    name: str,
    src: Optional[str] = None,
    tgt: Optional[str] = None,
    split: str = "train",
    workers: int = 1,
    dataset_impl: str = "mmap",
) -> str:
    """Binarize ``input_path`` (BPE'd teacher targets of ``split``) with
    ``DATA/dict.TGT.txt`` into ``DATA/NAME.SRC-TGT.TGT.{bin,idx}``; returns the prefix."""
    from fairseq.data import Dictionary, data_utils

    from fairseq_kd.data.binarize import binarize_text
    from fairseq_kd.data.teacher_target import gold_target_prefix, teacher_target_prefix

    task_src, task_tgt = src, tgt
    if task_src is None or task_tgt is None:
        task_src, task_tgt = data_utils.infer_language_pair(data)
        if task_src is None:
            raise DistillationError(f"cannot infer the language pair of {data}: pass --source-lang and --target-lang")
    if name == split or "." in name:
        raise DistillationError(f"--name {name!r} must differ from the split name and contain no '.'")
    if not os.path.isfile(input_path):
        raise DistillationError(f"{input_path} not found; run `python -m fairseq_kd.decoding merge` first")
    dict_path = os.path.join(data, f"dict.{task_tgt}.txt")
    if not os.path.isfile(dict_path):
        raise DistillationError(f"{dict_path} not found; --data must be the binarized data directory")
    tgt_dict = Dictionary.load(dict_path)
    n_lines = count_lines(input_path)
    lone_cr = first_lone_carriage_return(input_path)
    if lone_cr is not None:  # fairseq would read two lines there: the count check below would not see it
        raise DistillationError(
            f"{input_path}:{lone_cr}: a carriage return inside the line; replace it by a space "
            f"(python -m fairseq_kd.decoding merge writes clean lines) and re-run"
        )
    gold = gold_target_prefix(data, split, task_src, task_tgt)
    src_prefix = gold[: -len(task_tgt)] + task_src
    src_ds = data_utils.load_indexed_dataset(src_prefix, None, None)
    if src_ds is None:
        raise DistillationError(f"{src_prefix}.bin/.idx not found; --split must name the decoded split of --data")
    if len(src_ds) != n_lines:
        raise DistillationError(
            f"{input_path} has {n_lines} lines but the {split} source {src_prefix}.bin has {len(src_ds)}; "
            f"merge the teacher's translations of exactly this split"
        )
    prefix = teacher_target_prefix(data, name, task_src, task_tgt)
    summary = binarize_text(input_path, tgt_dict, prefix, workers=workers, dataset_impl=dataset_impl)
    logger.info("binarized %s -> %s.{bin,idx}: %s", input_path, prefix, summary)
    return prefix
