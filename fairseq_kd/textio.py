"""Small text-file helpers shared by the command-line tools.

* :func:`read_text_lines`: strict UTF-8 with the file and line of a bad byte
  in the error, a UTF-8 byte-order mark dropped, lines split on ``\\n`` only;
* :func:`write_lines_atomic`: a temporary name unique to the process, renamed
  into place when complete; a carriage return or newline inside a line (a
  teacher translation holding a lone ``\\r``) becomes a space, so that every
  reader -- fairseq-preprocess splits on ``\\r`` too -- sees one line per item
  and line counts stay true;
* :func:`read_json_manifest`: a manifest's JSON, one-line errors when missing or not JSON;
* :func:`count_lines`: the lines, a last one without a final newline included.
"""

import gzip
import json
import logging
import os
import uuid
from typing import Dict, Iterable, Iterator, Optional

from fairseq_kd.errors import DistillationError

logger = logging.getLogger("fairseq_kd.textio")

BOM = "\ufeff"


def unique_tmp(path: str) -> str:
    """``path.tmp<pid>-<random>``: a temporary name no other process (or node) writes to."""
    return f"{path}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"


def read_text_lines(path: str, limit: Optional[int] = None) -> Iterator[str]:
    """The lines of a UTF-8 text file (transparently gunzipped) without their newline; a byte-order mark
    at the start is dropped.  A missing file or invalid UTF-8 raises :class:`DistillationError` naming the file and line."""
    if not os.path.isfile(path):
        raise DistillationError(f"{path} not found; check the path")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for i, raw in enumerate(f):
            if limit is not None and i >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DistillationError(
                    f"{path}:{i + 1}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                    f"re-encode the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or remove the line"
                )
            if i == 0 and line.startswith(BOM):
                line = line[len(BOM):]
            yield line.rstrip("\n").rstrip("\r") if line.endswith("\n") else line


def read_json_manifest(path: str, missing: str, invalid: str) -> Dict:
    """The JSON object of a manifest file (a teacher cache's, a decode's); one-line errors naming ``path``:
    ``missing`` ends the message of a missing file, ``invalid`` that of a file that is not JSON."""
    if not os.path.isfile(path):
        raise DistillationError(f"{path} not found{missing}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise DistillationError(f"{path} is not valid JSON ({e}); {invalid}") from None


def clean_line(line: str) -> str:
    """``line`` with carriage returns and newlines inside it turned into spaces."""
    if "\r" in line or "\n" in line:
        return line.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return line


def write_lines_atomic(path: str, lines: Iterable[str]) -> int:
    """Write ``lines`` (without newlines) to ``path`` through a temporary name unique to this process and
    rename it into place, so an interrupted run never leaves a partial file under the final name.  A
    carriage return or newline inside a line becomes a space (logged).  Returns the number of lines."""
    tmp = unique_tmp(path)
    n = cleaned = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                fixed = clean_line(line)
                cleaned += fixed is not line
                f.write(fixed + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if cleaned:
        logger.warning("%s: %d line(s) held a carriage return or newline, replaced by a space", path, cleaned)
    return n


def first_lone_carriage_return(path: str) -> Optional[int]:
    """The 1-based number of the first line holding a carriage return not followed by its newline (which
    fairseq's readers take as a line break while ``wc -l`` does not), or None."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            body = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
            if b"\r" in body:
                return i
    return None


def count_lines(path: str) -> int:
    """Number of lines of ``path``; a last line without a final newline is a line (``wc -l`` misses it)."""
    with open(path, "rb") as f:
        return sum(1 for _ in f)
