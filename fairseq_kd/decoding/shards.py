"""The shard plan of a decode: contiguous shards of the example ids, their
file names, the manifest recording what an ``--out-dir`` holds (a re-run with
other settings is refused; complete shards are skipped, incomplete ones redone).

A shard is written to ``shardIII-of-NNN.jsonl.tmp<pid>-<random>`` (a name
unique to the writing process) and renamed to ``shardIII-of-NNN.jsonl`` when
complete.  While a process decodes a shard it holds
``shardIII-of-NNN.jsonl.lock`` (created with ``O_EXCL``, holding its host and
pid, and whose mtime is a heartbeat the holder renews while it decodes): a
second decode of the same shard (two nodes given the same shard id) stops with
a message naming the holder instead of colliding on one file.  A lock is stale,
and taken over, when its process is gone (same host) or its heartbeat is older
than ``claim_timeout`` seconds (any host: a killed or preempted node).

As a work queue (``decode --chunk-size``), the shards are many small chunks:
every worker claims the next chunk nobody holds, skips chunks held by live
workers, and decodes any number of them (:func:`decode_queue` in ``decode.py``).
"""

import contextlib
import glob
import json
import os
import socket
import threading
import time
from typing import Dict, Iterator, Optional, Sequence, Tuple

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import read_json_manifest, unique_tmp

MANIFEST = "manifest.json"


def shard_path(out_dir: str, shard_id: int, num_shards: int) -> str:
    return os.path.join(out_dir, f"shard{shard_id:03d}-of-{num_shards:03d}.jsonl")


def partial_shards(final: str):
    """Temporary files of an interrupted write of shard file ``final``."""
    return glob.glob(glob.escape(final) + ".tmp*")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


CLAIM_TIMEOUT = 600.0  # seconds without a heartbeat after which any host's claim is stale


class ShardBusy(DistillationError):
    """The shard is held by a live process (see :func:`shard_lock`)."""


def _stale(lock: str, holder: Dict, me: Dict, claim_timeout: Optional[float]) -> bool:
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return True  # its process is gone
    if claim_timeout is None:
        return False
    try:
        return time.time() - os.stat(lock).st_mtime > claim_timeout  # no heartbeat: a dead or preempted node
    except FileNotFoundError:
        return False


def _take_over(lock: str) -> None:
    """Remove a stale lock; of several processes doing it at once, one renames it away, the others retry."""
    aside = unique_tmp(lock + ".stale")
    with contextlib.suppress(FileNotFoundError):
        os.rename(lock, aside)
        os.remove(aside)


def _heartbeat(lock: str, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        with contextlib.suppress(OSError):
            os.utime(lock)


@contextlib.contextmanager
def shard_lock(final: str, claim_timeout: Optional[float] = CLAIM_TIMEOUT, worker: str = "") -> Iterator[None]:
    """Hold ``final.lock`` while the block writes shard file ``final`` (see the module docstring);
    raises :class:`ShardBusy` while a live process holds it."""
    lock = final + ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock, encoding="utf-8") as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}  # being written, or damaged: its heartbeat decides
            if _stale(lock, holder, me, claim_timeout):
                _take_over(lock)
                continue
            raise ShardBusy(
                f"{final} is being decoded by process {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(lock {lock}); give each decode its own --shard-id, wait for that one to finish, or delete "
                f"{lock} if that process is gone"
            )
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise ShardBusy(f"{final}: its lock {lock} keeps being taken by other processes")
    stop = threading.Event()
    every = min(30.0, claim_timeout / 4) if claim_timeout else 30.0
    beat = threading.Thread(target=_heartbeat, args=(lock, every, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def write_json_atomic(path: str, obj) -> None:
    tmp = unique_tmp(path)
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
    return read_json_manifest(os.path.join(out_dir, MANIFEST),
                              f"; run `python -m fairseq_kd.decoding decode --out-dir {out_dir}` first",
                              f"delete {out_dir} and decode again")


def num_chunks(num_examples: int, chunk_size: int) -> int:
    """How many shards of at most ``chunk_size`` examples a work-queue decode cuts the examples into."""
    if chunk_size < 1:
        raise DistillationError(f"--chunk-size must be >= 1, got {chunk_size}")
    return max(1, -(-num_examples // chunk_size))


def shards_complete(out_dir: str, num_shards: int, shard_ids: Sequence[int]) -> bool:
    """Whether every shard of ``shard_ids`` is complete (a re-run then decodes nothing)."""
    return all(os.path.exists(shard_path(out_dir, s, num_shards)) for s in shard_ids)
