"""Prepare a parallel corpus the way fairseq's WMT models were: Moses tokenization, joint BPE, binarize.

::

    python -m fairseq_kd.prepare_bpe --corpus wmt14_en_de --data-root work/corpora \\
        --src en --tgt de --out work/data --merges 40000 --workers 8
    python -m fairseq_kd.prepare_bpe ... --teacher-dir wmt16.en-de.joined-dict.transformer

The rules of fairseq's ``examples/translation/prepare-wmt14en2{de,fr}.sh``, with sacremoses and
subword-nmt in place of the Perl scripts (:mod:`fairseq_kd.wmt.rules` names the source of each rule):

* train and valid: ``normalize-punctuation.perl -l L | remove-non-printing-char.perl |
  tokenizer.perl -a -l L``; test: only ``sed "s/’/'/g" | tokenizer.perl -a -l L``;
* Romanian (the WMT'16 En-Ro recipes): ``normalise-romanian.py | remove-diacritics.py`` on the
  Romanian side of every set, before the tokenizer;
* one joint BPE of ``--merges`` operations (40000 in both scripts) learned on the tokenized
  training text of both languages;
* ``clean-corpus-n.perl -ratio 1.5 ... 1 250`` on the BPE'd train and valid pairs, the only length
  filter (the test set is kept whole).

Tokenization, the BPE word counts and the BPE are streamed through ``--workers`` processes in
input order (:mod:`fairseq_kd.streaming`), in memory that does not grow with the corpus.

With ``--teacher-dir DIR`` (a fairseq model folder: ``bpecodes`` or fastBPE ``codes``,
``dict.SRC.txt``, ``dict.TGT.txt``) nothing is learned: the folder's BPE codes are applied (fastBPE
codes, ``a b count`` lines, are rewritten as subword-nmt codes), the tokenizer's ``-a`` is used only
when the teacher's dictionary holds ``@-@`` (the model was trained on ``-a`` text), and
``fairseq-preprocess`` binarizes with its dictionaries, so the teacher's dictionary check passes.

Writes ``OUT/raw`` (plain text; the pairs kept by the length filter), ``OUT/tok`` (tokenized),
``OUT/bpecodes``, ``OUT/bpe`` (BPE'd, unfiltered), ``OUT/bpe_text`` (filtered) and ``OUT/bin``.  Each
step is skipped when its outputs exist and were made from the same inputs and settings
(:mod:`fairseq_kd.stamps`), else redone with the steps that read it; every file is written under a
temporary name and renamed.
See docs/data_preparation.md.
"""

import argparse
import os
import shutil
import subprocess
import sys
from collections import Counter
from typing import Callable, List, Optional, Sequence, Tuple

from fairseq_kd.corpora import locate_corpus
from fairseq_kd.errors import DistillationError
from fairseq_kd.prepare import SPLITS, add_corpus_arguments, slice_corpus, source_files
from fairseq_kd.stamps import Stamps
from fairseq_kd.streaming import map_file, reduce_files
from fairseq_kd.textio import read_text_lines, unique_tmp
from fairseq_kd.wmt import rules

MAX_TOKENS = 250  # clean-corpus-n.perl ... 1 250
MAX_RATIO = 1.5   # clean-corpus-n.perl -ratio 1.5
FILTERED = ("train", "valid")  # fairseq's scripts run clean-corpus-n on bpe.train and bpe.valid


