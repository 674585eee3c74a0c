"""Paper-comparable scores: tokenized BLEU, compound-split BLEU, COMET.

The WMT papers report BLEU as ``multi-bleu.perl`` computes it: on Moses-tokenized hypotheses and
references, with no further tokenization.  :func:`tokenized_bleu` is that score: both sides are
tokenized by sacremoses (``-l LANG``, no aggressive hyphen splitting, no escaping) and scored by
sacreBLEU with ``tokenize="none"`` (corpus BLEU, 4-grams, brevity penalty: ``multi-bleu``'s formula).

For English-German the papers since Vaswani et al. (2017) also split hyphenated compounds, the rule of
fairseq's ``scripts/compound_split_bleu.sh``: ``s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g`` on the
tokenized text of both sides (:func:`split_compounds`), then the same BLEU.

COMET (``unbabel-comet``, an optional extra) is computed with a local model only
(:func:`comet_score`); it is skipped with a message when the package is absent.
"""

import re
from typing import List, Optional, Sequence, Tuple

from fairseq_kd.errors import DistillationError

_COMPOUND = re.compile(r"(\S)-(\S)")


def moses_tokenize(lines: Sequence[str], lang: str) -> List[str]:
    """Moses tokenization (sacremoses), as ``tokenizer.perl -l LANG -no-escape``."""
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(line, escape=False, return_str=True) for line in lines]


def moses_detokenize(lines: Sequence[str], lang: str) -> List[str]:
    """Moses detokenization (sacremoses), XML entities of the tokenizer unescaped."""
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split(), unescape=True) for line in lines]


def split_compounds(line: str) -> str:
    """fairseq's compound_split_bleu.sh rule: ``a-b`` -> ``a ##AT##-##AT## b`` (perl ``s///g`` semantics)."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def bleu_tokenized_text(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """``multi-bleu.perl`` on already-tokenized text: sacreBLEU with ``tokenize="none"``."""
    import sacrebleu

    return sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(list(hyps), [list(refs)]).score


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str, compound_split: bool = False) -> float:
    """BLEU on Moses-tokenized hypotheses and references (optionally compound-split)."""
    h, r = moses_tokenize(hyps, lang), moses_tokenize(refs, lang)
    if compound_split:
        h, r = [split_compounds(x) for x in h], [split_compounds(x) for x in r]
    return bleu_tokenized_text(h, r)


def comet_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("comet") is not None


def comet_score(model_path: str, sources: Sequence[str], hyps: Sequence[str], refs: Sequence[str],
                batch_size: int = 32) -> Optional[float]:
    """System-level COMET of a local model (``unbabel-comet``), or None when the package is absent."""
    if not comet_available():
        return None
    from comet import load_from_checkpoint

    try:
        model = load_from_checkpoint(model_path)
    except Exception as e:  # a missing or wrong model file: say which and how to fix it
        raise DistillationError(f"{model_path}: not a COMET checkpoint ({e}); pass --comet-model PATH/checkpoints/model.ckpt")
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hyps, refs)]
    out = model.predict(data, batch_size=batch_size, gpus=0, progress_bar=True)
    return float(out.system_score) * 100.0


def paper_scores(hyps: Sequence[str], refs: Sequence[str], lang: str, compound_split: bool) -> Tuple[float, Optional[float]]:
    """``(tokenized BLEU, compound-split BLEU or None)`` of one system."""
    tok = tokenized_bleu(hyps, refs, lang)
    split = tokenized_bleu(hyps, refs, lang, compound_split=True) if compound_split else None
    return tok, split
