"""Choosing and checking a hypothesis: de-BPE and smoothed sentence BLEU,
Seq-Inter (:func:`select_by_bleu`, the n-best entry closest to the reference)
and the degenerate-output rules (:class:`DegenerateCheck`: empty, too long,
looping on a repeated n-gram)."""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


def remove_bpe(text: str, bpe: str = "auto") -> str:
    """Undo the subword segmentation (``auto`` recognises SentencePiece's ``▁``
    and subword-nmt's ``@@ ``)."""
    from fairseq.data.data_utils import post_process

    if bpe == "auto":
        if "\u2581" in text:
            bpe = "sentencepiece"
        elif "@@" in text:
            bpe = "subword_nmt"
        else:
            bpe = "none"
    return post_process(text, bpe)


def sentence_bleu(hypothesis: str, reference: str, bpe: str = "auto") -> float:
    """Smoothed sentence BLEU (sacrebleu defaults) of de-BPE'd text."""
    import sacrebleu

    return sacrebleu.sentence_bleu(remove_bpe(hypothesis, bpe), [remove_bpe(reference, bpe)]).score


def select_by_bleu(hypotheses: Sequence[str], reference: str, bpe: str = "auto") -> int:
    """Seq-Inter (Kim & Rush, 2016): index of the n-best entry closest to the
    reference by smoothed sentence BLEU; ties go to the teacher's better-ranked one."""
    if not hypotheses:
        raise ValueError("empty n-best list")
    scores = [sentence_bleu(h, reference, bpe) for h in hypotheses]
    return int(np.argmax(scores))  # argmax returns the first maximum


def repeated_ngram(tokens: Sequence[str], max_order: int = 4, min_repeats: int = 4) -> Optional[Tuple[str, ...]]:
    """The first n-gram (``n <= max_order``) that occurs ``min_repeats`` times in a
    row (a decoding loop such as ``a b a b a b a b``), or None."""
    length = len(tokens)
    for n in range(1, max_order + 1):
        span = n * min_repeats
        for i in range(0, length - span + 1):
            gram = tuple(tokens[i:i + n])
            if all(tuple(tokens[i + k * n:i + (k + 1) * n]) == gram for k in range(1, min_repeats)):
                return gram
    return None


@dataclass
class DegenerateCheck:
    """Rules for flagging a hypothesis (token counts are BPE'd tokens)."""

    len_a: float = 2.0
    len_b: int = 10
    max_order: int = 4
    min_repeats: int = 4

    def __call__(self, hypothesis: str, source: str) -> Optional[str]:
        """``"empty"``, ``"too_long"``, ``"repetition"`` or None (fine)."""
        tokens = hypothesis.split()
        if not tokens:
            return "empty"
        if len(tokens) > self.len_a * len(source.split()) + self.len_b:
            return "too_long"
        if self.min_repeats > 1 and repeated_ngram(tokens, self.max_order, self.min_repeats) is not None:
            return "repetition"
        return None


DEGENERATE_KINDS = ("empty", "too_long", "repetition")