def moses_line_fn(lang: str, test: bool = False, aggressive: bool = True, romanian: bool = True) -> Callable[[str], str]:
    """One line through fairseq's chain for ``lang``: train/valid
    ``normalize-punctuation | remove-non-printing-char | tokenizer.perl [-a]``, test ``’ -> ' | tokenizer.perl [-a]``;
    for Romanian (``romanian``) the WMT'16 normalisation and diacritic removal before the tokenizer."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    norm, tok = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    ro = romanian and lang == "ro"

    def fn(line: str) -> str:
        line = rules.map_test_quote(line) if test else rules.printable(norm.normalize(line))
        if ro:
            line = rules.remove_romanian_diacritics(rules.normalise_romanian(line))
        return tok.tokenize(line, aggressive_dash_splits=aggressive, escape=True, return_str=True)

    return fn


def moses_chunks(lang: str, test: bool, aggressive: bool, romanian: bool) -> Callable[[List[str]], List[str]]:
    fn = moses_line_fn(lang, test, aggressive, romanian)
    return lambda chunk: [fn(line) for line in chunk]


def moses_tokenize(lines: Sequence[str], lang: str, desc: str = "", test: bool = False, aggressive: bool = True,
                   romanian: bool = True) -> List[str]:
    """The chain of :func:`moses_line_fn` over a list of lines."""
    fn = moses_line_fn(lang, test, aggressive, romanian)
    return [fn(line) for line in lines]


def bpe_chunks(codes: str) -> Callable[[List[str]], List[str]]:
    from subword_nmt.apply_bpe import BPE

    with open(codes, encoding="utf-8") as f:
        bpe = BPE(f)
    return lambda chunk: [bpe.process_line(line) for line in chunk]


def word_count_chunks() -> Callable[[List[str]], Counter]:
    """learn_bpe's word counts (its ``get_vocabulary``: words split on single spaces, first-seen order)."""
    return _count_words


def _count_words(chunk: List[str]) -> Counter:
    # the words of every line joined by single spaces, counted in one C-level pass: the same multiset as
    # learn_bpe's per-line split, less the empty strings that runs of spaces make
    counts = Counter(" ".join(line.strip("\r\n ") for line in chunk).split(" "))
    counts.pop("", None)
    return counts


def _add(a: Counter, b: Counter) -> Counter:
    a.update(b)
    return a


def learn_codes(texts: Sequence[str], merges: int, dest: str, workers: int = 1) -> None:
    """One joint BPE (subword-nmt learn_bpe) on the tokenized files ``texts``; the word counts are made
    in ``workers`` processes and handed to learn_bpe as a dictionary (memory: the vocabulary)."""
    from subword_nmt.learn_bpe import learn_bpe

    counts = reduce_files(word_count_chunks, (), texts, _add, Counter(), workers, desc="bpe word counts")
    vocab = [f"{w} {c}" for w, c in counts.items()]  # first-seen order, as learn_bpe counts a text
    del counts
    tmp = unique_tmp(dest)
    with open(tmp, "w", encoding="utf-8") as out:
        learn_bpe(vocab, out, merges, is_dict=True)
    os.replace(tmp, dest)


class _CleanChunks:
    """clean-corpus-n on one chunk of the four files (BPE'd pair, raw pair): ``(read, kept, four outputs)``."""

    def __init__(self, paths: Sequence[str], factored: bool, max_tokens: int, ratio: float):
        self.paths, self.factored, self.max_tokens, self.ratio = paths, factored, max_tokens, ratio

    def __call__(self, task) -> Tuple[int, int, List[bytes]]:
        from fairseq_kd.streaming import decode_lines

        sides = [decode_lines(blob, first, path) for (blob, first), path in zip(task, self.paths)]
        if len({len(side) for side in sides}) > 1:
            n = task[0][1] + min(len(side) for side in sides)
            raise DistillationError(f"{' and '.join(self.paths)} differ in length after line {n}; "
                                    f"re-run the preparation from its tokenization step (remove those files)")
        outs: List[List[str]] = [[], [], [], []]
        pairs = zip(sides[0], sides[1])
        for cleaned, rs, rt in zip(rules.clean_corpus_n(pairs, 1, self.max_tokens, self.ratio, factored=self.factored),
                                   sides[2], sides[3]):
            if cleaned is not None:
                for out, line in zip(outs, (*cleaned, rs, rt)):
                    out.append(line)
        return len(sides[0]), len(outs[0]), ["".join(line + "\n" for line in out).encode("utf-8") for out in outs]


