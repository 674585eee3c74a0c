"""Building a teacher cache: the teacher run once, teacher-forced on the gold prefixes of a binarized
split, and its top-k ids, their log-probabilities (float16) and the log of the remaining mass (float32,
a log-sum-exp over the other tokens) stored per target position, at the criterion's temperature.

Shards of contiguous examples are written as fairseq ``mmap`` indexed datasets into
``shardIII-of-NNN.tmp/`` and renamed when complete, so a restarted build skips the finished ones.
The layout and its size: docs/teacher_cache.md.
"""

import logging
import os
import shutil
from typing import List, Optional, Sequence

import numpy as np
import torch

from fairseq_kd.cache.integrity import write_shard_record
from fairseq_kd.cache.manifest import (
    DEFAULT_K, build_manifest, record_shards, shard_dir, write_or_check_manifest,
)
from fairseq_kd.cliargs import shard_range
from fairseq_kd.errors import DistillationError

logger = logging.getLogger("fairseq_kd.cache")


class IndexedWriter:
    """Writes one fairseq ``mmap`` indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) of numpy items."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype, self.sizes = prefix, np.dtype(dtype), []
        self.file = open(prefix + ".bin", "wb")

    def add(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.dtype != self.dtype:
            raise TypeError(f"{self.prefix}: item of dtype {array.dtype}, dataset of {self.dtype}")
        self.file.write(array.tobytes(order="C"))
        self.sizes.append(array.size)

    def finalize(self) -> None:
        from fairseq.data.indexed_dataset import MMapIndexedDataset

        self.file.close()
        with MMapIndexedDataset.Index.writer(self.prefix + ".idx", self.dtype.type) as index:
            index.write(self.sizes)


def teacher_topk(teacher, net_input, k: int, temperature: float):
    """``(ids, lprobs, tail)``: the teacher's ``k`` most probable tokens on the gold prefixes ``[B, T, k]``,
    their log-probabilities at ``temperature`` sorted by decreasing value, and the log of the mass of the
    other tokens ``[B, T]`` (a log-sum-exp over them), all from the float32 (or float64) distribution."""
    from fairseq_kd.losses.common import log_probs
    from fairseq_kd.losses.topk import topk_with_tail

    lprobs = teacher(net_input)
    if temperature != 1.0 or lprobs.dtype in (torch.float16, torch.bfloat16):
        lprobs = log_probs(lprobs, temperature)
    return topk_with_tail(lprobs, k)


def _batches(dataset, start: int, end: int, max_tokens: int, max_sentences: Optional[int]):
    """Batches of the example ids ``[start, end)``, grouped by length in chunks of consecutive ids."""
    chunk = 4096
    for lo in range(start, end, chunk):
        ids = np.arange(lo, min(end, lo + chunk), dtype=np.int64)
        order = ids[np.argsort(dataset.num_tokens_vec(ids), kind="mergesort")]
        batches = dataset.batch_by_size(order, max_tokens=max_tokens, max_sentences=max_sentences)
        yield ids, batches


def build_shard(teacher, dataset, out_dir: str, shard_id: int, num_shards: int, k: int, temperature: float,
                ids_dtype, device, max_tokens: int, max_sentences: Optional[int], progress: bool = True) -> None:
    """Compute one shard into ``shardIII-of-NNN.tmp/`` and rename it when complete."""
    from fairseq import utils
    from tqdm import tqdm

    start, end = shard_range(len(dataset), num_shards, shard_id)
    final = shard_dir(out_dir, shard_id, num_shards)
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a killed build
    os.makedirs(tmp)
    ids_out = IndexedWriter(os.path.join(tmp, "ids"), ids_dtype)
    values_out = IndexedWriter(os.path.join(tmp, "lprobs"), np.uint16)
    tail_out = IndexedWriter(os.path.join(tmp, "tail"), np.uint32)
    with tqdm(total=end - start, unit="sent", desc=f"shard {shard_id + 1}/{num_shards}", disable=not progress) as bar:
        for chunk_ids, batches in _batches(dataset, start, end, max_tokens, max_sentences):
            rows = {}
            for batch in batches:
                sample = dataset.collater([dataset[int(i)] for i in batch])
                sample = utils.apply_to_sample(lambda t: t.to(device), sample)
                ids, values, tail = teacher_topk(teacher, sample["net_input"], k, temperature)
                if any(torch.isnan(x).any() or torch.isposinf(x).any() for x in (values, tail)):
                    paths = ":".join(getattr(teacher, "paths", [])) or "the teacher"
                    raise DistillationError(
                        f"teacher {paths} produced NaN/inf log-probabilities for examples "
                        f"{sample['id'][:5].tolist()}...: check the teacher checkpoint; shard {shard_id} was not written"
                    )
                ids, values = ids.cpu().numpy(), values.cpu().half().numpy()
                tail = tail.cpu().float().numpy()
                for b, example in enumerate(sample["id"].tolist()):
                    length = int(sample["target"][b].ne(dataset.tgt_dict.pad()).sum())
                    rows[example] = (ids[b, :length], values[b, :length], tail[b, :length])
                bar.update(len(batch))
            for example in chunk_ids.tolist():
                ids, values, tail = rows.pop(example)
                ids_out.add(ids.astype(ids_dtype))
                values_out.add(values.view(np.uint16))
                tail_out.add(np.ascontiguousarray(tail).view(np.uint32))
    for out in (ids_out, values_out, tail_out):
        out.finalize()
    write_shard_record(tmp)  # sizes and digests, verified when the cache is opened
    os.replace(tmp, final)
    logger.info("shard %d of %d: examples %d-%d written to %s", shard_id, num_shards, start, end - 1, final)


def check_teacher_positions(dataset, limits, data: str, split: str) -> None:
    """Refuse a split with an example longer than the teacher's positional embeddings reach: the cache covers
    every example, and the teacher would fail inside torch (learned positions) or read positions it was
    never trained on (sinusoidal ones)."""
    for side, sizes, limit, fix in (
        ("source", dataset.src_sizes, limits[0],
         f"pass --truncate-source --max-source-positions {limits[0]} (and the same to the student's fairseq-train)"),
        ("target", dataset.tgt_sizes, limits[1], "the cache covers every example: remove the long pairs before fairseq-preprocess"),
    ):
        over = np.flatnonzero(np.asarray(sizes) > limit)
        if over.size:
            first = int(over[0])
            raise DistillationError(
                f"split {split} of {data}: {over.size} example(s) have more {side} tokens than the teacher's {limit} "
                f"positions (the first: example {first}, {int(sizes[first])} tokens); {fix}"
            )


def build_cache(
    data: str, split: str, teacher_path: str, out_dir: str, k: int = DEFAULT_K, temperature: float = 1.0,
    num_shards: int = 1, shard_ids: Optional[Sequence[int]] = None, max_tokens: int = 4096,
    max_sentences: Optional[int] = None, source_lang: Optional[str] = None, target_lang: Optional[str] = None,
    device=None, precision: str = "fp32", teacher_data_dir: Optional[str] = None, progress: bool = True,
    truncate_source: bool = False, max_source_positions: int = 1024,
) -> List[int]:
    """Build (the missing shards among ``shard_ids`` of) the cache of ``split`` in ``out_dir``;
    returns the ids of the shards built by this call."""
    from fairseq_kd.cache.manifest import ids_dtype_name
    from fairseq_kd.cache.provenance import check_languages, checkpoint_languages, split_fingerprint
    from fairseq_kd.decoding.fairseq_backend import build_task
    from fairseq_kd.teacher import load_teacher, split_paths

    if k < 1:
        raise DistillationError(f"--k must be >= 1, got {k}")
    if temperature <= 0:
        raise DistillationError(f"--temperature must be > 0, got {temperature}")
    paths = split_paths(teacher_path)
    for p in paths:
        if not os.path.isfile(p):
            raise DistillationError(f"teacher checkpoint {p} not found; check --path (ensembles: a.pt:b.pt)")
    task = build_task(data, source_lang, target_lang)
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    # fields that a plain TranslationConfig leaves as interpolations of fairseq's top-level config
    task.cfg.dataset_impl, task.cfg.required_seq_len_multiple = None, 1
    task.cfg.truncate_source, task.cfg.max_source_positions = truncate_source, max_source_positions
    try:
        task.load_dataset(split)
    except FileNotFoundError as e:
        raise DistillationError(f"split {split} not found in {data} ({e}); check --split") from None
    dataset = task.dataset(split)
    if dataset.tgt is None:
        raise DistillationError(f"split {split} of {data} has no target side: the cache needs gold prefixes")
    vocab = len(task.target_dictionary)
    if k > vocab:
        raise DistillationError(f"--k {k} exceeds the target dictionary's {vocab} symbols")
    teacher_langs = [checkpoint_languages(p) for p in paths]
    check_languages("--path", list(zip(paths, teacher_langs)), src, tgt)
    manifest = build_manifest(
        paths, data, split, src, tgt, len(dataset), int(np.sum(dataset.tgt_sizes)), vocab, k, temperature,
        num_shards, split_fingerprint(dataset, task.cfg, data), teacher_langs,
    )
    shard_ids = list(range(num_shards)) if shard_ids is None else list(shard_ids)
    for s in shard_ids:
        shard_range(len(dataset), num_shards, s)  # validates the id
    todo = [s for s in shard_ids if not os.path.isdir(shard_dir(out_dir, s, num_shards))]
    if todo:  # a split the teacher cannot read is refused before anything is written
        device = torch.device("cpu") if device is None else torch.device(device)
        teacher = load_teacher(paths, task, precision=precision, teacher_data_dir=teacher_data_dir).to(device)
        check_teacher_positions(dataset, teacher.max_positions(), data, split)
    write_or_check_manifest(out_dir, manifest)
    for s in sorted(set(shard_ids) - set(todo)):
        logger.info("shard %d of %d is complete: skipped", s, num_shards)
    if not todo:
        record_shards(out_dir)
        return []
    ids_dtype = np.dtype(ids_dtype_name(vocab))
    for s in todo:
        build_shard(teacher, dataset, out_dir, s, num_shards, k, temperature, ids_dtype, device,
                    max_tokens, max_sentences, progress)
    record_shards(out_dir)  # once every shard is there: their digests into the manifest
    return todo
