"""Extracting the wanted members of a downloaded .tgz/.tar/.zip archive, one streaming pass per archive."""

import os
import shutil
import tarfile
import zipfile
from typing import Dict, List, Optional, Sequence

from fairseq_kd.errors import DistillationError
from fairseq_kd.wmt.log import log

#: ``DEST/.archive.sha256``: the sha256 of the archive the members were extracted from
SOURCE = ".archive.sha256"


def _normalize(member: str) -> str:
    while member.startswith("./"):
        member = member[2:]
    return member


def _match(member: str, wanted: Sequence[str]) -> Optional[str]:
    """The entry of ``wanted`` that ``member`` is (also under another top folder), or None."""
    norm = _normalize(member)
    for w in wanted:
        if norm == w or norm.endswith("/" + w):
            return w
    return None


def extract_members(archive_path: str, wanted: Sequence[str], dest_dir: str,
                    archive_sha256: Optional[str] = None) -> None:
    """Extract the ``wanted`` members of a .tgz/.tar/.zip to ``dest_dir/<wanted>``.

    A member matches when its path is ``wanted`` or ends with ``/wanted``; a
    .tgz is read in one streaming pass.  Members are extracted into
    ``dest_dir.tmp`` and renamed into place one by one, so a file in
    ``dest_dir`` is complete, and only missing ones are extracted (pairs that
    share an archive, e.g. Europarl v7 for en-de and en-fr, add their members).
    Given ``archive_sha256``, members extracted from another copy of the archive
    (another recorded sha256, or none) are removed and extracted again.
    """
    source = os.path.join(dest_dir, SOURCE)
    if archive_sha256 is not None and os.path.isdir(dest_dir):
        try:
            with open(source, encoding="utf-8") as f:
                recorded = f.read().strip()
        except OSError:
            recorded = None
        if recorded != archive_sha256:  # extracted from another download of the archive (or before records)
            log(f"{os.path.basename(archive_path)}: its members were extracted from another copy; extracting again")
            shutil.rmtree(dest_dir)
    missing = [w for w in wanted if not os.path.exists(os.path.join(dest_dir, w))]
    if not missing:
        return
    tmp = dest_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log(f"{os.path.basename(archive_path)}: extracting {', '.join(missing)}")
    found: Dict[str, List[str]] = {w: [] for w in missing}
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as z:
                for name in z.namelist():
                    w = _match(name, missing)
                    if w is not None and not name.endswith("/"):
                        found[w].append(name)
                        _copy_stream(z.open(name), os.path.join(tmp, w))
        else:
            with tarfile.open(archive_path, mode="r|*") as t:
                for member in t:
                    w = _match(member.name, missing) if member.isfile() else None
                    if w is not None:
                        found[w].append(member.name)
                        _copy_stream(t.extractfile(member), os.path.join(tmp, w))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistillationError(f"cannot read {archive_path} ({e}): a damaged download; move it aside and re-run "
                                f"to download it again")
    for w, names in found.items():
        if len(names) != 1:
            shutil.rmtree(tmp, ignore_errors=True)
            what = "no member" if not names else f"{len(names)} members ({', '.join(names)}) for"
            raise DistillationError(
                f"{archive_path} has {what} {w}; it is damaged or not the expected release: move it aside and re-run "
                f"to download it again"
            )
    for w in missing:
        os.makedirs(os.path.dirname(os.path.join(dest_dir, w)), exist_ok=True)
        os.replace(os.path.join(tmp, w), os.path.join(dest_dir, w))
    shutil.rmtree(tmp, ignore_errors=True)
    if archive_sha256 is not None:
        with open(source + ".tmp", "w", encoding="utf-8") as f:
            f.write(archive_sha256 + "\n")
        os.replace(source + ".tmp", source)


def _copy_stream(source, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with source, open(dest, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