def filter_pairs(bpe: Tuple[str, str], raw: Tuple[str, str], out_bpe: Tuple[str, str], out_raw: Tuple[str, str],
                 max_tokens: int = MAX_TOKENS, ratio: float = MAX_RATIO, workers: int = 1) -> Tuple[int, int]:
    """clean-corpus-n over the BPE'd pair files ``bpe``, streamed, in ``workers`` processes; the kept pairs
    (squeezed as the script writes them) go to ``out_bpe`` and their raw lines to ``out_raw``.  Returns
    ``(read, kept)``."""
    from fairseq_kd.streaming import CHUNK_LINES, ordered_map, raw_chunks

    paths, outs = (*bpe, *raw), [*out_bpe, *out_raw]
    first = [next(read_text_lines(p), "") for p in bpe]
    factored = "|" in first[0] or "|" in first[1]  # the script decides on its first pair
    tmps = [unique_tmp(p) for p in outs]
    read = kept = 0
    try:
        files = [open(t, "wb") for t in tmps]
        try:
            tasks = zip(*(raw_chunks(p, CHUNK_LINES) for p in paths))
            for n, k, data in ordered_map(_CleanChunks, (paths, factored, max_tokens, ratio), tasks, workers,
                                          warm=lambda fn, task: None):
                for f, d in zip(files, data):
                    f.write(d)
                read, kept = read + n, kept + k
        finally:
            for f in files:
                f.close()
        for t, p in zip(tmps, outs):
            os.replace(t, p)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)
    return read, kept


def read_codes(path: str) -> Tuple[str, List[str]]:
    """``(format, merges)`` of a BPE codes file: ``subword-nmt`` (``a b`` lines, optional ``#version``
    header) or ``fastbpe`` (``a b count`` lines, as fairseq's WMT'19 models ship them)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    body = [line for line in lines if line and not line.startswith("#version")]
    if not body:
        raise DistillationError(f"{path} holds no BPE merges; pass the model's codes file (--teacher-dir)")
    fields = [len(line.split(" ")) for line in body]
    if all(n == 3 for n in fields) and all(line.rsplit(" ", 1)[1].isdigit() for line in body):
        return "fastbpe", [line.rsplit(" ", 1)[0] for line in body]
    bad = next((i for i, n in enumerate(fields) if n != 2), None)
    if bad is not None:
        raise DistillationError(f"{path}: line {lines.index(body[bad]) + 1} is neither 'a b' (subword-nmt) nor "
                                f"'a b count' (fastBPE); pass the model's BPE codes (--teacher-dir)")
    return "subword-nmt", body


def install_codes(teacher_codes: str, dest: str) -> str:
    """``dest``: the teacher's codes as subword-nmt reads them (fastBPE's counts dropped, version 0.2, the
    end-of-word convention both share); returns the source format."""
    fmt, merges = read_codes(teacher_codes)
    tmp = unique_tmp(dest)
    if fmt == "fastbpe":
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    else:
        shutil.copyfile(teacher_codes, tmp)
    os.replace(tmp, dest)
    return fmt


def teacher_files(teacher_dir: str, src: str, tgt: str) -> Tuple[str, str, str]:
    """``(codes, dict.SRC.txt, dict.TGT.txt)`` of a fairseq model folder (``bpecodes``, ``code`` or ``codes``)."""
    codes = next((os.path.join(teacher_dir, n) for n in ("bpecodes", "code", "codes")
                  if os.path.exists(os.path.join(teacher_dir, n))), None)
    if codes is None:
        raise DistillationError(f"{teacher_dir} has no bpecodes: pass the folder of a fairseq BPE model (--teacher-dir)")
    dicts = [os.path.join(teacher_dir, f"dict.{lang}.txt") for lang in (src, tgt)]
    for path in dicts:
        if not os.path.exists(path):
            raise DistillationError(f"{path} not found: --teacher-dir needs the model's dict.{src}.txt and dict.{tgt}.txt")
    return codes, dicts[0], dicts[1]


def trained_with_aggressive_hyphens(dict_paths: Sequence[str]) -> bool:
    """Whether a model's dictionaries hold ``@-@`` (``tokenizer.perl -a`` output) as a symbol."""
    for path in dict_paths:
        with open(path, encoding="utf-8") as f:
            if any(line.split(" ", 1)[0] == "@-@" for line in f):
                return True
    return False


