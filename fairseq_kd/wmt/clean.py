"""Reading and cleaning the training bitexts into ``OUT/train.{src,tgt}``.

A pair is dropped when a side is empty (fairseq's ``clean-corpus-n.perl`` after
BPE drops it anyway; that filter, :func:`fairseq_kd.wmt.rules.clean_corpus_n`, is
the only length filter of the Moses + BPE data).  With the extra cleaning
(``max_words`` > 0, ``max_ratio`` > 0; ``prepare --extra-clean``) a pair is also
dropped when a side has more than ``max_words`` whitespace-separated words or the
word-count ratio exceeds ``max_ratio``, before any tokenization.  Carriage returns
and other characters that some readers take for line breaks are replaced by
spaces; nothing else is changed.
"""

import gzip
import itertools
import os
import re
from typing import Dict, Iterator, Tuple

from tqdm import tqdm

from fairseq_kd.errors import DistillationError
from fairseq_kd.stamps import Stamps
from fairseq_kd.textio import count_lines
from fairseq_kd.wmt.archives import Pair
from fairseq_kd.wmt.log import log

# characters that Python's universal-newline readers (and hence SentencePiece's
# and fairseq-preprocess' callers) or str.splitlines() treat as line breaks
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def raw_lines(path: str) -> Iterator[str]:
    """Lines split on ``\\n`` only (gunzipped when ``.gz``), decoded as UTF-8 (bad bytes replaced)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line in f:
            yield line.rstrip(b"\n").decode("utf-8", errors="replace")


def clean_line(line: str) -> str:
    return _LINE_BREAKS.sub(" ", line).strip()


def keep_pair(src: str, tgt: str, max_words: int = 0, max_ratio: float = 0) -> bool:
    """No side empty; with ``max_words`` / ``max_ratio`` > 0 also the extra cleaning on raw words."""
    ns, nt = len(src.split()), len(tgt.split())
    if ns == 0 or nt == 0 or (max_words > 0 and (ns > max_words or nt > max_words)):
        return False
    return max_ratio <= 0 or max(ns, nt) / min(ns, nt) <= max_ratio


def build_train(pair: Pair, extracted: Dict[str, str], out: str, max_words: int = 0, max_ratio: float = 0) -> Dict[str, Tuple[int, int]]:
    """Concatenate and clean the training corpora into ``OUT/train.{src,tgt}``; returns ``{corpus: (read, kept)}``."""
    dest = {lang: os.path.join(out, f"train.{lang}") for lang in (pair.src, pair.tgt)}
    stats: Dict[str, Tuple[int, int]] = {}
    stamps = Stamps(out)
    inputs = [os.path.join(extracted[b.archive], b.member(lang)) for b in pair.bitexts for lang in (pair.src, pair.tgt)]
    stamp = stamps.make("train", {"bitexts": [b.prefix for b in pair.bitexts], "max_words": max_words,
                                  "max_ratio": max_ratio}, inputs)
    if stamps.current("train", stamp, dest.values()):
        log(f"train.{pair.src}, train.{pair.tgt}: built before from the same bitexts and settings, skipped")
        return stats
    if any(os.path.exists(p) for p in dest.values()):
        log(f"train.{pair.src}, train.{pair.tgt}: the bitexts or the cleaning settings changed; rebuilding them")
    stamps.invalidate("train", list(dest.values()))
    tmp = {lang: path + ".tmp" for lang, path in dest.items()}
    kept_total = 0
    with open(tmp[pair.src], "w", encoding="utf-8") as fs, open(tmp[pair.tgt], "w", encoding="utf-8") as ft:
        for bitext in pair.bitexts:
            folder = extracted[bitext.archive]
            src_path = os.path.join(folder, bitext.member(pair.src))
            tgt_path = os.path.join(folder, bitext.member(pair.tgt))
            read = kept = 0
            pairs = itertools.zip_longest(raw_lines(src_path), raw_lines(tgt_path))
            for s, t in tqdm(pairs, desc=f"clean {bitext.prefix}", unit=" pairs", leave=False):
                if s is None or t is None:
                    raise DistillationError(
                        f"{src_path} and {tgt_path} differ in length (the {'source' if s is None else 'target'} "
                        f"side ends after {read} lines); the archive {bitext.archive} is damaged or not the "
                        f"expected release: move it aside and re-run to download it again"
                    )
                read += 1
                s, t = clean_line(s), clean_line(t)
                if keep_pair(s, t, max_words, max_ratio):
                    fs.write(s + "\n")
                    ft.write(t + "\n")
                    kept += 1
            stats[bitext.prefix] = (read, kept)
            kept_total += kept
            log(f"{bitext.prefix}: {kept} of {read} pairs kept")
    for lang in (pair.src, pair.tgt):
        n = count_lines(tmp[lang])
        if n != kept_total:
            raise DistillationError(f"{tmp[lang]} has {n} lines, expected {kept_total} (a full disk?); re-run "
                                    f"(the step starts over)")
    for lang in (pair.src, pair.tgt):
        os.replace(tmp[lang], dest[lang])
    stamps.record("train", stamp)
    return stats
