"""Paper-comparable scores: tokenized BLEU, compound-split BLEU, COMET.

The WMT papers report BLEU as ``multi-bleu.perl`` computes it: on Moses-tokenized hypotheses and
references, with no further tokenization.  :func:`tokenized_bleu` is that score: both sides are
tokenized by sacremoses (``-l LANG``, no aggressive hyphen splitting, no escaping) and scored by
sacreBLEU with ``tokenize="none"`` (corpus BLEU, 4-grams, brevity penalty: ``multi-bleu``'s formula).

For English-German the papers since Vaswani et al. (2017) also split hyphenated compounds with fairseq's
``scripts/compound_split_bleu.sh GEN``: the ``H`` lines' last tab field and the ``T`` lines' fields 2-, each
through ``perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'`` (:func:`split_compounds`, on bytes as perl
reads them), scored by ``fairseq-score`` (:func:`fairseq_bleu`: fairseq's ``libbleu`` rules, a ``<unk>`` of the
reference never matches).  :func:`compound_split_bleu` is that script on a ``fairseq-generate`` output;
:func:`compound_split_bleu_text` applies it to plain hypotheses and references tokenized as fairseq's test data
are (``’`` -> ``'``, ``tokenizer.perl -a``, XML escaping), which is what ``H``/``T`` lines hold on the Moses + BPE
data: ``gut-gemeint`` is ``gut @-@ gemeint`` there and ``gut @ ##AT##-##AT## @ gemeint`` once split.

COMET (``unbabel-comet``, an optional extra) is computed with a local model only
(:func:`comet_score`); it is skipped with a message when the package is absent.
"""

import re
from typing import List, Optional, Sequence, Tuple

from fairseq_kd.errors import DistillationError

# perl reads bytes: \S is any byte but ASCII white space
_COMPOUND = re.compile(rb"([^ \t\n\r\f\v])-([^ \t\n\r\f\v])")
_PAD, _EOS, _UNK = object(), object(), object()
_SPECIAL = {"<pad>": _PAD, "</s>": _EOS, "<unk>": _UNK}


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
    """fairseq's compound_split_bleu.sh rule: ``a-b`` -> ``a ##AT##-##AT## b`` (perl ``s///g`` on bytes)."""
    return _COMPOUND.sub(rb"\1 ##AT##-##AT## \2", line.encode("utf-8")).decode("utf-8")


def _fairseq_symbols(line: str, is_ref: bool) -> list:
    """A line as fairseq-score sees it: ``Dictionary.encode_line`` (white-space split, ``</s>`` appended), then
    libbleu's trim (leading ``<pad>``, trailing ``</s>``/``<pad>`` but the first symbol); ``<unk>`` of a reference
    never matches."""
    seq = [_SPECIAL.get(w, w) for w in line.split()] + [_EOS]
    start = 0
    while start < len(seq) and seq[start] is _PAD:
        start += 1
    seq = seq[start:]
    end = len(seq) - 1
    while end > 0 and (seq[end] is _EOS or seq[end] is _PAD):
        end -= 1
    seq = seq[:end + 1]
    return [object() if (is_ref and w is _UNK) else w for w in seq]


def fairseq_bleu_stats(hyps: Sequence[str], refs: Sequence[str]) -> Tuple[int, int, List[int], List[int]]:
    """``(reflen, predlen, matches[1..4], totals[1..4])`` as ``fairseq-score`` (libbleu) counts them."""
    from collections import Counter

    reflen = predlen = 0
    match, total = [0] * 4, [0] * 4
    for hyp, ref in zip(hyps, refs):
        h, r = _fairseq_symbols(hyp, False), _fairseq_symbols(ref, True)
        reflen += len(r)
        predlen += len(h)
        for n in range(1, 5):
            if len(h) < n:
                continue
            total[n - 1] += len(h) - n + 1
            counts = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            for i in range(len(r) - n + 1):
                g = tuple(r[i:i + n])
                if counts[g] > 0:
                    match[n - 1] += 1
                    counts[g] -= 1
    return reflen, predlen, match, total


