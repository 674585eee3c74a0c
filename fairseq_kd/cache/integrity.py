"""Integrity of a teacher cache's files: per-shard sizes and digests, the index against its data file, and
the range of every value read (docs/teacher_cache.md, "Integrity").

A shard's ``digests.json`` (written before the shard is renamed into place) and the manifest's ``shards``
entry record, per file, its size, its sha256 and the sha256 of :data:`SAMPLE_BLOCKS` blocks at fixed
offsets.  Opening a cache checks the sizes and the sampled digests (fast); ``full=True``
(``fairseq-kd-build-cache verify --full``) the whole files.  The values of an example are checked when it
is read (:func:`check_example`).
"""

import hashlib
import json
import os
from typing import Dict, Optional

import numpy as np

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import unique_tmp

DIGESTS = "digests.json"
FILES = ("ids.bin", "ids.idx", "lprobs.bin", "lprobs.idx", "tail.bin", "tail.idx")
SAMPLE_BLOCKS, BLOCK = 16, 1 << 16
#: a stored log-probability may exceed 0 by float32 rounding of the log-softmax, not more
LPROB_SLACK = 1e-3
#: |sum of the top-k probabilities and the tail mass - 1|: the fp16 rounding of k values stays far below
MASS_SLACK = 2e-2


def rebuild_hint(cache_dir: str, folder: str) -> str:
    return (f"the cache is damaged: move {folder} aside and re-run `fairseq-kd-build-cache build --out-dir "
            f"{cache_dir} ...` with the same options (only the missing shard is built)")


def _sample_offsets(size: int):
    if size <= SAMPLE_BLOCKS * BLOCK:
        return [0] if size else []
    step = (size - BLOCK) / (SAMPLE_BLOCKS - 1)
    return [int(round(i * step)) for i in range(SAMPLE_BLOCKS)]


def sample_digest(path: str, size: int) -> str:
    """sha256 of the blocks at :func:`_sample_offsets` (the whole file when it is small)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in _sample_offsets(size):
            f.seek(offset)
            h.update(f.read(BLOCK if size > SAMPLE_BLOCKS * BLOCK else size))
    return h.hexdigest()


def full_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_record(folder: str) -> Dict[str, Dict]:
    """``{file: {size, sha256, sample_sha256}}`` of a shard's files."""
    record = {}
    for name in FILES:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        record[name] = {"size": size, "sha256": full_digest(path), "sample_sha256": sample_digest(path, size)}
    return record


def write_shard_record(folder: str) -> None:
    path = os.path.join(folder, DIGESTS)
    tmp = unique_tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(shard_record(folder), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_shard_record(folder: str) -> Optional[Dict]:
    try:
        with open(os.path.join(folder, DIGESTS), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def verify_shard(cache_dir: str, folder: str, record: Optional[Dict], full: bool = False) -> None:
    """Refuse a shard whose files differ from ``record`` in size or (sampled, or with ``full`` whole) sha256."""
    if not record:
        raise DistillationError(f"teacher cache {cache_dir}: {folder} records no digests of its files; "
                                f"{rebuild_hint(cache_dir, folder)}")
    for name in FILES:
        path, want = os.path.join(folder, name), record.get(name) or {}
        if not os.path.isfile(path):
            raise DistillationError(f"teacher cache {cache_dir}: {path} not found; {rebuild_hint(cache_dir, folder)}")
        size = os.path.getsize(path)
        if size != want.get("size"):
            raise DistillationError(f"teacher cache {cache_dir}: {path} has {size} bytes, the manifest records "
                                    f"{want.get('size')}; {rebuild_hint(cache_dir, folder)}")
        got = full_digest(path) if full else sample_digest(path, size)
        if got != want.get("sha256" if full else "sample_sha256"):
            raise DistillationError(f"teacher cache {cache_dir}: {path} differs from its recorded sha256; "
                                    f"{rebuild_hint(cache_dir, folder)}")


def check_index(cache_dir: str, folder: str, prefix: str, sizes: np.ndarray, pointers: np.ndarray,
                itemsize: int) -> None:
    """The index's items must lie back to back and end exactly at the data file's end."""
    nbytes = sizes.astype(np.int64) * itemsize
    expected = np.concatenate([[0], np.cumsum(nbytes)[:-1]]) if len(sizes) else pointers
    end = int(nbytes.sum())
    actual = os.path.getsize(prefix + ".bin")
    if not np.array_equal(pointers, expected) or actual != end:
        raise DistillationError(
            f"teacher cache {cache_dir}: {prefix}.bin has {actual} bytes but its index {prefix}.idx describes "
            f"{end}; {rebuild_hint(cache_dir, folder)}"
        )


def check_example(cache_dir: str, folder: str, example: int, ids: np.ndarray, values: np.ndarray,
                  tail: np.ndarray, vocab_size: int) -> None:
    """One example's cached rows (``ids``, ``values`` ``[T, k]``, ``tail`` ``[T]``): ids inside the
    vocabulary, log-probabilities finite, <= 0 (to rounding) and sorted, tails not NaN and <= 0, and each
    position's mass (top-k plus tail) 1; a one-line error naming the cache, the shard and the example."""
    where = f"teacher cache {cache_dir}, {os.path.basename(folder)}, example {example}"
    fix = rebuild_hint(cache_dir, folder)
    if ids.size and int(ids.max()) >= vocab_size:
        raise DistillationError(f"{where}: token id {int(ids.max())} outside the {vocab_size}-symbol dictionary; {fix}")
    v = values.astype(np.float64)
    bad = ~np.isfinite(v) | (v > LPROB_SLACK)
    if bad.any():
        t = int(np.argwhere(bad)[0][0])
        raise DistillationError(f"{where}, position {t}: log-probability {v[bad][0]:+.4g} (must be finite and "
                                f"<= 0); {fix}")
    if v.shape[-1] > 1 and (v[:, 1:] > v[:, :-1]).any():
        t = int(np.argwhere(v[:, 1:] > v[:, :-1])[0][0])
        raise DistillationError(f"{where}, position {t}: the top-k log-probabilities are not sorted; {fix}")
    tl = tail.astype(np.float64)
    bad = np.isnan(tl) | (tl > LPROB_SLACK)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise DistillationError(f"{where}, position {t}: tail log-mass {tl[t]:+.4g} (must be <= 0); {fix}")
    mass = np.exp(v).sum(axis=-1) + np.exp(tl)
    off = np.abs(mass - 1.0) > MASS_SLACK
    if off.any():
        t = int(np.flatnonzero(off)[0])
        raise DistillationError(f"{where}, position {t}: the stored probabilities sum to {mass[t]:.4g}, not 1; {fix}")
