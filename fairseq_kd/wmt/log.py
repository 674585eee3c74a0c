"""The progress lines of ``prepare-wmt`` on stderr (``[prepare-wmt] ...``)."""

import sys

PROG = "prepare-wmt"


def log(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)
