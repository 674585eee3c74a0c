"""What a teacher saw: the fingerprint of a split's content and of the options that change the teacher's
input, and the languages a teacher checkpoint was trained on; recorded in a cache's manifest and compared
with the training run (docs/teacher_cache.md, "What the cache records").
"""

import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_kd.errors import DistillationError

#: fairseq's dataset wrappers whose effect is one of :func:`input_options`
_TRANSFORMS = ("StripTokenDataset", "TruncateDataset", "AppendTokenDataset", "PrependTokenDataset")
#: segmentation models looked for in the data directory and beside it (fairseq_kd.prepare, prepare_bpe)
SEGMENTATION_FILES = ("spm.model", "sentencepiece.bpe.model", "bpecodes", "codes")
_CHUNK = 1 << 23


def _base(dataset):
    while type(dataset).__name__ in _TRANSFORMS and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def _update_tokens(sizes: List[np.ndarray], tokens, dataset) -> None:
    """Feed ``dataset``'s example lengths to ``sizes`` and its token ids (int32) to the hash ``tokens``."""
    dataset = _base(dataset)
    if type(dataset).__name__ == "ConcatDataset" and all(r == 1 for r in getattr(dataset, "sample_ratios", [1])):
        for part in dataset.datasets:
            _update_tokens(sizes, tokens, part)
        return
    index, buffer = getattr(dataset, "_index", None), getattr(dataset, "_bin_buffer", None)
    if index is not None and buffer is not None:  # fairseq's mmap dataset: the tokens lie back to back
        dtype, n = np.dtype(index.dtype), np.asarray(index.sizes, dtype=np.int64)
        pointers = np.asarray(index._pointers, dtype=np.int64)
        if len(n) == 0 or (pointers[0] == 0 and np.array_equal(np.diff(pointers), n[:-1] * dtype.itemsize)):
            total = int(n.sum())
            for start in range(0, total, _CHUNK):
                count = min(_CHUNK, total - start)
                chunk = np.frombuffer(buffer, dtype=dtype, count=count, offset=start * dtype.itemsize)
                tokens.update(chunk.astype("<i4").tobytes())
            sizes.append(n)
            return
    lengths = []
    for i in range(len(dataset)):
        item = np.asarray(dataset[i], dtype="<i4")
        tokens.update(item.tobytes())
        lengths.append(item.size)
    sizes.append(np.asarray(lengths, dtype=np.int64))


def token_digest(dataset) -> str:
    """sha256 of a side of a split: its examples' lengths and token ids in example order (before the
    truncation and end-of-sentence wrappers, which :func:`input_options` records)."""
    sizes: List[np.ndarray] = []
    tokens = hashlib.sha256()
    _update_tokens(sizes, tokens, dataset)
    lengths = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
    return hashlib.sha256(lengths.astype("<i8").tobytes() + tokens.digest()).hexdigest()


def input_options(task_cfg) -> Dict:
    """The task options that change what the teacher is fed from the same binarized split."""
    truncate = bool(getattr(task_cfg, "truncate_source", False))
    return {
        "truncate_source": truncate,
        "max_source_positions": int(task_cfg.max_source_positions) if truncate else None,
        "append_source_id": bool(getattr(task_cfg, "append_source_id", False)),
    }


def describe_options(options: Dict) -> str:
    if not options.get("truncate_source"):
        text = "full sources (no --truncate-source)"
    else:
        text = f"--truncate-source --max-source-positions {options.get('max_source_positions')}"
    return text + (" --append-source-id" if options.get("append_source_id") else "")


def segmentation_model(data_dir: str) -> Optional[Dict]:
    """``{"file", "sha256"}`` of the segmentation model found in or beside the data directory, or None."""
    from fairseq_kd.hashing import sha256_of

    data_dir = str(data_dir).split(":")[0]
    for folder in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
        for name in SEGMENTATION_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return {"file": name, "sha256": sha256_of(path)}
    return None


def split_fingerprint(pair_dataset, task_cfg, data_dir: str) -> Dict:
    """The manifest's ``fingerprint``: source and target token digests, input options, segmentation model."""
    return {
        "source_sha256": token_digest(pair_dataset.src),
        "target_sha256": token_digest(pair_dataset.tgt),
        "options": input_options(task_cfg),
        "segmentation": segmentation_model(data_dir),
    }


