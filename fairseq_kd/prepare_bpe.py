"""Prepare a parallel corpus the way fairseq's WMT models were: Moses tokenization, joint BPE, binarize.

::

    python -m fairseq_kd.prepare_bpe --corpus wmt14_en_de --data-root work/corpora \\
        --src en --tgt de --out work/data --merges 40000
    python -m fairseq_kd.prepare_bpe ... --teacher-dir wmt16.en-de.joined-dict.transformer

The rules of fairseq's ``examples/translation/prepare-wmt14en2{de,fr}.sh``, with sacremoses and
subword-nmt in place of the Perl scripts: punctuation normalization, removal of non-printing
characters, ``tokenizer.perl -a -l LANG`` (aggressive hyphen splitting, XML escaping); one joint
BPE of ``--merges`` operations (40000 in both scripts) learned on the tokenized training text of
both languages; then ``clean-corpus-n.perl -ratio 1.5 ... 1 250`` on the BPE'd training pairs (the
length filter comes after BPE).  The valid and test sets are kept whole (they are newstest sets
here, and their plain-text references are scored).

With ``--teacher-dir DIR`` (a fairseq model folder: ``bpecodes``, ``dict.SRC.txt``,
``dict.TGT.txt``) nothing is learned: the folder's BPE codes are applied and ``fairseq-preprocess``
binarizes with its dictionaries (``--srcdict``/``--tgtdict``), so the teacher's dictionary check
passes by construction.

Writes ``OUT/raw`` (plain text; the training pairs kept by the length filter), ``OUT/tok``
(tokenized), ``OUT/bpecodes``, ``OUT/bpe_text`` and ``OUT/bin``.  Each stage is skipped when its
output exists; every file is written under a temporary name and renamed.
"""

import argparse
import os
import shutil
import subprocess
import sys
import unicodedata
from typing import List, Optional, Sequence, Tuple

from tqdm import tqdm

from fairseq_kd.corpora import locate_corpus, read_lines
from fairseq_kd.errors import DistillationError
from fairseq_kd.prepare import SPLITS, add_corpus_arguments, slice_corpus
from fairseq_kd.textio import write_lines_atomic

MAX_TOKENS = 250  # clean-corpus-n.perl ... 1 250
MAX_RATIO = 1.5   # clean-corpus-n.perl -ratio 1.5


def _printable(line: str) -> str:
    """remove-non-printing-char.perl: every control/format character becomes a space."""
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in line)


def moses_tokenize(lines: Sequence[str], lang: str, desc: str = "") -> List[str]:
    """normalize-punctuation.perl | remove-non-printing-char.perl | tokenizer.perl -a -l LANG."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    norm, tok = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    return [
        tok.tokenize(_printable(norm.normalize(line)), aggressive_dash_splits=True, escape=True, return_str=True)
        for line in tqdm(lines, desc=f"moses {desc}", unit="sent", leave=False)
    ]


def learn_codes(texts: Sequence[str], merges: int, dest: str) -> None:
    """One joint BPE (subword-nmt learn_bpe) on the concatenated tokenized files ``texts``."""
    from subword_nmt.learn_bpe import learn_bpe

    joined = dest + ".input.tmp"
    with open(joined, "w", encoding="utf-8") as out:
        for path in texts:
            with open(path, encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
    with open(joined, encoding="utf-8") as f, open(dest + ".tmp", "w", encoding="utf-8") as out:
        learn_bpe(f, out, merges)
    os.remove(joined)
    os.replace(dest + ".tmp", dest)


def apply_codes(codes: str, lines: Sequence[str], desc: str = "") -> List[str]:
    from subword_nmt.apply_bpe import BPE

    with open(codes, encoding="utf-8") as f:
        bpe = BPE(f)
    return [bpe.process_line(line) for line in tqdm(lines, desc=f"bpe {desc}", unit="sent", leave=False)]


def keep_pair(src: str, tgt: str, max_tokens: int = MAX_TOKENS, ratio: float = MAX_RATIO) -> bool:
    """clean-corpus-n.perl on BPE'd text: 1..max_tokens tokens on each side, length ratio <= ratio."""
    ns, nt = len(src.split()), len(tgt.split())
    return 1 <= ns <= max_tokens and 1 <= nt <= max_tokens and ns <= ratio * nt and nt <= ratio * ns