def prepare_bpe(corpus: str, data_root: str, src: str, tgt: str, out: str, train_lines: Optional[int] = None,
                valid_lines: Optional[int] = None, test_lines: Optional[int] = None, merges: int = 40000,
                workers: int = 1, test_from_valid: Optional[int] = None, teacher_dir: Optional[str] = None,
                aggressive: Optional[bool] = None, romanian: bool = True) -> str:
    """Run every step; returns the binarized data directory.  ``aggressive`` (``-a``) defaults to True,
    or with ``teacher_dir`` to whether the teacher's dictionaries hold ``@-@``."""
    corpus_dir = locate_corpus(corpus, data_root)
    langs = (src, tgt)
    stamps = Stamps(out)
    sliced = os.path.join(out, "sliced")
    limits = {"train": train_lines, "valid": valid_lines, "test": test_lines}
    # each step is skipped only when its outputs were made from the same inputs and settings (stamps, with
    # the stamp of the step they read): a change removes the old outputs and redoes the step and its readers
    sliced_stamp = stamps.step(
        "slice", [sliced], {"langs": langs, "limits": limits, "test_from_valid": test_from_valid},
        source_files(corpus_dir, langs, test_from_valid),
        run=lambda: slice_corpus(corpus_dir, sliced, langs, limits, test_from_valid))
    codes = os.path.join(out, "bpecodes")
    dicts, teacher_codes = None, None
    if teacher_dir:
        teacher_codes, src_dict, tgt_dict = teacher_files(teacher_dir, src, tgt)
        dicts = (src_dict, tgt_dict)
        if aggressive is None:
            aggressive = trained_with_aggressive_hyphens(dicts)
        print(f"teacher {teacher_dir}: {read_codes(teacher_codes)[0]} codes, tokenizer.perl "
              f"{'-a' if aggressive else 'without -a'} ({'@-@ in' if aggressive else 'no @-@ in'} its dictionaries)")
    aggressive = True if aggressive is None else aggressive
    tok_dir, bpe_dir, text_dir, raw_dir = (os.path.join(out, d) for d in ("tok", "bpe", "bpe_text", "raw"))
    for d in (tok_dir, bpe_dir, text_dir, raw_dir):
        os.makedirs(d, exist_ok=True)
    tok_stamps = {}
    for split in SPLITS:
        for lang in langs:
            name, args = f"{split}.{lang}", (lang, split == "test", aggressive, romanian)
            tok_stamps[name] = stamps.step(
                f"tokenize.{name}", [os.path.join(tok_dir, name)], {"moses": args}, upstream=sliced_stamp,
                run=lambda name=name, args=args: map_file(moses_chunks, args, os.path.join(sliced, name),
                                                          os.path.join(tok_dir, name), workers, desc=f"moses {name}"))
    if teacher_dir:
        codes_stamp = stamps.step("codes", [codes], {"teacher": True}, [teacher_codes],
                                  run=lambda: install_codes(teacher_codes, codes))
    else:
        codes_stamp = stamps.step(
            "codes", [codes], {"merges": merges}, upstream=",".join(tok_stamps[f"train.{lang}"] for lang in langs),
            run=lambda: learn_codes([os.path.join(tok_dir, f"train.{lang}") for lang in langs], merges, codes, workers))
    bpe_stamps = {}
    for split in SPLITS:
        for lang in langs:
            name = f"{split}.{lang}"
            bpe_stamps[name] = stamps.step(
                f"bpe.{name}", [os.path.join(bpe_dir, name)], {}, upstream=f"{codes_stamp},{tok_stamps[name]}",
                run=lambda name=name: map_file(bpe_chunks, (codes,), os.path.join(tok_dir, name),
                                               os.path.join(bpe_dir, name), workers, desc=f"bpe {name}"))
    filter_stamps = []
    for split in SPLITS:
        names = [f"{split}.{lang}" for lang in langs]
        pick = lambda d, names=names: tuple(os.path.join(d, n) for n in names)  # noqa: E731
        filter_stamps.append(stamps.step(
            f"filter.{split}", [*pick(text_dir), *pick(raw_dir)],
            {"clean_corpus_n": [MAX_RATIO, MAX_TOKENS] if split in FILTERED else None},
            upstream=",".join([sliced_stamp, *(bpe_stamps[n] for n in names)]),
            run=lambda split=split, pick=pick: _filter_split(split, pick, bpe_dir, sliced, text_dir, raw_dir, workers)))
    bin_dir = os.path.join(out, "bin")
    stamps.step("binarize", [bin_dir], {"langs": langs, "teacher_dicts": dicts is not None}, dicts or (),
                upstream=",".join(filter_stamps), run=lambda: binarize(text_dir, bin_dir, src, tgt, workers, dicts))
    return bin_dir