def check_fingerprint(cache_dir: str, recorded: Optional[Dict], current: Dict, data_dir: str, split: str) -> None:
    """Refuse a cache whose teacher saw other input than this run feeds the student (one line)."""
    rebuild = f"build the cache for this run (fairseq-kd-build-cache build --data {data_dir} --split {split} ...)"
    if not recorded:
        raise DistillationError(f"teacher cache {cache_dir} records no fingerprint of its split; {rebuild}")
    if recorded.get("options") != current["options"]:
        raise DistillationError(
            f"teacher cache {cache_dir}: its teacher saw {describe_options(recorded.get('options') or {})}, this "
            f"run feeds {describe_options(current['options'])}; pass the cache's options, or build the cache "
            f"with this run's (fairseq-kd-build-cache build ... {describe_options(current['options'])})"
        )
    for side in ("source", "target"):
        if recorded.get(f"{side}_sha256") != current[f"{side}_sha256"]:
            raise DistillationError(
                f"teacher cache {cache_dir} was built on other {side} sentences (or another order) than the "
                f"{split} split of {data_dir}; {rebuild}"
            )
    seg_old, seg_new = recorded.get("segmentation"), current.get("segmentation")
    if seg_old and seg_new and seg_old != seg_new:
        raise DistillationError(
            f"teacher cache {cache_dir} was built with another segmentation model ({seg_old['file']}, sha256 "
            f"{seg_old['sha256'][:12]}...) than {data_dir}'s ({seg_new['file']}); {rebuild}"
        )


def checkpoint_languages(path: str) -> Optional[Tuple[str, str]]:
    """The ``(source, target)`` languages recorded in a fairseq checkpoint's task config, or None."""
    from fairseq_kd.checkpoints import safe_torch_load

    try:
        state = safe_torch_load(path, mmap=True)  # the tensors are mapped, not read
    except DistillationError:  # a checkpoint in torch's legacy format cannot be mapped
        state = safe_torch_load(path)
    def field(node, key):  # a dict, a DictConfig or an argparse Namespace
        if node is None:
            return None
        return node.get(key) if hasattr(node, "get") else getattr(node, key, None)

    if not isinstance(state, dict):
        return None
    task = field(state.get("cfg"), "task") or state.get("args")
    src, tgt = field(task, "source_lang"), field(task, "target_lang")
    return (str(src), str(tgt)) if src and tgt else None


def check_languages(what: str, recorded: Sequence[Tuple[str, Optional[Sequence[str]]]], src: str, tgt: str) -> None:
    """Refuse when a teacher (``recorded``: ``(checkpoint, (src, tgt) or None)``) was trained on another
    direction than ``src -> tgt``; checkpoints that record no languages are not checked."""
    for path, langs in recorded:
        if langs and tuple(langs) != (src, tgt):
            raise DistillationError(
                f"{what}: teacher {path} was trained {langs[0]}->{langs[1]} (its checkpoint's task), this run "
                f"translates {src}->{tgt}; use a {src}->{tgt} teacher (joined dictionaries do not tell the "
                f"directions apart)"
            )


def check_live_teacher_languages(paths: Sequence[str], task_cfg) -> None:
    """The languages of each live teacher checkpoint against the task's (``--source-lang/--target-lang``)."""
    check_languages("--teacher-path", [(p, checkpoint_languages(p)) for p in paths],
                    task_cfg.source_lang, task_cfg.target_lang)


def check_cache_reader(task_cfg, uses_teacher: bool, name: str) -> None:
    """``--teacher-cache`` with a criterion that distils from no teacher (``uses_teacher`` false, from the
    criterion's requirements): refused (it would be collated into every batch and ignored)."""
    if getattr(task_cfg, "teacher_cache", None) and not uses_teacher:
        raise DistillationError(
            f"--teacher-cache {task_cfg.teacher_cache} is not read: criterion {name} uses no teacher; drop "
            f"--teacher-cache or choose a distillation criterion (word_kd, ...)"
        )
