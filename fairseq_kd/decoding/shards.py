"""The shard plan of a decode: contiguous shards of the example ids, their
file names, the manifest recording what an ``--out-dir`` holds (a re-run with
other settings is refused; complete shards are skipped, incomplete ones redone).

A shard is written to ``shardIII-of-NNN.jsonl.tmp`` and renamed to
``shardIII-of-NNN.jsonl`` when complete.
"""

import json
import os
from typing import Dict, Sequence, Tuple

from fairseq_kd.errors import DistillationError

MANIFEST = "manifest.json"


def shard_range(num_examples: int, num_shards: int, shard_id: int) -> Tuple[int, int]:
    """``[start, end)`` of the example ids of shard ``shard_id`` (contiguous, sizes differ by <= 1)."""
    if num_shards < 1:
        raise DistillationError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise DistillationError(f"--shard-id must be in [0, {num_shards}), got {shard_id}")
    return num_examples * shard_id // num_shards, num_examples * (shard_id + 1) // num_shards


def shard_path(out_dir: str, shard_id: int, num_shards: int) -> str:
    return os.path.join(out_dir, f"shard{shard_id:03d}-of-{num_shards:03d}.jsonl")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_manifest(out_dir: str, manifest: Dict) -> None:
    """Record what ``out_dir`` holds; refuse to mix shards of different decodes."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != manifest:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise DistillationError(
                f"{path} records a different decode ({', '.join(changed)} differ); "
                f"use a new --out-dir or delete {out_dir}"
            )
        return
    write_json_atomic(path, manifest)


def read_manifest(out_dir: str) -> Dict:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DistillationError(f"{path} not found; run `python -m fairseq_kd.decoding decode --out-dir {out_dir}` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shards_complete(out_dir: str, num_shards: int, shard_ids: Sequence[int]) -> bool:
    """Whether every shard of ``shard_ids`` is complete (a re-run then decodes nothing)."""
    return all(os.path.exists(shard_path(out_dir, s, num_shards)) for s in shard_ids)
