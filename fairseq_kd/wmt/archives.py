"""What each WMT corpus is made of: archives, training bitexts, valid/test sets, per language pair.

:data:`PAIRS` maps ``en-de``, ``en-fr`` (WMT'14) and ``en-ro`` (WMT'16) to a
:class:`Pair`: the archives to download (the ones fairseq's
``examples/translation`` scripts use), the member files of each training
corpus in order, and the sacrebleu valid and test sets with their sizes.
"""

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Archive:
    name: str  # file name under ORIG (also the name in the checksum manifest)
    url: str


@dataclass(frozen=True)
class Bitext:
    """One training corpus: archive members ``PREFIX.<lang>`` (``+ .gz`` when ``gz``)."""

    archive: str
    prefix: str
    gz: bool = False

    def member(self, lang: str) -> str:
        return f"{self.prefix}.{lang}" + (".gz" if self.gz else "")


@dataclass(frozen=True)
class TestSet:
    """A sacrebleu test set: ``sacrebleu -t NAME -l SRC-TGT --echo src|ref``."""

    sacrebleu: str
    label: str
    lines: int


@dataclass(frozen=True)
class Pair:
    corpus: str  # the corpus folder name run.sh looks for under --data-root
    src: str
    tgt: str
    archives: Tuple[Archive, ...]
    bitexts: Tuple[Bitext, ...]
    valid: TestSet
    test: TestSet


EUROPARL_V7 = Archive("training-parallel-europarl-v7.tgz", "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz")
COMMONCRAWL = Archive("training-parallel-commoncrawl.tgz", "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz")
NEWS_COMMENTARY_V9 = Archive("training-parallel-nc-v9.tgz", "http://statmt.org/wmt14/training-parallel-nc-v9.tgz")
UN = Archive("training-parallel-un.tgz", "http://statmt.org/wmt13/training-parallel-un.tgz")
GIGA_FREN = Archive("training-giga-fren.tar", "http://statmt.org/wmt10/training-giga-fren.tar")
EUROPARL_V8 = Archive(
    "training-parallel-ep-v8.tgz", "http://data.statmt.org/wmt16/translation-task/training-parallel-ep-v8.tgz"
)
SETIMES2 = Archive("SETIMES2.en-ro.txt.zip", "https://object.pouta.csc.fi/OPUS-SETIMES/v2/moses/en-ro.txt.zip")

NEWSTEST2013 = TestSet("wmt13", "newstest2013", 3000)
NEWSTEST2014 = TestSet("wmt14/full", "newstest2014", 3003)

PAIRS: Dict[str, Pair] = {
    "en-de": Pair(
        corpus="wmt14_en_de", src="en", tgt="de",
        archives=(EUROPARL_V7, COMMONCRAWL, NEWS_COMMENTARY_V9),
        bitexts=(
            Bitext(EUROPARL_V7.name, "training/europarl-v7.de-en"),
            Bitext(COMMONCRAWL.name, "commoncrawl.de-en"),
            Bitext(NEWS_COMMENTARY_V9.name, "training/news-commentary-v9.de-en"),
        ),
        valid=NEWSTEST2013, test=NEWSTEST2014,
    ),
    "en-fr": Pair(
        corpus="wmt14_en_fr", src="en", tgt="fr",
        archives=(EUROPARL_V7, COMMONCRAWL, UN, NEWS_COMMENTARY_V9, GIGA_FREN),
        bitexts=(
            Bitext(EUROPARL_V7.name, "training/europarl-v7.fr-en"),
            Bitext(COMMONCRAWL.name, "commoncrawl.fr-en"),
            Bitext(UN.name, "un/undoc.2000.fr-en"),
            Bitext(NEWS_COMMENTARY_V9.name, "training/news-commentary-v9.fr-en"),
            Bitext(GIGA_FREN.name, "giga-fren.release2.fixed", gz=True),
        ),
        valid=NEWSTEST2013, test=NEWSTEST2014,
    ),
    "en-ro": Pair(
        corpus="wmt16_en_ro", src="en", tgt="ro",
        archives=(EUROPARL_V8, SETIMES2),
        bitexts=(
            Bitext(EUROPARL_V8.name, "training-parallel-ep-v8/europarl-v8.ro-en"),
            Bitext(SETIMES2.name, "SETIMES.en-ro"),
        ),
        valid=TestSet("wmt16/dev", "newsdev2016", 1999),
        test=TestSet("wmt16", "newstest2016", 1999),
    ),
}
