"""Building a WMT corpus folder: download and verify the archives, extract, clean, fetch the test sets.

:func:`prepare` runs the steps in order, each skipped when its output is
already there and was made from the same inputs and settings (the archive's sha256,
:mod:`fairseq_kd.stamps`); :func:`write_readme` records the provenance in ``OUT/README.md``.
"""

import os
from typing import Dict, Optional

from fairseq_kd.download import manifest_pin, obtain, read_checksums, write_checksums
from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import count_lines
from fairseq_kd.wmt.archives import PAIRS, Archive, Pair
from fairseq_kd.wmt.clean import build_train
from fairseq_kd.wmt.extract import extract_members
from fairseq_kd.wmt.log import log
from fairseq_kd.wmt.testsets import fetch_test_set


def fetch_archive(archive: Archive, orig: str, download: str, pins: Optional[Dict[str, str]],
                  manifest: Optional[str]) -> str:
    """``ORIG/NAME``, downloaded with the ``download`` command unless present; returns its sha256
    (verified against ``pins``, read from ``manifest``)."""
    return obtain(
        archive.url, os.path.join(orig, archive.name), command=download,
        expected=manifest_pin(pins, archive.name, manifest), pinned_by=manifest, log=log,
    )


def write_readme(pair_name: str, pair: Pair, out: str, orig: str, digests: Dict[str, str],
                 manifest: Optional[str], max_words: int, max_ratio: float) -> None:
    counts = {f"{split}.{lang}": count_lines(os.path.join(out, f"{split}.{lang}"))
              for split in ("train", "valid", "test") for lang in (pair.src, pair.tgt)}
    lines = [
        f"# {pair.corpus}: WMT {pair_name}, raw text built by `python -m fairseq_kd.wmt prepare`",
        "",
        "| archive | url | sha256 (observed) |",
        "|---|---|---|",
        *[f"| {a.name} | {a.url} | {digests[a.name]} |" for a in pair.archives],
        "",
        ("Archive checksums verified against " + manifest) if manifest
        else "Archive checksums NOT verified (no --checksums manifest); pin them with checksums.observed.",
        "",
        "Training corpora, in order: " + ", ".join(f"{b.archive}:{b.member('{' + pair.src + ',' + pair.tgt + '}')}" for b in pair.bitexts),
        (f"Cleaning: pairs with an empty side, more than {max_words} words or a word-count ratio over {max_ratio} dropped "
         "(--extra-clean)." if max_words > 0 or max_ratio > 0 else
         "Cleaning: pairs with an empty side dropped; the length filter is clean-corpus-n after BPE (prepare_bpe)."),
        f"valid: {pair.valid.label} (sacrebleu -t {pair.valid.sacrebleu}); test: {pair.test.label} (sacrebleu -t {pair.test.sacrebleu}).",
        f"Downloads: {orig}",
        "",
        "| file | lines |",
        "|---|---:|",
        *[f"| {name} | {n} |" for name, n in counts.items()],
    ]
    tmp = os.path.join(out, "README.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "README.md"))


def prepare(pair_name: str, out: str, orig: Optional[str] = None, checksums: Optional[str] = None,
            download: str = "curl", sacrebleu: str = "sacrebleu", max_words: int = 0, max_ratio: float = 0) -> str:
    """Build the corpus folder ``out`` for ``pair_name``; returns ``out``."""
    if pair_name not in PAIRS:
        raise DistillationError(f"unknown pair {pair_name!r}; choose one of {', '.join(PAIRS)}")
    pair = PAIRS[pair_name]
    orig = orig or os.path.join(out, "orig")
    os.makedirs(out, exist_ok=True)
    os.makedirs(orig, exist_ok=True)
    pins = read_checksums(checksums) if checksums else None
    digests = {a.name: fetch_archive(a, orig, download, pins, checksums) for a in pair.archives}
    write_checksums(os.path.join(out, "checksums.observed"), digests)
    extracted = {}
    for archive in pair.archives:
        wanted = [b.member(lang) for b in pair.bitexts if b.archive == archive.name for lang in (pair.src, pair.tgt)]
        folder = os.path.join(orig, archive.name + ".d")
        extract_members(os.path.join(orig, archive.name), wanted, folder, digests[archive.name])
        extracted[archive.name] = folder
    build_train(pair, extracted, out, max_words, max_ratio)
    fetch_test_set(pair, "valid", pair.valid, out, sacrebleu)
    fetch_test_set(pair, "test", pair.test, out, sacrebleu)
    write_readme(pair_name, pair, out, orig, digests, checksums, max_words, max_ratio)
    n = {split: count_lines(os.path.join(out, f"{split}.{pair.src}")) for split in ("train", "valid", "test")}
    log(f"{out}: train {n['train']}, valid {n['valid']}, test {n['test']} pairs; "
        f"archive sha256s in {os.path.join(out, 'checksums.observed')}")
    return out
