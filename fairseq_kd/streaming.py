"""Streaming, order-preserving line processing in ``workers`` processes, in bounded memory.

A file is read in chunks of ``chunk_lines`` lines; each chunk goes to a worker process, which applies a
per-process function built once by ``factory(*args)`` (a tokenizer, a BPE model); the results are written
in input order.  At most ``2 * workers`` chunks are in flight, so memory does not grow with the file.  The
output goes to a temporary name renamed when complete: a finished file is a finished step, and an
interrupted one is redone.  Progress (lines and lines/s) is shown by tqdm.  See docs/data_preparation.md.
"""

import itertools
import multiprocessing
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence

from tqdm import tqdm

from fairseq_kd.textio import count_lines, read_text_lines, unique_tmp

CHUNK_LINES = 2000
_WORKER: dict = {}


def _init(factory: Callable, args: Sequence) -> None:
    _WORKER["fn"] = factory(*args)


def _run(chunk: List[str]) -> Any:
    return _WORKER["fn"](chunk)


def chunked(lines: Iterable[str], size: int) -> Iterator[List[str]]:
    chunk: List[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ordered_map(factory: Callable, args: Sequence, chunks: Iterable[List[str]], workers: int) -> Iterator[Any]:
    """``factory(*args)(chunk)`` for every chunk, in order; ``workers`` processes (in-process when 1).

    Where processes fork, the function is built here and run on the first line (its result dropped), and
    the workers inherit it warm (compiled patterns, loaded codes) instead of each building its own."""
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
        _WORKER["fn"](first[:1])
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
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
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
        with open(tmp, "w", encoding="utf-8", newline="\n") as out, \
                tqdm(total=total, desc=desc or os.path.basename(dest), unit=" lines", unit_scale=True,
                     leave=False, mininterval=2.0) as bar:
            for result in ordered_map(factory, args, chunked(read_text_lines(src), chunk_lines), workers):
                out.write("".join(line + "\n" for line in result))
                n += len(result)
                bar.update(len(result))
        if n != total:
            raise RuntimeError(f"{dest}: {n} lines written for {total} read")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def reduce_files(factory: Callable, args: Sequence, srcs: Sequence[str], combine: Callable[[Any, Any], Any], start: Any,
                 workers: int = 1, desc: str = "", chunk_lines: int = CHUNK_LINES) -> Any:
    """``combine`` over ``factory(*args)(chunk)`` of every chunk of the files ``srcs`` (e.g. word counts)."""
    def lines():
        for src in srcs:
            yield from read_text_lines(src)

    total = sum(count_lines(s) for s in srcs)
    acc = start
    with tqdm(total=total, desc=desc, unit=" lines", unit_scale=True, leave=False, mininterval=2.0) as bar:
        for chunk_len, result in ordered_map(_Sized, (factory, args), chunked(lines(), chunk_lines), workers):
            acc = combine(acc, result)
            bar.update(chunk_len)
    return acc


class _Sized:
    """A chunk function returning ``(len(chunk), fn(chunk))`` (progress of a reduction)."""

    def __init__(self, factory: Callable, args: Sequence):
        self.fn = factory(*args)

    def __call__(self, chunk: List[str]):
        return len(chunk), self.fn(chunk)
