"""Sequence-level KD data: decode the training sources with the teacher, merge, binarize.

Three stages, each a subcommand (``python -m fairseq_kd.decoding STAGE ...``)
and a function of :mod:`fairseq_kd.decoding`:

``decode``
    Beam-search the source side of a binarized split (``--data DIR --split
    train``) or of a plain-text, already-BPE'd file (``--input FILE``) with the
    teacher (``--path a.pt``, or ``a.pt:b.pt`` for an ensemble), through
    fairseq's ``SequenceGenerator`` (``task.build_generator``) on models read
    by the safe checkpoint loader, or with ``--backend ctranslate2`` by
    CTranslate2 on the converted checkpoint (``ctranslate2_backend.py``).  The examples are cut into ``--num-shards``
    contiguous shards; ``--shard-id I`` decodes one of them (so shards can run
    as separate processes or on separate machines sharing ``--out-dir``),
    without it every shard is decoded in turn.  A shard is written to
    ``shardIII-of-NNN.jsonl.tmp`` and renamed to ``shardIII-of-NNN.jsonl``
    when complete: a re-run skips complete shards and redoes incomplete ones.
    Each line holds one example: its id, source and reference (BPE'd, as in
    the data) and the teacher's ``--nbest`` hypotheses, BPE'd tokens kept.
    With ``--chunk-size N`` the decode is a work queue: the examples are cut
    into shards (chunks) of at most N, and any number of processes on any
    number of machines sharing ``--out-dir`` each claim the next chunk nobody
    holds until none is left (``--wait``: then wait for the chunks of the
    others, taking over those whose holder stopped renewing its claim for
    ``--claim-timeout`` seconds).  SIGTERM releases the chunk being decoded.

``merge``
    Reads every shard, restores the original order by example id, checks that
    each example has exactly one record, picks one hypothesis per example (the
    teacher's best, or with ``--select bleu`` the n-best entry with the highest
    smoothed sentence BLEU against the reference: Seq-Inter) and flags
    degenerate ones (empty, longer than ``a * len(src) + b`` tokens, or looping
    on a repeated n-gram).  ``--on-degenerate keep|drop|reference`` keeps them,
    writes an empty line (the distillation task leaves such examples out of
    training) or substitutes the reference.  Writes one BPE'd line per source
    line, plus ``OUTPUT.report.json``.

``binarize``
    Binarizes the merged file with the data directory's own target dictionary
    into the same directory under a new subset name
    (``DATA/NAME.src-tgt.tgt.{bin,idx}``), after checking that it has as many
    lines as the split's source side.  Train on it with ``--task
    distillation_translation --teacher-target-subset NAME --criterion seq_kd``.

Every output is written under a temporary name and renamed when complete.
See ``docs/seq_kd.md`` for the full recipe.
"""

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional, Sequence

from fairseq_kd.cliargs import add_data_arguments, add_device_arguments, add_shard_arguments, add_teacher_arguments
from fairseq_kd.decoding.backend import get_backend
from fairseq_kd.decoding.binarize import binarize
from fairseq_kd.decoding.corpus import corpus_from_split, corpus_from_text
from fairseq_kd.decoding.decode import decode_corpus, decode_queue
from fairseq_kd.decoding.fairseq_backend import build_task, generation_settings, resolve_device
from fairseq_kd.decoding.merge import merge
from fairseq_kd.decoding.selection import DegenerateCheck
from fairseq_kd.decoding.shards import num_chunks, shards_complete
from fairseq_kd.errors import DistillationError

logger = logging.getLogger("fairseq_kd.decoding")


