"""Building a teacher cache: run the teacher once over a binarized split and
store its top-k token ids and log-probabilities for every target position.

The teacher (one checkpoint or a ``:``-separated ensemble, loaded by
:func:`fairseq_kd.teacher.load_teacher` with its dictionary check) is
teacher-forced on the gold prefixes of every example, in batches of about
``max_tokens`` target tokens, exactly as a training step feeds it.  Its
log-probabilities are softened by ``temperature`` (``log_softmax(lprobs /
tau)``, what the criterions apply to a live teacher) and the ``k`` largest
are kept, sorted by decreasing value.

Why the cache holds tempered values instead of temperature-1 ones: the top-k
ids do not depend on the temperature, but the tail's mass at another
temperature, ``sum_{v outside} p_v^(1/tau) / Z_tau``, depends on how the tail
is spread, which the cache does not keep; no re-tempering of stored values
would be exact.  So the temperature is part of the manifest and a criterion
with another ``--kd-temperature`` is refused.

On disk (fairseq memory-mapped indexed datasets, one example per item, the
item of example ``i`` holding its ``T_i * k`` values row-major):

* ``ids``: the token ids, in the smallest unsigned type holding the
  dictionary (uint16 below 65,536 symbols);
* ``lprobs``: the log-probabilities in IEEE half precision.  fairseq's dtype
  codes have no float16, so the half-precision bit patterns are stored as a
  uint16 dataset (code 8) and read back with ``numpy.frombuffer(...,
  dtype=float16)``: an exact, bit-preserving round trip.

Examples are cut into ``num_shards`` contiguous shards; ``shard_id`` builds
one of them (n GPUs or machines each build one into the same directory),
without it every shard is built in turn.  A shard is written into
``shardIII-of-NNN.tmp/`` and that directory renamed to ``shardIII-of-NNN/``
when complete, so a killed build never leaves a partial shard under its
final name and a restarted one skips the finished shards.
"""

import logging
import os
import shutil
from typing import List, Optional, Sequence

import numpy as np
import torch

from fairseq_kd.cache.manifest import (
    DEFAULT_K, build_manifest, read_manifest, shard_dir, write_or_check_manifest,
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
    """``(ids, lprobs)`` ``[B, T, k]``: the teacher's ``k`` most probable tokens on the gold prefixes
    and their log-probabilities at ``temperature`` (float32), sorted by decreasing value."""
    from fairseq_kd.losses import log_probs, topk_ids

    lprobs = teacher(net_input)
    if temperature != 1.0:
        lprobs = log_probs(lprobs, temperature)
    ids = topk_ids(lprobs, k)  # block maxima: the ids of lprobs.topk(k), by decreasing value
    return ids, lprobs.gather(-1, ids)


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
    with tqdm(total=end - start, unit="sent", desc=f"shard {shard_id + 1}/{num_shards}", disable=not progress) as bar:
        for chunk_ids, batches in _batches(dataset, start, end, max_tokens, max_sentences):
            rows = {}
            for batch in batches:
                sample = dataset.collater([dataset[int(i)] for i in batch])
                sample = utils.apply_to_sample(lambda t: t.to(device), sample)
                ids, values = teacher_topk(teacher, sample["net_input"], k, temperature)
                if torch.isnan(values).any() or torch.isposinf(values).any():
                    paths = ":".join(getattr(teacher, "paths", [])) or "the teacher"
                    raise DistillationError(
                        f"teacher {paths} produced NaN/inf log-probabilities for examples "
                        f"{sample['id'][:5].tolist()}...: check the teacher checkpoint; shard {shard_id} was not written"
                    )
                ids, values = ids.cpu().numpy(), values.cpu().half().numpy()
                for b, example in enumerate(sample["id"].tolist()):
                    length = int(sample["target"][b].ne(dataset.tgt_dict.pad()).sum())
                    rows[example] = (ids[b, :length], values[b, :length])
                bar.update(len(batch))
            for example in chunk_ids.tolist():
                ids, values = rows.pop(example)
                ids_out.add(ids.astype(ids_dtype))
                values_out.add(values.view(np.uint16))
    ids_out.finalize()
    values_out.finalize()
    os.replace(tmp, final)
    logger.info("shard %d of %d: examples %d-%d written to %s", shard_id, num_shards, start, end - 1, final)


def build_cache(
    data: str, split: str, teacher_path: str, out_dir: str, k: int = DEFAULT_K, temperature: float = 1.0,
    num_shards: int = 1, shard_ids: Optional[Sequence[int]] = None, max_tokens: int = 4096,
    max_sentences: Optional[int] = None, source_lang: Optional[str] = None, target_lang: Optional[str] = None,
    device=None, precision: str = "fp32", teacher_data_dir: Optional[str] = None, progress: bool = True,
) -> List[int]:
    """Build (the missing shards among ``shard_ids`` of) the cache of ``split`` in ``out_dir``;
    returns the ids of the shards built by this call."""
    from fairseq_kd.cache.manifest import ids_dtype_name
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
    manifest = build_manifest(
        paths, data, split, src, tgt, len(dataset), int(np.sum(dataset.tgt_sizes)), vocab, k, temperature,
        num_shards,
    )
    write_or_check_manifest(out_dir, manifest)
    shard_ids = list(range(num_shards)) if shard_ids is None else list(shard_ids)
    for s in shard_ids:
        shard_range(len(dataset), num_shards, s)  # validates the id
    todo = [s for s in shard_ids if not os.path.isdir(shard_dir(out_dir, s, num_shards))]
    for s in sorted(set(shard_ids) - set(todo)):
        logger.info("shard %d of %d is complete: skipped", s, num_shards)
    if not todo:
        return []
    device = torch.device("cpu") if device is None else torch.device(device)
    teacher = load_teacher(paths, task, precision=precision, teacher_data_dir=teacher_data_dir).to(device)
    ids_dtype = np.dtype(ids_dtype_name(vocab))
    for s in todo:
        build_shard(teacher, dataset, out_dir, s, num_shards, k, temperature, ids_dtype, device,
                    max_tokens, max_sentences, progress)
    read_manifest(out_dir)  # still there and readable
    return todo
