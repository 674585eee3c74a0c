"""sha256 digests: of a file, and of a data directory's dictionaries in the one format that checkpoints,
teacher caches and CTranslate2 conversions record (``{"dict.en.txt": HEX, ...}``); docs/architecture.md."""

import hashlib
import os
from typing import Dict, Iterable

from tqdm import tqdm


def sha256_of(path: str) -> str:
    """The hex sha256 of ``path`` (with a progress bar for files of 64 MiB and more)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {os.path.basename(path)}",
        leave=False, disable=size < (64 << 20),
    ) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def dictionary_hashes(data: str, langs: Iterable[str]) -> Dict[str, str]:
    """``{"dict.LANG.txt": sha256}`` of the dictionaries of ``langs`` found in the data directory ``data``
    (the first of a ``DIR1:DIR2`` list, as fairseq reads its dictionaries from there)."""
    data_dir = str(data).split(":")[0]
    hashes = {}
    for lang in langs:
        name = f"dict.{lang}.txt"
        if lang and os.path.isfile(os.path.join(data_dir, name)):
            hashes[name] = sha256_of(os.path.join(data_dir, name))
    return hashes
