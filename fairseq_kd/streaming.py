"""Streaming, order-preserving line processing in ``workers`` processes, in bounded memory.

A file is read in chunks of ``chunk_lines`` lines, handed to a worker process as raw bytes; the worker
decodes them (as :func:`fairseq_kd.textio.read_text_lines` does), applies a per-process function built once
by ``factory(*args)`` (a tokenizer, a BPE model) and returns its lines encoded, which the main process writes
in input order: the main process only moves bytes, so the work scales with the workers.  At most ``2 * workers`` chunks are in flight, so memory does not grow with the file.  The
output goes to a temporary name renamed when complete: a finished file is a finished step, and an
interrupted one is redone.  Progress (lines and lines/s) is shown by tqdm.  See docs/data_preparation.md.
"""

import gzip
import itertools
import multiprocessing
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import BOM, count_lines, unique_tmp

CHUNK_LINES = 2000
# a reduction's chunks are larger: each returns a summary (e.g. word counts) whose size follows the chunk's
# distinct items, and the main process combines them one by one, so fewer, larger chunks keep it off the path
REDUCE_CHUNK_LINES = 20000
_WORKER: dict = {}


def _init(factory: Callable, args: Sequence) -> None:
    _WORKER["fn"] = factory(*args)


class _WorkerError(Exception):
    """A DistillationError raised in a worker, carried to the main process (the error itself is a SystemExit,
    which a pool worker does not catch: it would end the worker and leave its chunk unanswered)."""


def _run(chunk: Any) -> Any:
    try:
        return _WORKER["fn"](chunk)
    except DistillationError as e:
        raise _WorkerError(e.message) from None


def _get(result) -> Any:
    try:
        return result.get()
    except _WorkerError as e:
        raise DistillationError(str(e)) from None


def raw_chunks(path: str, size: int) -> Iterator[Tuple[bytes, int]]:
    """``(bytes of up to size lines, index of the first line)`` over ``path`` (transparently gunzipped)."""
    if not os.path.isfile(path):
        raise DistillationError(f"{path} not found; check the path")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        first = 0
        while True:
            lines = list(itertools.islice(f, size))
            if not lines:
                return
            yield b"".join(lines), first
            first += len(lines)


def decode_lines(blob: bytes, first: int, path: str) -> List[str]:
    """The lines of ``blob`` (lines ``first``, ``first + 1``, ... of ``path``), as read_text_lines yields them:
    without their newline and the carriage returns before it, a leading byte-order mark dropped, invalid
    UTF-8 a one-line error naming the file and line."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start)
        start = blob.rfind(b"\n", 0, e.start) + 1
        raise DistillationError(
            f"{path}:{first + line + 1}: not valid UTF-8 (byte {blob[e.start:e.start + 1]!r} at column "
            f"{e.start - start + 1}); re-encode the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or remove the line"
        ) from None
    parts = text.split("\n")
    last = parts.pop()  # "" when the blob ends with a newline
    lines = [line.rstrip("\r") for line in parts] if "\r" in text else parts
    if last:
        lines.append(last)
    if first == 0 and lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM):]
    return lines


class OnBytes:
    """A chunk function over raw bytes: ``(blob, first) -> (lines, result)``, ``result`` the encoded output
    lines of ``fn`` (``encode``) or its own return value (a reduction's)."""

    def __init__(self, factory: Callable, args: Sequence, path: str, encode: bool = True):
        self.fn, self.path, self.encode = factory(*args), path, encode

    def __call__(self, task: Tuple[bytes, int]) -> Tuple[int, Any]:
        lines = decode_lines(task[0], task[1], self.path)
        result = self.fn(lines)
        if self.encode:
            result = "".join(line + "\n" for line in result).encode("utf-8")
        return len(lines), result

    @staticmethod
    def warm(fn: "OnBytes", task: Tuple[bytes, int]) -> None:
        fn((task[0][:task[0].find(b"\n") + 1 or None], task[1]))


def _warm_first_line(fn: Callable, chunk: List[str]) -> None:
    fn(chunk[:1])


def ordered_map(factory: Callable, args: Sequence, chunks: Iterable[Any], workers: int,
                warm: Callable[[Callable, Any], None] = _warm_first_line) -> Iterator[Any]:
    """``factory(*args)(chunk)`` for every chunk, in order; ``workers`` processes (in-process when 1).

    Where processes fork, the function is built here and run by ``warm`` on a piece of the first chunk
    (its first line; the result dropped), and the workers inherit it warm (compiled patterns, loaded codes)
    instead of each building its own."""
    chunks = iter(chunks)
    if workers <= 1:
        fn = factory(*args)
        for chunk in chunks:
            yield fn(chunk)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    if fork:
        first = next(chunks, None)
        if first is None:
            return
        _WORKER["fn"] = factory(*args)
        warm(_WORKER["fn"], first)
        chunks = itertools.chain([first], chunks)
        pool = multiprocessing.get_context("fork").Pool(workers)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init, initargs=(factory, tuple(args)))
    try:
        with pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_run, (chunk,)))
                if len(pending) >= 2 * workers:
                    yield _get(pending.popleft())
            while pending:
                yield _get(pending.popleft())
    finally:
        _WORKER.pop("fn", None)


def map_file(factory: Callable, args: Sequence, src: str, dest: str, workers: int = 1, desc: Optional[str] = None,
             chunk_lines: int = CHUNK_LINES) -> int:
    """Write ``factory(*args)`` applied to the lines of ``src`` to ``dest`` (one output line per input
    line, in order); skipped when ``dest`` exists.  Returns the number of lines of ``dest``."""
    if os.path.exists(dest):
        return count_lines(dest)
    total = count_lines(src)
    tmp = unique_tmp(dest)
    n = 0
    try:
        with open(tmp, "wb") as out, \
                tqdm(total=total, desc=desc or os.path.basename(dest), unit=" lines", unit_scale=True,
                     leave=False, mininterval=2.0) as bar:
            for lines, data in ordered_map(OnBytes, (factory, args, src), raw_chunks(src, chunk_lines), workers,
                                           warm=OnBytes.warm):
                out.write(data)
                n += lines
                bar.update(lines)
        if n != total:
            raise RuntimeError(f"{dest}: {n} lines written for {total} read")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def reduce_files(factory: Callable, args: Sequence, srcs: Sequence[str], combine: Callable[[Any, Any], Any], start: Any,
                 workers: int = 1, desc: str = "", chunk_lines: int = REDUCE_CHUNK_LINES) -> Any:
    """``combine`` over ``factory(*args)(chunk)`` of every chunk of the files ``srcs`` (e.g. word counts)."""
    total = sum(count_lines(s) for s in srcs)
    acc = start
    with tqdm(total=total, desc=desc, unit=" lines", unit_scale=True, leave=False, mininterval=2.0) as bar:
        for src in srcs:
            for lines, result in ordered_map(OnBytes, (factory, args, src, False), raw_chunks(src, chunk_lines),
                                             workers, warm=OnBytes.warm):
                acc = combine(acc, result)
                bar.update(lines)
    return acc