def decode(args, backend: Optional[str] = None) -> List[int]:
    """The ``decode`` subcommand, translating with the registered ``backend``
    (default: ``--backend``, else fairseq)."""
    backend = backend or getattr(args, "backend", None) or "fairseq"
    options = {"compute_type": args.ct2_compute_type} if backend == "ctranslate2" else {}
    task = build_task(args.data, args.source_lang, args.target_lang)
    if args.input:
        corpus = corpus_from_text(args.input, args.reference, task.source_dictionary, task.target_dictionary)
    else:
        corpus = corpus_from_split(
            args.data, args.split, task.cfg.source_lang, task.cfg.target_lang,
            task.source_dictionary, task.target_dictionary,
        )
    settings = generation_settings(args)
    if backend != "fairseq":  # recorded in the manifest: shards of different backends are not mixed
        settings.update(backend=backend, **options)
    if backend == "ctranslate2" and getattr(args, "ct2_dir", None):
        options["cache_dir"] = args.ct2_dir  # where the conversion is cached is not a decode setting
    if args.chunk_size is not None:
        if args.shard_id is not None:
            raise DistillationError("--chunk-size (a work queue) and --shard-id exclude each other")
        args.num_shards = num_chunks(len(corpus), args.chunk_size)
    shard_ids = list(range(args.num_shards)) if args.shard_id is None else [args.shard_id]
    if shards_complete(args.out_dir, args.num_shards, shard_ids):
        # nothing to decode: check the manifest, do not load the teacher
        return decode_corpus(corpus, None, args.out_dir, args.num_shards, shard_ids, settings=settings)
    device = resolve_device(args.device, args.cpu)
    teacher = get_backend(backend)(
        task, args.path, settings, device, precision=args.teacher_precision,
        teacher_data_dir=args.teacher_data_dir, **options,
    )
    logger.info(
        "decoding %d examples of %s in %d shard(s) on %s (beam %d, nbest %d)",
        len(corpus), corpus.description, args.num_shards, device, args.beam, args.nbest,
    )
    common = dict(
        max_tokens=args.max_tokens, max_sentences=args.batch_size, max_source_len=teacher.max_source_len,
        progress=not args.no_progress_bar, claim_timeout=args.claim_timeout, worker=args.worker_id,
    )
    if args.chunk_size is not None:
        done = decode_queue(corpus, teacher.translate, args.out_dir, args.num_shards, settings=settings,
                            wait=args.wait, **common)
        logger.info("worker %s decoded %d chunk(s) of %d", args.worker_id or os.getpid(), len(done), args.num_shards)
        return done
    return decode_corpus(corpus, teacher.translate, args.out_dir, args.num_shards, shard_ids, settings=settings,
                         **common)


class Terminated(BaseException):
    """SIGTERM (a preempted or cancelled job): unwinds the decode, releasing its chunk."""


