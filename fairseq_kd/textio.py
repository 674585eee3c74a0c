"""Small text-file helpers shared by the command-line tools."""

import os
from typing import Iterable


def write_lines_atomic(path: str, lines: Iterable[str]) -> int:
    """Write ``lines`` (without newlines) to ``path`` through ``path.tmp`` and
    rename it into place, so an interrupted run never leaves a partial file
    under the final name.  Returns the number of lines written."""
    tmp = path + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def count_lines(path: str) -> int:
    """Number of lines of ``path`` (newline characters, as ``wc -l`` counts)."""
    with open(path, "rb") as f:
        return sum(1 for _ in f)
