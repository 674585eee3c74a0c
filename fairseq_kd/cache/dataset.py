"""Reading a teacher cache during training.

:class:`TeacherCache` opens the shards of a cache directory as memory-mapped
files (fairseq's ``mmap`` index format, see :mod:`fairseq_kd.cache.build`)
and returns, for example ``i``, its ``[T_i, k]`` ids and float16
log-probabilities and its ``[T_i]`` float32 tail log-masses; only the rows asked for are read, so each data-parallel
rank touches just its own batches' rows and no process loads the cache into
memory.  The files are opened lazily and reopened after pickling, so fairseq's
data-loader workers share the page cache instead of copying arrays.  Opening
checks the files (:mod:`fairseq_kd.cache.integrity`), each example read is
range-checked, and :func:`load_teacher_cache` compares what the teacher saw
with the run (:mod:`fairseq_kd.cache.provenance`).

:class:`TeacherCacheDataset` wraps the training split's dataset and adds to
every collated batch

* ``teacher_topk_ids`` ``[B, T, k]`` long: the teacher's top-k ids;
* ``teacher_topk_lprobs`` ``[B, T, k]`` float16: their log-probabilities,
* ``teacher_topk_tail`` ``[B, T]`` float32: the log of the teacher's mass outside them,

aligned with ``target`` (rows in the batch's order, padded like it; a pad
position holds the pad id, ``-inf`` and a tail of ``0``, i.e. an empty top-k
whose tail bucket has all the mass); :class:`fairseq_kd.teacher.cached.CachedTeacher` reads them
back for the criterion.
"""

import logging
import os
import numpy as np
import torch
from fairseq.data import BaseWrapperDataset

from fairseq_kd.cache.integrity import check_example, check_index, read_shard_record, verify_shard
from fairseq_kd.cache.manifest import missing_shards, read_current_manifest, shard_dir
from fairseq_kd.cliargs import shard_range
from fairseq_kd.errors import DistillationError

logger = logging.getLogger("fairseq_kd.cache")

IDS_KEY, LPROBS_KEY, TAIL_KEY = "teacher_topk_ids", "teacher_topk_lprobs", "teacher_topk_tail"
#: a damaged example met in a data-loader worker: its one-line error, raised where the batch is read
ERROR_KEY = "teacher_cache_error"


class _Shard:
    """One memory-mapped indexed dataset, items read as ``dtype``."""

    def __init__(self, prefix: str, dtype, cache_dir: str):
        from fairseq.data.indexed_dataset import MMapIndexedDataset

        folder = os.path.dirname(prefix)
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DistillationError(f"{prefix}{ext} not found: the cache shard is incomplete; rebuild it")
        try:
            index = MMapIndexedDataset.Index(prefix + ".idx")
        except (AssertionError, ValueError, TypeError, OSError, IndexError) as e:
            raise DistillationError(f"teacher cache {cache_dir}: {prefix}.idx is not a fairseq index ({e}); "
                                    f"rebuild the shard (move {folder} aside and re-run the build)") from None
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self.sizes = np.array(index.sizes, dtype=np.int64)
        pointers = getattr(index, "_pointers", None)  # fairseq's array; else one lookup per item
        if pointers is None:
            pointers = [index[i][0] for i in range(len(index))]
        self.pointers = np.array(pointers, dtype=np.int64)
        check_index(cache_dir, folder, prefix, self.sizes, self.pointers, self.dtype.itemsize)
        self.buffer = None

    def __getitem__(self, i: int) -> np.ndarray:
        if self.buffer is None:
            self.buffer = np.memmap(self.prefix + ".bin", mode="r", dtype=np.uint8)
        return np.frombuffer(self.buffer, dtype=self.dtype, count=int(self.sizes[i]), offset=int(self.pointers[i]))

    def __getstate__(self):
        return {**self.__dict__, "buffer": None}


class TeacherCache:
    """The cache in ``cache_dir``: ``cache[i] -> (ids [T, k] int64, lprobs [T, k] float16, tail [T] float32)``.
    Opening it checks every shard file's size and sampled digests against the manifest (``full``: whole-file
    sha256) and each index against its data file; every example read is range-checked."""

    def __init__(self, cache_dir: str, full: bool = False):
        self.dir = cache_dir
        self.manifest = read_current_manifest(cache_dir)
        missing = missing_shards(cache_dir, self.manifest)
        n = self.manifest["num_shards"]
        if missing:
            raise DistillationError(
                f"teacher cache {cache_dir} lacks shard(s) {missing} of {n}: finish the build "
                f"(python -m fairseq_kd.cache build --out-dir {cache_dir} ..., the finished shards are skipped)"
            )
        recorded = self.manifest.get("shards") or {}
        for s in range(n):
            folder = shard_dir(cache_dir, s, n)
            verify_shard(cache_dir, folder, recorded.get(os.path.basename(folder)) or read_shard_record(folder), full)
        self.k, self.vocab_size = self.manifest["k"], self.manifest["vocab_size"]
        self.temperature = self.manifest["temperature"]
        num = self.manifest["num_examples"]
        self.starts = np.array([shard_range(num, n, s)[0] for s in range(n)], dtype=np.int64)
        self.shards = []
        for s in range(n):
            folder = shard_dir(cache_dir, s, n)
            ids = _Shard(os.path.join(folder, "ids"), self.manifest["ids_dtype"], cache_dir)
            values = _Shard(os.path.join(folder, "lprobs"), np.float16, cache_dir)  # uint16 bit patterns
            tail = _Shard(os.path.join(folder, "tail"), np.float32, cache_dir)  # uint32 bit patterns
            expected = shard_range(num, n, s)[1] - shard_range(num, n, s)[0]
            if (len(ids.sizes) != expected or not np.array_equal(ids.sizes, values.sizes)
                    or not np.array_equal(ids.sizes, tail.sizes * self.k)):
                raise DistillationError(f"{folder} holds {len(ids.sizes)} examples, not {expected}: rebuild it")
            self.shards.append((ids, values, tail))
        self.sizes = np.concatenate([tail.sizes for _, _, tail in self.shards])  # target length per example

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int):
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        ids, values, tail = self.shards[s]
        j = i - int(self.starts[s])
        row_ids, row_values, row_tail = ids[j].reshape(-1, self.k), values[j].reshape(-1, self.k), tail[j]
        check_example(self.dir, os.path.dirname(ids.prefix), i, row_ids, row_values, row_tail, self.vocab_size)
        return (
            torch.from_numpy(row_ids.astype(np.int64)),
            torch.from_numpy(row_values.copy()),
            torch.from_numpy(row_tail.copy()),
        )


