"""Downloading files and verifying them against pinned sha256 digests.

Every corpus builder fetches its files through this module:

* :func:`fetch` downloads a URL into ``NAME.part``, hashes it, checks it
  against its pinned sha256 (a mismatching download is deleted) and only then
  renames it to ``NAME``, so a file under its final name is complete and
  verified.  Without ``command`` it reads the URL with :mod:`urllib` (small
  files, optionally gunzipped on the way); with ``command`` (a curl- or
  wget-compatible program, see :func:`download_command`) an interrupted
  download is resumed from ``NAME.part``.
* :func:`obtain` is :func:`fetch` for files kept between runs: a file already
  in place is not downloaded again but verified against its pin, and its
  sha256 is remembered in ``NAME.sha256`` so that an unpinned re-run does not
  hash it again.
* :func:`read_checksums` / :func:`write_checksums` read and write pins in
  ``sha256sum`` format (``HEX  NAME`` per line).

A mismatch is a :class:`~fairseq_kd.errors.DistillationError` naming the
file, both digests, where the pin comes from and the fix.
"""

import gzip
import os
import re
import shlex
import subprocess
import urllib.request
from typing import Callable, Dict, List, Optional

from fairseq_kd.errors import DistillationError
from fairseq_kd.hashing import sha256_of


# ---- manifests ---------------------------------------------------------------------------------


def read_checksums(path: str) -> Dict[str, str]:
    """``{file name: sha256}`` from a ``sha256sum``-style file (``HEX  NAME``; ``#`` comments)."""
    if not os.path.isfile(path):
        raise DistillationError(f"checksum manifest {path} not found; pass a file of 'SHA256  ARCHIVE' lines")
    pins = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
                raise DistillationError(
                    f"{path} line {number}: expected 'SHA256  ARCHIVE' (as written by sha256sum), got {line!r}"
                )
            pins[os.path.basename(fields[1].lstrip("*"))] = fields[0].lower()
    return pins


def write_checksums(path: str, digests: Dict[str, str]) -> None:
    """Write ``{file name: sha256}`` to ``path`` in ``sha256sum`` format (sorted by name)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for name in sorted(digests):
            f.write(f"{digests[name]}  {name}\n")
    os.replace(tmp, path)


def manifest_pin(pins: Optional[Dict[str, str]], name: str, manifest: Optional[str]) -> Optional[str]:
    """The sha256 ``manifest`` pins for ``name`` (None without a manifest); a missing pin is an error."""
    if pins is None:
        return None
    pinned = pins.get(name)
    if pinned is None:
        raise DistillationError(
            f"{manifest} has no sha256 for {name}; add a line '<sha256>  {name}' "
            f"(a run without --checksums writes the observed ones to OUT/checksums.observed)"
        )
    return pinned


# ---- fetching ----------------------------------------------------------------------------------


def download_command(download: str, url: str, dest: str) -> List[str]:
    """The argv that fetches ``url`` into ``dest`` with a curl- or wget-compatible ``download``."""
    cmd = shlex.split(download)
    if not cmd:
        raise DistillationError("DOWNLOAD is empty; set it to curl or wget (or unset it)")
    if os.path.basename(cmd[0]).startswith("wget"):
        return cmd + ["--continue", "--tries=3", "-O", dest, url]
    return cmd + ["--fail", "--location", "--retry", "3", "--continue-at", "-", "--output", dest, url]


def _run_download_command(url: str, part: str, download: str) -> None:
    cmd = download_command(download, url, part)
    try:
        status = subprocess.run(cmd).returncode
    except FileNotFoundError:
        raise DistillationError(
            f"download command {cmd[0]!r} not found; install curl or set DOWNLOAD to a curl- or wget-compatible command"
        )
    if status != 0 or not os.path.exists(part):
        raise DistillationError(
            f"downloading {url} into {part} failed ({cmd[0]} exit status {status}); "
            f"check the network and re-run (a partial download is resumed; delete {part} to start over)"
        )


def _urlopen_into(url: str, part: str, dest: str, gunzip: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
        if gunzip:
            payload = gzip.decompress(payload)
    except (OSError, EOFError) as e:
        raise DistillationError(f"cannot download {url} into {dest} ({e}); copy the file there by hand")
    with open(part, "wb") as f:
        f.write(payload)


def fetch(url: str, dest: str, *, command: Optional[str] = None, gunzip: bool = False,
          expected: Optional[str] = None, pinned_by: Optional[str] = None) -> str:
    """Download ``url`` to ``dest`` through ``dest.part``; returns its sha256.

    With ``command`` (curl or wget compatible) a ``dest.part`` left by an
    interrupted run is resumed; without, the URL is read with urllib (and
    gunzipped when ``gunzip``: ``expected`` is then the digest of the
    decompressed file).  When ``expected`` is given the file must have that
    sha256 (pinned by ``pinned_by``), or it is deleted and an error raised.
    """
    part = dest + ".part"
    if command is not None:
        if gunzip:
            raise ValueError("fetch: gunzip is only supported without a download command")
        _run_download_command(url, part, command)
    else:
        _urlopen_into(url, part, dest, gunzip)
    digest = sha256_of(part)
    if expected is not None and digest != expected:
        os.remove(part)
        raise DistillationError(
            f"{dest}: the download from {url} has sha256 {digest} but {pinned_by} pins {expected}; "
            f"it was deleted: re-run to fetch it again, or correct the pin in {pinned_by} if the file changed upstream"
        )
    os.replace(part, dest)
    return digest


def obtain(url: str, dest: str, *, command: Optional[str] = None, expected: Optional[str] = None,
           pinned_by: Optional[str] = None, log: Callable[[str], None] = lambda message: None) -> str:
    """``dest``, downloaded by :func:`fetch` unless present; returns its sha256 (verified against ``expected``).

    The digest is kept in ``dest.sha256``: a file already in place is hashed
    again only when it has a pin to be checked against (or no such record).
    """
    name = os.path.basename(dest)
    record = dest + ".sha256"
    if os.path.exists(dest):
        if expected is None and os.path.exists(record):
            with open(record, encoding="utf-8") as f:
                digest = f.read().strip()
        else:
            digest = sha256_of(dest)
        if expected is not None and digest != expected:
            raise DistillationError(
                f"{dest} has sha256 {digest} but {pinned_by} pins {expected}; "
                f"delete {dest} to download it again, or correct the pin in {pinned_by}"
            )
        log(f"{name}: downloaded before, skipped")
    else:
        log(f"{name}: downloading {url}")
        digest = fetch(url, dest, command=command, expected=expected, pinned_by=pinned_by)
    with open(record + ".tmp", "w", encoding="utf-8") as f:
        f.write(digest + "\n")
    os.replace(record + ".tmp", record)
    return digest
