"""The manifest of a teacher cache: what a cache directory holds and the checks
that refuse a cache that does not fit.

``DIR/manifest.json`` records the sha256 of every teacher checkpoint and of
both dictionaries, the languages each teacher was trained on, the split's name,
number of examples and of target tokens, the fingerprint of what the teacher saw
(:mod:`fairseq_kd.cache.provenance`), the language pair, ``k``, the temperature
the log-probabilities were computed at, the dtypes of ids and values, the number
of shards and, once every shard is built, each shard file's size and digests
(:mod:`fairseq_kd.cache.integrity`).  A build into a
directory whose manifest differs is refused (its shards would not belong to
one cache), and so is a cache whose manifest does not match the training run
(:func:`check_manifest`); each refusal is one line naming the file and the
first field that differs.  The shard layout: ``DIR/shardIII-of-NNN/`` holds
``ids.{bin,idx}``, ``lprobs.{bin,idx}`` and ``tail.{bin,idx}`` for one contiguous range of
example ids (:func:`fairseq_kd.cliargs.shard_range`); it is written as ``shardIII-of-NNN.tmp/``
and renamed when complete.
"""

import json
import os
from typing import Dict, Optional, Sequence

from fairseq_kd.errors import DistillationError
from fairseq_kd.hashing import dictionary_hashes, sha256_of
from fairseq_kd.textio import read_json_manifest, unique_tmp

MANIFEST = "manifest.json"
#: version of the on-disk layout (2: the teacher's tail log-mass stored per position; 3: shard digests and
#: the fingerprint of the split and of the teacher's languages)
FORMAT = 3
#: manifest fields written after the build, not part of what identifies a cache
AFTER_BUILD = ("shards",)
#: dtype of the cached log-probabilities (stored as their uint16 bit patterns)
VALUES_DTYPE = "float16"
#: dtype of the cached tail log-masses (stored as their uint32 bit patterns)
TAIL_DTYPE = "float32"
#: 7 ids and values plus the tail: 32 bytes per target token below 65,536 symbols
DEFAULT_K = 7


def ids_dtype_name(vocab_size: int) -> str:
    """The smallest unsigned integer type holding every id of a ``vocab_size`` dictionary."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "uint32"


def shard_dir(cache_dir: str, shard_id: int, num_shards: int) -> str:
    return os.path.join(cache_dir, f"shard{shard_id:03d}-of-{num_shards:03d}")


def build_manifest(
    teacher_paths: Sequence[str], data_dir: str, split: str, src: str, tgt: str, num_examples: int,
    num_target_tokens: int, vocab_size: int, k: int, temperature: float, num_shards: int,
    fingerprint: Dict, teacher_langs: Sequence,
) -> Dict:
    return {
        "format": FORMAT,
        "teacher": [{"file": os.path.basename(p), "sha256": sha256_of(p)} for p in teacher_paths],
        "teacher_langs": [list(langs) if langs else None for langs in teacher_langs],
        "fingerprint": fingerprint,
        "dictionaries": dictionary_hashes(data_dir, (src, tgt)),
        "source_lang": src,
        "target_lang": tgt,
        "split": split,
        "num_examples": int(num_examples),
        "num_target_tokens": int(num_target_tokens),
        "vocab_size": int(vocab_size),
        "k": int(k),
        "temperature": float(temperature),
        "ids_dtype": ids_dtype_name(vocab_size),
        "values_dtype": VALUES_DTYPE,
        "tail_dtype": TAIL_DTYPE,
        "num_shards": int(num_shards),
    }


def _describe(key: str, old, new) -> str:
    if key == "teacher":
        return "the teacher checkpoint(s) differ (sha256)"
    if key == "fingerprint":
        return "the split's content or the options the teacher saw differ"
    if key == "dictionaries":
        if isinstance(old, dict) and set(old) == {"src", "tgt"}:
            return "it records its dictionaries in an older form ({src, tgt}); rebuild the cache"
        return "the dictionaries differ (sha256 of dict.*.txt)"
    return f"{key} is {old!r} in the cache, {new!r} here"


def write_or_check_manifest(cache_dir: str, manifest: Dict) -> None:
    """Write ``DIR/manifest.json``, or refuse when it exists and records another cache."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, MANIFEST)
    if os.path.exists(path):
        old = read_manifest(cache_dir)
        changed = [key for key in sorted(set(old) | set(manifest))
                   if key not in AFTER_BUILD and old.get(key) != manifest.get(key)]
        if changed:
            raise DistillationError(
                f"{path} records another cache: {_describe(changed[0], old.get(changed[0]), manifest.get(changed[0]))}; "
                f"build into a new --out-dir"
            )
        return
    _write(path, manifest)


def _write(path: str, manifest: Dict) -> None:
    tmp = unique_tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(cache_dir: str) -> Dict:
    return read_json_manifest(
        os.path.join(cache_dir, MANIFEST),
        f": {cache_dir} is not a teacher cache; build one with `python -m fairseq_kd.cache build --out-dir {cache_dir} ...`",
        "rebuild the cache",
    )


def read_current_manifest(cache_dir: str) -> Dict:
    """:func:`read_manifest`, refusing a cache of another format version (one line: rebuild it)."""
    manifest = read_manifest(cache_dir)
    if manifest.get("format") != FORMAT:
        raise DistillationError(
            f"teacher cache {os.path.join(cache_dir, MANIFEST)} has format {manifest.get('format')!r}, this version "
            f"reads format {FORMAT} (shard digests and the fingerprint of the split): rebuild it with "
            f"`fairseq-kd-build-cache build --out-dir NEW_DIR ...`"
        )
    return manifest


def check_manifest(cache_dir: str, manifest: Dict, expected: Dict, fixes: Optional[Dict[str, str]] = None) -> None:
    """Refuse ``manifest`` (read from ``cache_dir``) unless it agrees with every field of ``expected``;
    the one-line error names the manifest, the first differing field and ``fixes[field]``."""
    path = os.path.join(cache_dir, MANIFEST)
    for key, want in expected.items():
        have = manifest.get(key)
        if key == "temperature" and have is not None and want is not None and abs(float(have) - float(want)) < 1e-9:
            continue
        if have != want:
            fix = (fixes or {}).get(key, "build a cache for this run")
            raise DistillationError(f"teacher cache {path} does not match: {_describe(key, have, want)}; {fix}")


def missing_shards(cache_dir: str, manifest: Dict):
    n = manifest["num_shards"]
    return [i for i in range(n) if not os.path.isdir(shard_dir(cache_dir, i, n))]


def record_shards(cache_dir: str) -> bool:
    """Once every shard is built, copy their size and digest records into the manifest (``shards``);
    whether the manifest now has them.  Concurrent builders write the same content."""
    from fairseq_kd.cache.integrity import read_shard_record

    manifest = read_manifest(cache_dir)
    n = manifest["num_shards"]
    folders = [shard_dir(cache_dir, i, n) for i in range(n)]
    records = [read_shard_record(f) if os.path.isdir(f) else None for f in folders]
    if any(r is None for r in records):
        return False
    shards = {os.path.basename(f): r for f, r in zip(folders, records)}
    if manifest.get("shards") != shards:
        _write(os.path.join(cache_dir, MANIFEST), {**manifest, "shards": shards})
    return True
