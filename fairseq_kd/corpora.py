"""Where the bundled corpora come from, and how to find or fetch them.

A corpus is a folder with ``{train,valid,test}.{lang}`` files (plain text or
``.gz``).  :func:`locate_corpus` uses the local copy when the folder exists
(``../shared/data/<name>`` in this project's checkouts) and otherwise
downloads the files from the corpus' official source into that folder
through :mod:`fairseq_kd.download`, which verifies each file's pinned sha256
before renaming it into place.
"""

import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

from fairseq_kd.download import fetch, sha256_of  # noqa: F401  (sha256_of: the name this module had)
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


# (local split, Multi30k file stem, gunzipped locally): train stays .gz, valid/test are stored as text
_MULTI30K_SPLITS = (("train", "train", False), ("valid", "val", True), ("test", "test_2016_flickr", True))
_MULTI30K_EN = {
    "train": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "valid": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "test": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
}


def _multi30k(lang: str, sha256s: Dict[str, str]) -> Dict[str, RemoteFile]:
    """The Multi30k task 1 files of an English-``lang`` corpus; ``sha256s`` of the ``lang`` side per split."""
    files = {}
    for split, stem, gunzip in _MULTI30K_SPLITS:
        for side, digest in (("en", _MULTI30K_EN[split]), (lang, sha256s[split])):
            local = f"{split}.{side}" if gunzip else f"{split}.{side}.gz"
            files[local] = RemoteFile(f"{MULTI30K}{stem}.{side}.gz", digest, gunzip)
    return files


CORPORA: Dict[str, Dict[str, RemoteFile]] = {
    "multi30k_en_de": _multi30k("de", {
        "train": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
        "valid": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
        "test": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    }),
    "multi30k_en_fr": _multi30k("fr", {
        "train": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
        "valid": "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc",
        "test": "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6",
    }),
}


def download(remote: RemoteFile, dest: str) -> None:
    """Fetch ``remote`` into ``dest`` (through ``dest.part``), verifying its sha256."""
    fetch(remote.url, dest, gunzip=remote.gunzip, expected=remote.sha256, pinned_by="fairseq_kd/corpora.py")


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
    """Lines of a text file (transparently gunzipped), without the newline (:func:`fairseq_kd.textio.read_text_lines`)."""
    from fairseq_kd.textio import read_text_lines

    yield from read_text_lines(path, limit)