def _filter_split(split: str, pick, bpe_dir: str, sliced: str, text_dir: str, raw_dir: str, workers: int) -> None:
    """clean-corpus-n on a train or valid split (BPE'd and raw pairs alike); the test split copied whole."""
    if split in FILTERED:
        read, kept = filter_pairs(pick(bpe_dir), pick(sliced), pick(text_dir), pick(raw_dir), workers=workers)
        print(f"{split}: {kept} of {read} pairs kept by clean-corpus-n -ratio {MAX_RATIO} 1 {MAX_TOKENS} (after BPE)")
        return
    for a, b in ((pick(bpe_dir), pick(text_dir)), (pick(sliced), pick(raw_dir))):
        for s, d in zip(a, b):
            tmp = unique_tmp(d)
            shutil.copyfile(s, tmp)
            os.replace(tmp, d)


def binarize(text_dir: str, bin_dir: str, src: str, tgt: str, workers: int, dicts: Optional[Tuple[str, str]]) -> None:
    tmp = bin_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = ["--joined-dictionary"] if dicts is None else ["--srcdict", dicts[0], "--tgtdict", dicts[1]]
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", src, "--target-lang", tgt,
           *(f"--{split}pref={os.path.join(text_dir, split)}" for split in SPLITS),
           "--destdir", tmp, *vocab, "--workers", str(workers)]
    subprocess.run(cmd, check=True)
    shutil.rmtree(bin_dir, ignore_errors=True)
    os.replace(tmp, bin_dir)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_arguments(parser, "wmt14_en_de")
    parser.add_argument("--merges", type=int, default=40000, help="joint BPE merge operations (fairseq's scripts: 40000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes for tokenization, BPE word counts, BPE and fairseq-preprocess")
    parser.add_argument("--test-from-valid", type=int, default=None, metavar="N",
                        help="for a corpus without a test split: the last N valid pairs are the test set")
    parser.add_argument("--teacher-dir", default=None,
                        help="a fairseq model folder: apply its bpecodes and binarize with its dict.*.txt")
    hyphens = parser.add_mutually_exclusive_group()
    hyphens.add_argument("--aggressive-hyphens", dest="aggressive", action="store_true", default=None,
                         help="tokenizer.perl -a (the default; with --teacher-dir: when its dictionary holds @-@)")
    hyphens.add_argument("--no-aggressive-hyphens", dest="aggressive", action="store_false",
                         help="tokenizer.perl without -a")
    parser.add_argument("--no-romanian-rules", dest="romanian", action="store_false",
                        help="skip the WMT'16 Romanian normalisation and diacritic removal (Romanian side)")
    args = parser.parse_args(argv)
    bin_dir = prepare_bpe(args.corpus, args.data_root, args.src, args.tgt, args.out, args.train_lines,
                          args.valid_lines, args.test_lines, args.merges, args.workers, args.test_from_valid,
                          args.teacher_dir, args.aggressive, args.romanian)
    print(bin_dir)


if __name__ == "__main__":
    main()