def teacher_files(teacher_dir: str, src: str, tgt: str) -> Tuple[str, str, str]:
    """``(bpecodes, dict.SRC.txt, dict.TGT.txt)`` of a fairseq model folder."""
    codes = next((os.path.join(teacher_dir, n) for n in ("bpecodes", "code") if os.path.exists(os.path.join(teacher_dir, n))), None)
    if codes is None:
        raise DistillationError(f"{teacher_dir} has no bpecodes: pass the folder of a fairseq BPE model (--teacher-dir)")
    dicts = [os.path.join(teacher_dir, f"dict.{lang}.txt") for lang in (src, tgt)]
    for path in dicts:
        if not os.path.exists(path):
            raise DistillationError(f"{path} not found: --teacher-dir needs the model's dict.{src}.txt and dict.{tgt}.txt")
    return codes, dicts[0], dicts[1]


def _read(path: str) -> List[str]:
    return list(read_lines(path))


def prepare_bpe(corpus: str, data_root: str, src: str, tgt: str, out: str, train_lines: Optional[int] = None,
                valid_lines: Optional[int] = None, test_lines: Optional[int] = None, merges: int = 40000,
                workers: int = 1, test_from_valid: Optional[int] = None, teacher_dir: Optional[str] = None) -> str:
    """Run every stage; returns the binarized data directory."""
    corpus_dir = locate_corpus(corpus, data_root)
    sliced = os.path.join(out, "sliced")
    limits = {"train": train_lines, "valid": valid_lines, "test": test_lines}
    slice_corpus(corpus_dir, sliced, (src, tgt), limits, test_from_valid)
    tok_dir, bpe_dir, raw_dir = (os.path.join(out, d) for d in ("tok", "bpe_text", "raw"))
    os.makedirs(tok_dir, exist_ok=True)
    for split in SPLITS:
        for lang in (src, tgt):
            dest = os.path.join(tok_dir, f"{split}.{lang}")
            if not os.path.exists(dest):
                write_lines_atomic(dest, moses_tokenize(_read(os.path.join(sliced, f"{split}.{lang}")), lang, f"{split}.{lang}"))
    codes = os.path.join(out, "bpecodes")
    dicts = None
    if teacher_dir:
        teacher_codes, src_dict, tgt_dict = teacher_files(teacher_dir, src, tgt)
        dicts = (src_dict, tgt_dict)
        if not os.path.exists(codes):
            shutil.copyfile(teacher_codes, codes + ".tmp")
            os.replace(codes + ".tmp", codes)
    elif not os.path.exists(codes):
        learn_codes([os.path.join(tok_dir, f"train.{lang}") for lang in (src, tgt)], merges, codes)
    os.makedirs(bpe_dir, exist_ok=True)
    os.makedirs(raw_dir, exist_ok=True)
    for split in SPLITS:
        dests = [os.path.join(bpe_dir, f"{split}.{lang}") for lang in (src, tgt)]
        if all(os.path.exists(d) for d in dests):
            continue
        s_bpe, t_bpe = (apply_codes(codes, _read(os.path.join(tok_dir, f"{split}.{lang}")), f"{split}.{lang}")
                        for lang in (src, tgt))
        s_raw, t_raw = (_read(os.path.join(sliced, f"{split}.{lang}")) for lang in (src, tgt))
        keep = [split != "train" or keep_pair(s, t) for s, t in zip(s_bpe, t_bpe)]
        for lang, bpe_lines, raw_lines in ((src, s_bpe, s_raw), (tgt, t_bpe, t_raw)):
            write_lines_atomic(os.path.join(raw_dir, f"{split}.{lang}"), (r for r, k in zip(raw_lines, keep) if k))
            write_lines_atomic(os.path.join(bpe_dir, f"{split}.{lang}"), (b for b, k in zip(bpe_lines, keep) if k))
        if split == "train":
            print(f"{split}: {sum(keep)} of {len(keep)} pairs kept by the length filter "
                  f"(1..{MAX_TOKENS} BPE tokens, ratio <= {MAX_RATIO})")
    bin_dir = os.path.join(out, "bin")
    binarize(bpe_dir, bin_dir, src, tgt, workers, dicts)
    return bin_dir


def binarize(text_dir: str, bin_dir: str, src: str, tgt: str, workers: int, dicts: Optional[Tuple[str, str]]) -> None:
    if os.path.exists(os.path.join(bin_dir, "preprocess.log")):
        return
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
    parser.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
    parser.add_argument("--test-from-valid", type=int, default=None, metavar="N",
                        help="for a corpus without a test split: the last N valid pairs are the test set")
    parser.add_argument("--teacher-dir", default=None,
                        help="a fairseq model folder: apply its bpecodes and binarize with its dict.*.txt")
    args = parser.parse_args(argv)
    bin_dir = prepare_bpe(args.corpus, args.data_root, args.src, args.tgt, args.out, args.train_lines,
                          args.valid_lines, args.test_lines, args.merges, args.workers, args.test_from_valid,
                          args.teacher_dir)
    print(bin_dir)


if __name__ == "__main__":
    main()
