"""Source-only (unlabeled) text for ``--task iterative_distillation``.

::

    python -m fairseq_kd.unlabeled --data data-bin/wmt14_en_de --input mono.en \\
        --spm-model spm.model --dest work/data --name unlabeled

segments ``--input`` (plain text, one sentence per line, ``.gz`` allowed)
with the SentencePiece model that segmented ``--data`` (or takes it as
already segmented without ``--spm-model``), drops empty lines, and binarizes
it with ``--data``'s own source dictionary into
``DEST/NAME.SRC-TGT.SRC.{bin,idx}`` -- a source-only split, exactly what
``fairseq-preprocess --only-source --srcdict DATA/dict.SRC.txt`` writes.
When ``--dest`` differs from ``--data``, every file of ``--data`` is linked
into ``--dest`` first, so the original data directory is never written to
and ``--dest`` is a complete data directory for ``fairseq-train``.

Outputs: ``DEST/NAME.spm.SRC`` (the segmented text, one line per example,
the input of teacher decoding) and the binarized split; each is written under
a temporary name and renamed when complete.
"""

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from fairseq_kd.errors import DistillationError

logger = logging.getLogger("fairseq_kd.unlabeled")


def link_data_dir(data: str, dest: str) -> int:
    """Symlink every file of ``data`` into ``dest``; returns the number of links made.  A link left by an
    earlier run that points elsewhere (another data folder) is replaced; a regular file is kept."""
    os.makedirs(dest, exist_ok=True)
    if os.path.realpath(data) == os.path.realpath(dest):
        return 0
    made = 0
    for name in sorted(os.listdir(data)):
        source = os.path.abspath(os.path.join(data, name))
        target = os.path.join(dest, name)
        if not os.path.isfile(source):
            continue
        if os.path.islink(target) and os.path.realpath(target) != os.path.realpath(source):
            os.remove(target)
        if not os.path.lexists(target):
            os.symlink(source, target)
            made += 1
    return made


def segment(input_path: str, output_path: str, spm_model: Optional[str], progress: bool = True) -> int:
    """Write the non-empty lines of ``input_path`` to ``output_path``,
    SentencePiece-encoded with ``spm_model`` when given; returns the line count."""
    from tqdm import tqdm

    from fairseq_kd.corpora import read_lines

    if not os.path.isfile(input_path):
        raise DistillationError(f"source-only text {input_path} not found (--input)")
    encode = None
    if spm_model:
        if not os.path.isfile(spm_model):
            raise DistillationError(f"SentencePiece model {spm_model} not found (--spm-model)")
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=spm_model)

        def encode(line: str) -> str:
            return " ".join(processor.encode(line, out_type=str))

    tmp = output_path + ".tmp"
    kept = dropped = 0
    with open(tmp, "w", encoding="utf-8") as f:
        lines = tqdm(read_lines(input_path), desc=f"segment {os.path.basename(input_path)}",
                     unit="sent", disable=not progress, file=sys.stderr)
        for line in lines:
            line = line.strip()
            if not line:
                dropped += 1
                continue
            f.write((encode(line) if encode else " ".join(line.split())) + "\n")
            kept += 1
    os.replace(tmp, output_path)
    if dropped:
        logger.info("%s: %d empty lines dropped", input_path, dropped)
    if kept == 0:
        raise DistillationError(f"{input_path} has no non-empty line; pass a file of source sentences")
    return kept


def binarize_source(text_path: str, dict_path: str, prefix: str, workers: int = 1, dataset_impl: str = "mmap"):
    """Binarize ``text_path`` with the dictionary ``dict_path`` into ``prefix.{bin,idx}``
    (the index is renamed last); returns fairseq's binarizer summary."""
    from fairseq.data import Dictionary

    from fairseq_kd.data.binarize import binarize_text

    return binarize_text(text_path, Dictionary.load(dict_path), prefix, workers=workers, dataset_impl=dataset_impl)


def prepare_unlabeled(
    data: str,
    input_path: str,
    dest: Optional[str] = None,
    name: str = "unlabeled",
    spm_model: Optional[str] = None,
    src: Optional[str] = None,
    tgt: Optional[str] = None,
    workers: int = 1,
    progress: bool = True,
) -> int:
    """Segment and binarize ``input_path`` as source-only split ``name`` of
    ``dest`` (default: ``data``); returns the number of examples."""
    from fairseq.data import data_utils

    if not os.path.isdir(data):
        raise DistillationError(f"data directory {data} not found (--data)")
    if src is None or tgt is None:
        src, tgt = data_utils.infer_language_pair(data)
        if src is None:
            raise DistillationError(f"cannot infer the language pair of {data}: pass --source-lang and --target-lang")
    dict_path = os.path.join(data, f"dict.{src}.txt")
    if not os.path.isfile(dict_path):
        raise DistillationError(f"{dict_path} not found; --data must be the binarized data directory (fairseq-preprocess output)")
    if "." in name or name in ("train", "valid", "test"):
        raise DistillationError(f"--name {name!r} must contain no '.' and differ from train/valid/test")
    dest = dest or data
    link_data_dir(data, dest)
    text_path = os.path.join(dest, f"{name}.spm.{src}")
    n = segment(input_path, text_path, spm_model, progress=progress)
    prefix = os.path.join(dest, f"{name}.{src}-{tgt}.{src}")
    summary = binarize_source(text_path, dict_path, prefix, workers=workers)
    logger.info("%s -> %s.{bin,idx}: %s", input_path, prefix, summary)
    return n


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stderr,
    )
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_kd.unlabeled",
        description="Segment and binarize source-only text as a split of a fairseq data directory "
        "(--unlabeled-subset of --task iterative_distillation).",
    )
    parser.add_argument("--data", required=True, help="binarized bitext directory (its dict.SRC.txt is used)")
    parser.add_argument("--input", required=True, help="source-only text, one sentence per line (.gz allowed)")
    parser.add_argument("--dest", help="data directory to write to; --data's files are linked into it (default: --data)")
    parser.add_argument("--name", default="unlabeled", help="split name (default: unlabeled)")
    parser.add_argument("--spm-model", help="SentencePiece model of --data; omit when --input is already segmented")
    parser.add_argument("-s", "--source-lang", help="source language (default: inferred from --data)")
    parser.add_argument("-t", "--target-lang", help="target language (default: inferred from --data)")
    parser.add_argument("--workers", type=int, default=1, help="binarization processes")
    parser.add_argument("--no-progress-bar", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    n = prepare_unlabeled(
        args.data, args.input, args.dest, args.name, args.spm_model, args.source_lang,
        args.target_lang, args.workers, progress=not args.no_progress_bar,
    )
    print(n)


if __name__ == "__main__":
    main()
