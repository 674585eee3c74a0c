"""Step stamps: the record, kept beside a step's outputs, of the inputs and settings they were made from.

A step skips its existing outputs only when its stamp matches the stamp it would write now; otherwise it
removes them and runs again, and the steps after it see a new upstream stamp and redo too.  Input files
enter a stamp by content (sha256), cached by size and modification time so that a large corpus is read
once.  See docs/reliability.md ("Stale outputs").
"""

import hashlib
import json
import os
import shutil
from typing import Callable, Dict, Iterable, Optional, Sequence

from fairseq_kd.textio import unique_tmp

STAMP_DIR = ".stamps"


class _DigestCache:
    """sha256 of files, remembered in ``<folder>/.stamps/digests.json`` by path, size and mtime."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, STAMP_DIR, "digests.json")
        try:
            with open(self.path, encoding="utf-8") as f:
                self.entries = json.load(f)
        except (OSError, ValueError):
            self.entries = {}

    def digest(self, path: str) -> str:
        st = os.stat(path)
        key = os.path.abspath(path)
        known = self.entries.get(key)
        if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
            return known["sha256"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
        _write_json(self.path, self.entries)
        return h.hexdigest()


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = unique_tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, sort_keys=True, indent=1)
    os.replace(tmp, path)


class Stamps:
    """The stamps of the steps that write into ``folder`` (kept in ``folder/.stamps``)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._digests = _DigestCache(folder)
        self._records: Dict[str, str] = {}  # the record behind each stamp made, written beside it

    def file_digest(self, path: str) -> str:
        """The sha256 of ``path``'s content (cached by size and modification time)."""
        return self._digests.digest(path)

    def make(self, step: str, settings: Dict, inputs: Iterable[str] = (), upstream: Optional[str] = None) -> str:
        """The stamp of ``step``: a digest of its settings, its input files' contents and the stamp of
        the step it reads from."""
        record = {
            "step": step,
            "settings": settings,
            "inputs": {os.path.abspath(p): self.file_digest(p) if os.path.isfile(p) else None for p in inputs},
            "upstream": upstream,
        }
        text = json.dumps(record, sort_keys=True, default=str)
        self._records[step] = text
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _path(self, step: str) -> str:
        return os.path.join(self.folder, STAMP_DIR, f"{step}.stamp")

    def current(self, step: str, stamp: str, outputs: Iterable[str]) -> bool:
        """Whether every output exists and was made with ``stamp``."""
        try:
            with open(self._path(step), encoding="utf-8") as f:
                recorded = f.read().strip()
        except OSError:
            return False
        return recorded == stamp and all(os.path.exists(p) for p in outputs)

    def invalidate(self, step: str, outputs: Iterable[str]) -> None:
        """Remove the stamp of ``step`` and its previous outputs (files or folders), so nothing reads them."""
        try:
            os.remove(self._path(step))
        except FileNotFoundError:
            pass
        for path in outputs:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)

    def step(self, step: str, outputs: Sequence[str], settings: Dict, inputs: Iterable[str] = (),
             upstream: Optional[str] = None, run: Callable[[], None] = lambda: None, log=print) -> str:
        """Run ``run`` unless ``outputs`` exist and were made with this step's stamp; a changed step's old
        outputs are removed first (and ``log`` says so).  Returns the stamp, for the steps that read them."""
        stamp = self.make(step, settings, inputs, upstream)
        if self.current(step, stamp, outputs):
            return stamp
        if any(os.path.lexists(p) for p in outputs):
            log(f"{step}: its inputs or settings changed, or it was interrupted; removing "
                f"{', '.join(outputs)} and redoing it")
        self.invalidate(step, outputs)
        run()
        self.record(step, stamp)
        return stamp

    def record(self, step: str, stamp: str) -> None:
        """Record that ``step``'s outputs were made with ``stamp`` (after they are complete)."""
        path = self._path(step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = unique_tmp(path)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(stamp + "\n")
        os.replace(tmp, path)
        if step in self._records:  # what the stamp was made from, for a reader asking why a step redid
            _write_json(path[: -len(".stamp")] + ".json", json.loads(self._records[step]))