def fairseq_bleu(hyps: Sequence[str], refs: Sequence[str]) -> Tuple[float, str]:
    """``(BLEU, fairseq-score's result line)`` of tokenized text: ``fairseq_cli/score.py`` (``bleu.Scorer``)."""
    import math

    reflen, predlen, match, total = fairseq_bleu_stats(hyps, refs)
    if predlen == 0:
        raise DistillationError("no hypotheses to score (fairseq-score divides by the hypothesis length)")
    prec = [m / t if t > 0 else 0 for m, t in zip(match, total)]
    psum = sum(math.log(p) if p > 0 else float("-inf") for p in prec)
    brevity = min(1, math.exp(1 - reflen / predlen))
    bleu = brevity * math.exp(psum / 4) * 100
    line = "BLEU4 = {:2.2f}, {:2.1f}/{:2.1f}/{:2.1f}/{:2.1f} (BP={:.3f}, ratio={:.3f}, syslen={}, reflen={})".format(
        bleu, *(p * 100 for p in prec), brevity, predlen / reflen, predlen, reflen)
    return bleu, line


def generate_output_sides(path: str) -> Tuple[List[str], List[str]]:
    """compound_split_bleu.sh's reading of a fairseq-generate output: ``grep ^H | awk -F '\\t' '{print $NF}'``
    and ``grep ^T | cut -f2-``, after checking that the last line holds ``BLEU`` (generation finished)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = [line[:-1] if line.endswith("\n") else line for line in f]
    if not lines or "BLEU" not in lines[-1]:
        raise DistillationError(f"{path}: the last line holds no BLEU, so fairseq-generate has not finished; "
                                f"re-run the decode")
    hyps = [line.split("\t")[-1] for line in lines if line.startswith("H")]
    refs = [line.split("\t", 1)[1] if "\t" in line else line for line in lines if line.startswith("T")]
    if len(hyps) != len(refs):
        raise DistillationError(f"{path}: {len(hyps)} H lines but {len(refs)} T lines; decode without --nbest")
    return hyps, refs


def compound_split_bleu(generate_output: str) -> Tuple[float, str]:
    """fairseq's ``scripts/compound_split_bleu.sh GENERATE_OUTPUT``: ``(BLEU, fairseq-score's line)``."""
    hyps, refs = generate_output_sides(generate_output)
    return fairseq_bleu([split_compounds(h) for h in hyps], [split_compounds(r) for r in refs])


def fairseq_test_tokenize(lines: Sequence[str], lang: str) -> List[str]:
    """fairseq's test-set tokenization: ``sed "s/’/'/g" | tokenizer.perl -a -l LANG`` (XML escaped)."""
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(line.replace("\u2019", "'"), aggressive_dash_splits=True, escape=True, return_str=True)
            for line in lines]


def compound_split_bleu_text(hyps: Sequence[str], refs: Sequence[str], lang: str) -> float:
    """compound_split_bleu.sh on plain hypotheses and references tokenized as fairseq's test data."""
    h, r = fairseq_test_tokenize(hyps, lang), fairseq_test_tokenize(refs, lang)
    return fairseq_bleu([split_compounds(x) for x in h], [split_compounds(x) for x in r])[0]


def bleu_tokenized_text(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """``multi-bleu.perl`` on already-tokenized text: sacreBLEU with ``tokenize="none"``."""
    import sacrebleu

    return sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(list(hyps), [list(refs)]).score


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str, compound_split: bool = False) -> float:
    """BLEU on Moses-tokenized hypotheses and references; with ``compound_split``
    :func:`compound_split_bleu_text` (fairseq's compound_split_bleu.sh)."""
    if compound_split:
        return compound_split_bleu_text(hyps, refs, lang)
    h, r = moses_tokenize(hyps, lang), moses_tokenize(refs, lang)
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
