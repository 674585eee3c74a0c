"""The WMT corpora of the distillation papers, built from their official sources.

::

    python -m fairseq_kd.wmt prepare --pair en-de --out corpora/wmt14_en_de [--checksums FILE]
    python -m fairseq_kd.wmt average --dir student/ --last 5 --upper-bound 200000 --output avg.pt

``prepare`` writes a corpus folder ``OUT/{train,valid,test}.{src,tgt}`` (raw,
untokenized text: :mod:`fairseq_kd.prepare` learns SentencePiece on it later):

* **en-de**, WMT'14: Europarl v7, Common Crawl, News Commentary v9; valid
  newstest2013, test newstest2014 (the 3003-sentence "full" set);
* **en-fr**, WMT'14: Europarl v7, Common Crawl, UN, News Commentary v9, Giga
  French-English; valid newstest2013, test newstest2014 (full);
* **en-ro**, WMT'16: Europarl v8, SETIMES2; valid newsdev2016, test newstest2016.

The training archives are the ones fairseq's ``examples/translation``
scripts download (``prepare-wmt14en2{de,fr}.sh``; for En-Ro the WMT'16 task
page's Europarl v8 and OPUS' SETIMES2).  Each archive is fetched with
``DOWNLOAD`` (a curl- or wget-compatible command, ``curl`` by default) into
``ORIG/NAME.part`` (resumed if interrupted), hashed and renamed to
``ORIG/NAME``; an archive already there is not downloaded again.  With
``--checksums FILE`` (``sha256sum`` format: ``HEX  NAME`` per line) every
archive must match its pinned sha256.  The observed sha256 of every archive is
written to ``OUT/checksums.observed`` in the same format, ready to be pinned.
The valid and test sets come from sacrebleu's own downloader (``SACREBLEU``,
``sacrebleu`` by default: ``sacrebleu -t wmt14/full -l en-de --echo src``),
which verifies its md5 checksums.

Only training pairs with an empty side are dropped (``--extra-clean`` adds the
project's raw filter: more than ``--max-words`` words or a word-count ratio over
``--max-ratio``); the length filter of fairseq's recipes, ``clean-corpus-n.perl
-ratio 1.5 ... 1 250`` after BPE, is :mod:`fairseq_kd.prepare_bpe`'s.  Carriage
returns and other characters that some readers take for line breaks are replaced
by spaces; nothing else is changed.  Every file is
written under a temporary name and renamed when complete, and the line counts
of source and target (and of the test sets, against their published sizes) are
asserted.

``average`` averages the parameters of the last N interval checkpoints
(``checkpoint_<epoch>_<update>.pt``) of a save directory, like fairseq's
``scripts/average_checkpoints.py --num-update-checkpoints N
--checkpoint-upper-bound U``: it is :func:`fairseq_kd.checkpoints.main_average`
(``fairseq-kd-average-checkpoints``), kept here for the recipes.

The package, one concept a module: :mod:`~fairseq_kd.wmt.archives` (what each
pair is made of, :data:`PAIRS`), :mod:`fairseq_kd.download` (download and
sha256 verification, shared with :mod:`fairseq_kd.corpora`),
:mod:`~fairseq_kd.wmt.extract` (archive members),
:mod:`~fairseq_kd.wmt.clean` (cleaning into ``train.*``),
:mod:`~fairseq_kd.wmt.rules` (the line-level rules of fairseq's and the WMT'16 scripts, used by
:mod:`fairseq_kd.prepare_bpe`),
:mod:`~fairseq_kd.wmt.testsets` (sacrebleu valid/test sets),
:mod:`~fairseq_kd.wmt.build` (:func:`prepare`, ``README.md``) and
:mod:`~fairseq_kd.wmt.cli` (:func:`main`).
"""

from fairseq_kd.checkpoints import average_checkpoints, last_checkpoints
from fairseq_kd.download import download_command, read_checksums, sha256_of, write_checksums
from fairseq_kd.wmt.archives import (
    COMMONCRAWL,
    EUROPARL_V7,
    EUROPARL_V8,
    GIGA_FREN,
    NEWS_COMMENTARY_V9,
    NEWSTEST2013,
    NEWSTEST2014,
    PAIRS,
    SETIMES2,
    UN,
    Archive,
    Bitext,
    Pair,
    TestSet,
)
from fairseq_kd.wmt.build import fetch_archive, prepare, write_readme
from fairseq_kd.wmt.clean import build_train, clean_line, keep_pair, raw_lines
from fairseq_kd.wmt.cli import main
from fairseq_kd.wmt.extract import extract_members
from fairseq_kd.wmt.log import PROG, log
from fairseq_kd.wmt.testsets import fetch_test_set

__all__ = [
    "Archive", "Bitext", "TestSet", "Pair", "PAIRS",
    "EUROPARL_V7", "COMMONCRAWL", "NEWS_COMMENTARY_V9", "UN", "GIGA_FREN", "EUROPARL_V8", "SETIMES2",
    "NEWSTEST2013", "NEWSTEST2014",
    "PROG", "log",
    "sha256_of", "read_checksums", "write_checksums", "download_command", "fetch_archive",
    "extract_members", "raw_lines", "clean_line", "keep_pair", "build_train", "fetch_test_set",
    "write_readme", "prepare", "last_checkpoints", "average_checkpoints", "main",
]