def load_teacher_cache(cache_dir: str, dataset, split: str, pad: int, task_cfg=None) -> "TeacherCacheDataset":
    """``dataset`` (the training split) wrapped with the cache of ``cache_dir``, after checking that the
    cache has one row per target token of every example and, given the task's config ``task_cfg``, that
    its teacher saw this split's sentences with this run's options, in this run's direction."""
    from fairseq_kd.cache.provenance import check_fingerprint, check_languages, split_fingerprint

    cache = TeacherCache(cache_dir)
    if len(cache) != len(dataset):
        raise DistillationError(
            f"teacher cache {cache_dir} holds {len(cache)} examples, the {split} split {len(dataset)}: "
            f"build the cache on this split"
        )
    gold = getattr(_language_pair(dataset), "tgt_sizes", None)
    if gold is not None and not np.array_equal(np.asarray(gold), cache.sizes):
        i = int(np.flatnonzero(np.asarray(gold) != cache.sizes)[0])
        raise DistillationError(
            f"teacher cache {cache_dir}: example {i} has {cache.sizes[i]} cached positions but {gold[i]} "
            f"target tokens in the {split} split; the cache was built on other data"
        )
    if task_cfg is not None:
        src, tgt = task_cfg.source_lang, task_cfg.target_lang
        files = [t["file"] for t in cache.manifest.get("teacher", [])]
        check_languages(f"teacher cache {cache_dir}", list(zip(files, cache.manifest.get("teacher_langs") or [])),
                        src, tgt)
        data_dir = str(task_cfg.data).split(":")[0]
        check_fingerprint(cache_dir, cache.manifest.get("fingerprint"),
                          split_fingerprint(_language_pair(dataset), task_cfg, data_dir), data_dir, split)
    logger.info("%s: teacher cache %s (k=%d)", split, cache_dir, cache.k)
    return TeacherCacheDataset(dataset, cache, pad)


def _language_pair(dataset):
    while not hasattr(dataset, "left_pad_target") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


class TeacherCacheDataset(BaseWrapperDataset):
    """The training split plus its cached teacher distribution (batch keys ``teacher_topk_*``)."""

    def __init__(self, dataset, cache: TeacherCache, pad: int):
        super().__init__(dataset)
        self.cache, self.pad = cache, pad
        self.left_pad_target = getattr(_language_pair(dataset), "left_pad_target", False)

    def __getitem__(self, index):
        item = self.dataset[index]
        try:
            ids, values, tail = self.cache[index]
            if ids.size(0) != item["target"].numel():
                raise DistillationError(
                    f"teacher cache {self.cache.dir}: example {index} has {ids.size(0)} cached positions but "
                    f"{item['target'].numel()} target tokens; the cache was built on other data"
                )
        except DistillationError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            # a worker's SystemExit would end it with a traceback in the trainer: the batch carries the line
            item[ERROR_KEY] = e.message
            n, k = item["target"].numel(), self.cache.k
            ids, values, tail = (torch.full((n, k), self.pad, dtype=torch.long),
                                 torch.full((n, k), float("-inf"), dtype=torch.float16), torch.zeros(n))
        item[IDS_KEY], item[LPROBS_KEY], item[TAIL_KEY] = ids, values, tail
        return item

    def collater(self, samples, **kwargs):
        batch = self.dataset.collater(samples, **kwargs)
        if len(batch) == 0:
            return batch
        by_id = {s["id"]: (s[IDS_KEY], s[LPROBS_KEY], s[TAIL_KEY]) for s in samples}
        bsz, length = batch["target"].shape
        ids = torch.full((bsz, length, self.cache.k), self.pad, dtype=torch.long)
        values = torch.full((bsz, length, self.cache.k), float("-inf"), dtype=torch.float16)
        tails = torch.zeros((bsz, length), dtype=torch.float32)
        for b, example in enumerate(batch["id"].tolist()):
            row_ids, row_values, row_tail = by_id[example]
            n = row_ids.size(0)
            at = slice(length - n, length) if self.left_pad_target else slice(0, n)
            ids[b, at], values[b, at], tails[b, at] = row_ids, row_values, row_tail
        batch[IDS_KEY], batch[LPROBS_KEY], batch[TAIL_KEY] = ids, values, tails
        errors = [s[ERROR_KEY] for s in samples if ERROR_KEY in s]
        if errors:
            batch[ERROR_KEY] = errors[0]
        return batch
