"""Prepare a parallel corpus for fairseq: slice, joint SentencePiece, binarize.

::

    python -m fairseq_kd.prepare --corpus multi30k_en_de --data-root ../shared/data \\
        --src en --tgt de --out work/data --train-lines 10000 --vocab-size 4000

writes ``OUT/raw`` (the sliced plain text, the references for scoring),
``OUT/spm.model`` (a joint SentencePiece model), ``OUT/spm_text`` (encoded text)
and ``OUT/bin`` (``fairseq-preprocess --joined-dictionary`` output).  A corpus
without a test split (e.g. ``opennmt_toy_en_de``) can hold out the end of its
valid split as the test set with ``--test-from-valid N``.  Each
stage is skipped when its outputs exist and were made from the same corpus
content and settings (:mod:`fairseq_kd.stamps`); otherwise its old outputs are
removed and it runs again, as do the stages after it.  Every output is written
under a temporary name and renamed when complete.

Input text must be UTF-8 (an invalid byte stops with the file and line; a
byte-order mark is dropped, a carriage return inside a line becomes a space).
A pair with a side longer than ``--max-tokens-per-line`` SentencePiece tokens
(default 1000, under the 1024 positions of fairseq's transformers) would be
skipped by ``fairseq-train`` and make ``fairseq-generate`` fail: in the train
and valid splits it is dropped from ``raw``, ``spm_text`` and ``bin`` alike (a
warning names each file and line), in the test split it stops with an error
naming them (the references must stay complete).
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys
from typing import List, Optional

from tqdm import tqdm

from fairseq_kd.corpora import locate_corpus, split_path
from fairseq_kd.errors import DistillationError
from fairseq_kd.stamps import Stamps
from fairseq_kd.textio import count_lines, read_text_lines as read_lines, unique_tmp, write_lines_atomic

SPLITS = ("train", "valid", "test")
MAX_TOKENS_PER_LINE = 1000

logger = logging.getLogger("fairseq_kd.prepare")


def split_lines(corpus_dir: str, split: str, lang: str, limit: Optional[int], test_from_valid: Optional[int]):
    """The lines of ``split`` (at most ``limit``); with ``test_from_valid = N`` the
    corpus' valid split is cut in two: its last N lines are the test split, the
    lines before them the valid split."""
    if not test_from_valid or split == "train":
        return read_lines(split_path(corpus_dir, split, lang), limit)
    source = split_path(corpus_dir, "valid", lang)
    lines = list(read_lines(source))
    if len(lines) <= test_from_valid:
        raise DistillationError(
            f"{source} has {len(lines)} lines, too few to hold out {test_from_valid} as the test set; "
            f"lower --test-from-valid"
        )
    part = lines[:-test_from_valid] if split == "valid" else lines[-test_from_valid:]
    return part if limit is None else part[:limit]


def source_files(corpus_dir: str, langs, test_from_valid: Optional[int] = None) -> List[str]:
    """The corpus files :func:`slice_corpus` reads (what a slice's stamp fingerprints)."""
    return [split_path(corpus_dir, "valid" if test_from_valid and split != "train" else split, lang)
            for split in SPLITS for lang in langs]


def slice_corpus(corpus_dir: str, raw_dir: str, langs, limits, test_from_valid: Optional[int] = None) -> None:
    os.makedirs(raw_dir, exist_ok=True)
    for split in SPLITS:
        counts = {}
        for lang in langs:
            dest = os.path.join(raw_dir, f"{split}.{lang}")
            if not os.path.exists(dest):
                write_lines_atomic(dest, split_lines(corpus_dir, split, lang, limits.get(split), test_from_valid))
            counts[lang] = count_lines(dest)
        if len(set(counts.values())) != 1:
            files = ", ".join(f"{os.path.join(raw_dir, f'{split}.{l}')} ({n})" for l, n in counts.items())
            raise DistillationError(f"line counts differ: {files}; source and target must be aligned")


def train_sentencepiece(raw_dir: str, model_prefix: str, langs, vocab_size: int, seed_sentences: int) -> None:
    import sentencepiece as spm

    inputs = [os.path.join(raw_dir, f"train.{lang}") for lang in langs]
    tmp_prefix = model_prefix + ".tmp"
    spm.SentencePieceTrainer.train(
        input=",".join(inputs),
        model_prefix=tmp_prefix,
        vocab_size=vocab_size,
        character_coverage=1.0,
        model_type="unigram",
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        unk_id=0,
        num_threads=2,
        minloglevel=2,
    )
    os.replace(tmp_prefix + ".vocab", model_prefix + ".vocab")
    os.replace(tmp_prefix + ".model", model_prefix + ".model")


def _drop_lines(path: str, drop) -> None:
    """Rewrite ``path`` without the 0-based line numbers in ``drop``."""
    write_lines_atomic(path, [line for i, line in enumerate(read_lines(path)) if i not in drop])


def encode(model_file: str, raw_dir: str, spm_dir: str, langs, max_tokens: int = MAX_TOKENS_PER_LINE) -> None:
    """SentencePiece-encode every split; pairs longer than ``max_tokens`` are dropped (train, valid) or
    refused (test), see the module docstring."""
    import sentencepiece as spm

    os.makedirs(spm_dir, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    for split in SPLITS:
        dests = [os.path.join(spm_dir, f"{split}.{lang}") for lang in langs]
        if all(os.path.exists(d) for d in dests):
            continue
        tmps, too_long = [], {}
        for lang, dest in zip(langs, dests):
            raw = os.path.join(raw_dir, f"{split}.{lang}")
            tmp = unique_tmp(dest)
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                lines = read_lines(raw)
                for i, line in enumerate(tqdm(lines, desc=f"spm {split}.{lang}", unit="sent", leave=False)):
                    pieces = sp.encode(line, out_type=str)
                    if len(pieces) > max_tokens:
                        too_long.setdefault(i, []).append((raw, len(pieces)))
                    f.write(" ".join(pieces) + "\n")
            tmps.append(tmp)
        if too_long:
            listed = "; ".join(f"{raw}:{i + 1} has {n} tokens" for i in sorted(too_long)[:5] for raw, n in too_long[i])
            if split == "test":
                for tmp in tmps:
                    os.remove(tmp)
                raise DistillationError(
                    f"{len(too_long)} test line(s) longer than --max-tokens-per-line {max_tokens} "
                    f"({listed}); fairseq-generate cannot translate them: shorten or remove them from the "
                    f"test set (source and reference alike), or raise --max-tokens-per-line and the model's "
                    f"--max-source-positions/--max-target-positions"
                )
            logger.warning(
                "%s: %d pair(s) longer than %d tokens dropped from raw, spm_text and bin (%s%s)",
                split, len(too_long), max_tokens, listed, ", ..." if len(too_long) > 5 else "",
            )
            drop = set(too_long)
            for lang, tmp in zip(langs, tmps):
                _drop_lines(tmp, drop)
                _drop_lines(os.path.join(raw_dir, f"{split}.{lang}"), drop)
        for tmp, dest in zip(tmps, dests):
            os.replace(tmp, dest)


def binarize(spm_dir: str, bin_dir: str, src: str, tgt: str, workers: int) -> None:
    tmp = bin_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "fairseq_cli.preprocess",
        "--source-lang", src, "--target-lang", tgt,
        "--trainpref", os.path.join(spm_dir, "train"),
        "--validpref", os.path.join(spm_dir, "valid"),
        "--testpref", os.path.join(spm_dir, "test"),
        "--destdir", tmp, "--joined-dictionary", "--workers", str(workers),
    ]
    subprocess.run(cmd, check=True)
    shutil.rmtree(bin_dir, ignore_errors=True)
    os.replace(tmp, bin_dir)


def prepare(
    corpus: str,
    data_root: str,
    src: str,
    tgt: str,
    out: str,
    train_lines: Optional[int] = None,
    valid_lines: Optional[int] = None,
    test_lines: Optional[int] = None,
    vocab_size: int = 4000,
    workers: int = 1,
    test_from_valid: Optional[int] = None,
    max_tokens_per_line: int = MAX_TOKENS_PER_LINE,
) -> str:
    """Run every stage; returns the binarized data directory.

    ``test_from_valid = N`` is for corpora without a test split: the last N
    pairs of the valid split become the test set (and are left out of valid);
    ``valid_lines``/``test_lines`` then slice those two parts.
    """
    corpus_dir = locate_corpus(corpus, data_root)
    langs = (src, tgt)
    raw_dir, spm_dir, bin_dir = (os.path.join(out, name) for name in ("raw", "spm_text", "bin"))
    model_prefix = os.path.join(out, "spm")
    limits = {"train": train_lines, "valid": valid_lines, "test": test_lines}
    corpus_files = source_files(corpus_dir, langs, test_from_valid)
    stamps = Stamps(out)
    # each step: skipped when its outputs exist and were made from the same inputs and settings, else its
    # old outputs are removed first and it runs again (and so does every step after it)
    steps = [
        ("slice", [raw_dir], {"langs": langs, "limits": limits, "test_from_valid": test_from_valid,
                              "max_tokens_per_line": max_tokens_per_line}, corpus_files,
         lambda: slice_corpus(corpus_dir, raw_dir, langs, limits, test_from_valid)),
        ("sentencepiece", [model_prefix + ".model", model_prefix + ".vocab"], {"vocab_size": vocab_size}, [],
         lambda: train_sentencepiece(raw_dir, model_prefix, langs, vocab_size, seed_sentences=200000)),
        ("encode", [spm_dir], {"max_tokens_per_line": max_tokens_per_line}, [],
         lambda: encode(model_prefix + ".model", raw_dir, spm_dir, langs, max_tokens_per_line)),
        ("binarize", [bin_dir], {"src": src, "tgt": tgt}, [],
         lambda: binarize(spm_dir, bin_dir, src, tgt, workers)),
    ]
    upstream = None
    for step, outputs, settings, inputs, run in steps:
        upstream = stamps.make(step, settings, inputs, upstream)
        if stamps.current(step, upstream, outputs):
            continue
        if any(os.path.lexists(p) for p in outputs):
            logger.info("%s: its inputs or settings changed; removing %s and redoing it", step, ", ".join(outputs))
        stamps.invalidate(step, outputs)
        run()
        stamps.record(step, upstream)
    return bin_dir


def add_corpus_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The corpus, languages, output folder and slice sizes: the arguments every preparation command takes."""
    parser.add_argument("--corpus", required=True, help=f"corpus folder name, e.g. {example}")
    parser.add_argument("--data-root", required=True, help="folder holding the corpus folders (downloaded there if absent)")
    parser.add_argument("--src", required=True, help="source language suffix")
    parser.add_argument("--tgt", required=True, help="target language suffix")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train-lines", type=int, default=None, help="use only the first N training pairs")
    parser.add_argument("--valid-lines", type=int, default=None, help="use only the first N validation pairs")
    parser.add_argument("--test-lines", type=int, default=None, help="use only the first N test pairs")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_arguments(parser, "multi30k_en_de")
    parser.add_argument("--vocab-size", type=int, default=4000, help="joint SentencePiece vocabulary size")
    parser.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
    parser.add_argument(
        "--test-from-valid", type=int, default=None, metavar="N",
        help="for a corpus without a test split: the last N valid pairs are the test set, the rest the valid set",
    )
    parser.add_argument(
        "--max-tokens-per-line", type=int, default=MAX_TOKENS_PER_LINE, metavar="N",
        help="drop train/valid pairs with a side longer than N SentencePiece tokens (refused in test)",
    )
    args = parser.parse_args(argv)
    if args.test_from_valid is not None and args.test_from_valid < 1:
        parser.error(f"--test-from-valid must be a positive number of lines, got {args.test_from_valid}")
    bin_dir = prepare(
        args.corpus, args.data_root, args.src, args.tgt, args.out,
        args.train_lines, args.valid_lines, args.test_lines, args.vocab_size, args.workers,
        args.test_from_valid, args.max_tokens_per_line,
    )
    print(bin_dir)


if __name__ == "__main__":
    main()
