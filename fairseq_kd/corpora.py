"""Where the bundled corpora come from, and how to find or fetch them.

A corpus is a folder with ``{train,valid,test}.{lang}`` files (plain text or
``.gz``).  :func:`locate_corpus` uses the local copy when the folder exists
(``../shared/data/<name>`` in this project's checkouts) and otherwise
downloads the files from the corpus' official source into that folder,
verifying each file's sha256 before renaming it into place.
"""

import gzip
import hashlib
import io
import os
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

from fairseq_kd.errors import DistillationError

MULTI30K = (
    "https://raw.githubusercontent.com/multi30k/dataset/"
    "a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/"
)


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: str  # of the file as stored locally (after gunzip when ``gunzip``)
    gunzip: bool = False


CORPORA: Dict[str, Dict[str, RemoteFile]] = {
    "multi30k_en_de": {
        "train.en.gz": RemoteFile(MULTI30K + "train.en.gz", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
        "train.de.gz": RemoteFile(MULTI30K + "train.de.gz", "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6"),
        "valid.en": RemoteFile(MULTI30K + "val.en.gz", "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227", True),
        "valid.de": RemoteFile(MULTI30K + "val.de.gz", "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660", True),
        "test.en": RemoteFile(MULTI30K + "test_2016_flickr.en.gz", "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182", True),
        "test.de": RemoteFile(MULTI30K + "test_2016_flickr.de.gz", "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16", True),
    },
    "multi30k_en_fr": {
        "train.en.gz": RemoteFile(MULTI30K + "train.en.gz", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
        "train.fr.gz": RemoteFile(MULTI30K + "train.fr.gz", "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c"),
        "valid.en": RemoteFile(MULTI30K + "val.en.gz", "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227", True),
        "valid.fr": RemoteFile(MULTI30K + "val.fr.gz", "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc", True),
        "test.en": RemoteFile(MULTI30K + "test_2016_flickr.en.gz", "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182", True),
        "test.fr": RemoteFile(MULTI30K + "test_2016_flickr.fr.gz", "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6", True),
    },
}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(remote: RemoteFile, dest: str) -> None:
    """Fetch ``remote`` into ``dest`` (through ``dest.tmp``), verifying its sha256."""
    tmp = dest + ".tmp"
    try:
        with urllib.request.urlopen(remote.url, timeout=60) as response:
            payload = response.read()
    except OSError as e:
        raise DistillationError(
            f"cannot download {remote.url} into {dest} ({e}); copy the corpus there by hand"
        )
    if remote.gunzip:
        payload = gzip.decompress(payload)
    with open(tmp, "wb") as f:
        f.write(payload)
    digest = sha256_of(tmp)
    if digest != remote.sha256:
        os.remove(tmp)
        raise DistillationError(
            f"checksum mismatch for {dest} from {remote.url}: got {digest}, expected {remote.sha256}"
        )
    os.replace(tmp, dest)


def locate_corpus(name: str, data_root: str) -> str:
    """Return ``data_root/name``, downloading the corpus there if it is absent."""
    folder = os.path.join(data_root, name)
    files = CORPORA.get(name)
    if os.path.isdir(folder) and (files is None or all(os.path.exists(os.path.join(folder, f)) for f in files)):
        return folder
    if files is None:
        raise DistillationError(
            f"corpus folder {folder} not found and {name!r} has no download source; "
            f"put {{train,valid,test}}.<lang> files there (known downloads: {', '.join(CORPORA)})"
        )
    os.makedirs(folder, exist_ok=True)
    for filename, remote in files.items():
        dest = os.path.join(folder, filename)
        if not os.path.exists(dest):
            download(remote, dest)
    return folder


def split_path(corpus_dir: str, split: str, lang: str) -> str:
    for candidate in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        path = os.path.join(corpus_dir, candidate)
        if os.path.exists(path):
            return path
    raise DistillationError(
        f"{os.path.join(corpus_dir, f'{split}.{lang}')} (or .gz) not found; "
        f"a corpus folder holds {{train,valid,test}}.<lang> files"
    )


def read_lines(path: str, limit: Optional[int] = None) -> Iterator[str]:
    """Lines of a text file (transparently gunzipped), without the newline."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as raw:
        with io.TextIOWrapper(raw, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    break
                yield line.rstrip("\n")