def _terminate(signum, frame):
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_kd.decoding",
        description="Sequence-level KD data: decode the training sources with the teacher (sharded, "
        "resumable), merge the shards in order, binarize the result next to the gold data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dec = sub.add_parser("decode", help="beam-search a split (or a BPE'd text file) with the teacher, in shards")
    add_data_arguments(dec, "binarized data directory (dictionaries; the split to decode)",
                       "binarized split to decode (default: train)")
    dec.add_argument("--input", help="decode this plain-text, already-BPE'd source file instead of --split")
    dec.add_argument("--reference", help="BPE'd references aligned with --input (for Seq-Inter and --on-degenerate reference)")
    add_teacher_arguments(dec)
    dec.add_argument("--backend", default="fairseq", choices=["fairseq", "ctranslate2"],
                     help="fairseq: SequenceGenerator on the checkpoint; ctranslate2: the checkpoint converted once "
                     "(cached next to it, keyed by its sha256) and decoded by CTranslate2 (pip install ctranslate2)")
    dec.add_argument("--ct2-compute-type", default="default",
                     choices=["default", "float32", "int8", "float16", "int8_float16", "auto"],
                     help="CTranslate2 arithmetic (default: float16 on a GPU, float32 on the CPU)")
    dec.add_argument("--ct2-dir", help="folder of the CTranslate2 conversion (default: next to the checkpoint; "
                     "e.g. the work folder when the checkpoint's is read-only); converted once, under a lock")
    dec.add_argument("--out-dir", required=True, help="directory of the shard files and manifest")
    add_shard_arguments(dec, "decode only this shard (default: every shard in turn)")
    dec.add_argument("--chunk-size", type=int,
                     help="a work queue: shards of at most this many examples, each process claiming the next "
                     "one nobody holds (replaces --num-shards / --shard-id)")
    dec.add_argument("--wait", action="store_true",
                     help="with --chunk-size: when no chunk is left to claim, wait until the other workers' "
                     "chunks are complete, taking over those of stopped workers")
    dec.add_argument("--claim-timeout", type=float, default=600.0,
                     help="seconds without a heartbeat after which a claim (of any host) is stale and taken over")
    dec.add_argument("--worker-id", default=os.environ.get("SLURM_PROCID", os.environ.get("RANK", "")),
                     help="this worker's name in its claims and logs (default: $SLURM_PROCID, else $RANK)")
    dec.add_argument("--beam", type=int, default=5, help="beam size")
    dec.add_argument("--nbest", type=int, default=1, help="hypotheses kept per sentence (> 1 for Seq-Inter)")
    dec.add_argument("--max-len-a", type=float, default=0.0, help="max length = a * source length + b")
    dec.add_argument("--max-len-b", type=int, default=200, help="see --max-len-a")
    dec.add_argument("--min-len", type=int, default=1, help="minimum hypothesis length")
    dec.add_argument("--lenpen", type=float, default=1.0, help="length penalty (fairseq's)")
    dec.add_argument("--unkpen", type=float, default=0.0, help="unknown-word penalty (fairseq's)")
    dec.add_argument("--max-tokens", type=int, default=4096, help="source tokens per batch")
    dec.add_argument("--batch-size", type=int, help="sentences per batch (default: no limit)")
    add_device_arguments(dec, "decode on the CPU")

    mrg = sub.add_parser("merge", help="merge the shards in source order, select and check the hypotheses")
    mrg.add_argument("--out-dir", required=True, help="the --out-dir of decode")
    mrg.add_argument("--output", required=True, help="merged teacher targets, one BPE'd line per source line")
    mrg.add_argument("--select", default="top", choices=["top", "bleu"],
                     help="top: the teacher's best hypothesis; bleu: Seq-Inter, the n-best entry with the "
                     "highest smoothed sentence BLEU against the reference")
    mrg.add_argument("--on-degenerate", default="keep", choices=["keep", "drop", "reference"],
                     help="what to write for a degenerate hypothesis: keep it, an empty line (left out of "
                     "training), or the reference")
    mrg.add_argument("--remove-bpe", default="auto", choices=["auto", "sentencepiece", "subword_nmt", "none"],
                     help="subword scheme undone before sentence BLEU")
    mrg.add_argument("--degenerate-len-a", type=float, default=2.0,
                     help="a hypothesis longer than a * source length + b tokens is degenerate")
    mrg.add_argument("--degenerate-len-b", type=int, default=10, help="see --degenerate-len-a")
    mrg.add_argument("--degenerate-ngram", type=int, default=4, help="longest n-gram checked for loops")
    mrg.add_argument("--degenerate-repeats", type=int, default=4,
                     help="an n-gram repeated this many times in a row is a loop (0 or 1: no check)")
    mrg.add_argument("--report", help="JSON report (default: OUTPUT.report.json)")
    mrg.add_argument("--no-progress-bar", action="store_true", help="no tqdm progress bar")

    bnz = sub.add_parser("binarize", help="binarize the merged targets into the data directory under a new name")
    bnz.add_argument("--data", required=True, help="binarized data directory holding dict.TGT.txt and the split")
    bnz.add_argument("--input", required=True, help="the merged teacher targets (output of merge)")
    bnz.add_argument("--name", default="train_teacher", help="subset name for --teacher-target-subset (default: train_teacher)")
    bnz.add_argument("--split", default="train", help="the split the targets translate (line counts are checked against it)")
    bnz.add_argument("-s", "--source-lang", help="source language (default: inferred from --data)")
    bnz.add_argument("-t", "--target-lang", help="target language (default: inferred from --data)")
    bnz.add_argument("--workers", type=int, default=1, help="binarization processes")
    bnz.add_argument("--dataset-impl", default="mmap", help="fairseq dataset format (default: mmap)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stderr,
        force=True,  # fairseq's import already configured the root logger
    )
    args = build_parser().parse_args(argv)
    if args.command == "decode":
        signal.signal(signal.SIGTERM, _terminate)
        try:
            decode(args)
        except Terminated:
            logger.warning("terminated (SIGTERM): the chunk being decoded was released; a re-run resumes")
            sys.exit(143)
    elif args.command == "merge":
        merge(
            args.out_dir, args.output, select=args.select, on_degenerate=args.on_degenerate,
            check=DegenerateCheck(args.degenerate_len_a, args.degenerate_len_b, args.degenerate_ngram, args.degenerate_repeats),
            bpe=args.remove_bpe, report_path=args.report, progress=not args.no_progress_bar,
        )
    elif args.command == "binarize":
        binarize(
            args.input, args.data, args.name, args.source_lang, args.target_lang,
            split=args.split, workers=args.workers, dataset_impl=args.dataset_impl,
        )

