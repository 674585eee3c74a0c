"""The line-level text rules of the WMT recipes, each written after the script it reproduces.

* :func:`printable` - Moses ``scripts/tokenizer/remove-non-printing-char.perl`` (``s/\\p{C}/ /g``);
* :func:`map_test_quote` - fairseq ``examples/translation/prepare-wmt14en2{de,fr}.sh``, test sets:
  ``sed -e "s/\\’/\\'/g"`` (U+2019 becomes an ASCII apostrophe) before ``tokenizer.perl -a``;
* :func:`normalise_romanian` - ``preprocess/normalise-romanian.py`` of rsennrich/wmt16-scripts (Barry
  Haddow): s-cedilla and t-cedilla become s-comma and t-comma;
* :func:`remove_romanian_diacritics` - ``preprocess/remove-diacritics.py`` of rsennrich/wmt16-scripts:
  s-comma, t-comma, a-breve, a-circumflex and i-circumflex become their base letters;
* :func:`clean_corpus_n` - Moses ``scripts/training/clean-corpus-n.perl -ratio R CORPUS L1 L2 OUT MIN MAX``.

The WMT'16 En-Ro recipes (``sample/preprocess.sh`` of wmt16-scripts) run the two Romanian rules after
``normalize-punctuation.perl`` and before ``tokenizer.perl -a`` on the Romanian side of every set.
See docs/data_preparation.md.
"""

import re
import unicodedata
from typing import Iterable, Iterator, Optional, Tuple

_RO_COMMA = str.maketrans({"\u015e": "\u0218", "\u015f": "\u0219", "\u0162": "\u021a", "\u0163": "\u021b"})
_RO_BASE = str.maketrans({
    "\u0218": "S", "\u0219": "s",  # s-comma
    "\u021a": "T", "\u021b": "t",  # t-comma
    "\u0102": "A", "\u0103": "a",  # a-breve
    "\u00c2": "A", "\u00e2": "a",  # a-circumflex
    "\u00ce": "I", "\u00ee": "i",  # i-circumflex
})
_SPACES = re.compile(r"\s+")


def printable(line: str) -> str:
    """remove-non-printing-char.perl: every character of Unicode category C* becomes a space."""
    return "".join(" " if unicodedata.category(c)[0] == "C" else c for c in line)


def map_test_quote(line: str) -> str:
    """fairseq's test-set rule ``sed -e "s/\\’/\\'/g"``."""
    return line.replace("\u2019", "'")


def normalise_romanian(line: str) -> str:
    """wmt16-scripts normalise-romanian.py: Ş ş Ţ ţ (cedilla) -> Ș ș Ț ț (comma below)."""
    return line.translate(_RO_COMMA)


def remove_romanian_diacritics(line: str) -> str:
    """wmt16-scripts remove-diacritics.py: Ș ș Ț ț Ă ă Â â Î î -> S s T t A a A a I i."""
    return line.translate(_RO_BASE)


def _squeeze(line: str, drop_bars: bool) -> str:
    if drop_bars:
        line = line.replace("|", "")
    return _SPACES.sub(" ", line).strip(" ")


def clean_corpus_n(pairs: Iterable[Tuple[str, str]], min_len: int = 1, max_len: int = 250, ratio: float = 1.5,
                   max_word_length: int = 1000, factored: Optional[bool] = None) -> Iterator[Optional[Tuple[str, str]]]:
    """clean-corpus-n.perl over ``(l1, l2)`` lines: for each pair, the whitespace-squeezed pair it writes or None.

    As the Perl script: ``|`` is deleted unless the first pair holds one (factored input); runs of whitespace
    become one space and the ends are trimmed; a pair is dropped when a side is empty, has fewer than
    ``min_len`` or more than ``max_len`` words, a word-count ratio above ``ratio`` either way, or a word
    longer than ``max_word_length`` characters.  ``factored`` given: the first pair's answer, for a piece
    of a file that does not start at its first pair.
    """
    for f, e in pairs:
        if factored is None:
            factored = "|" in e or "|" in f
        f, e = _squeeze(f, not factored), _squeeze(e, not factored)
        if not f or not e:
            yield None
            continue
        fc, ec = len(f.split(" ")), len(e.split(" "))
        if ec > max_len or fc > max_len or ec < min_len or fc < min_len or ec / fc > ratio or fc / ec > ratio:
            yield None
            continue
        if any(len(w) > max_word_length for side in (e, f) for w in re.split(r"[\s|]+", side)):
            yield None
            continue
        yield f, e
