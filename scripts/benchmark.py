#!/usr/bin/env python
"""Benchmark: the cost of every KD criterion next to plain training, and teacher decoding speed.

One process times, on the same real batches of Multi30k en-de (``--data-root``,
default ``../shared/data`` next to the checkout), at two vocabulary sizes
(8,000 SentencePiece pieces learnt from all 29,000 training pairs, and the same
dictionary padded with unused symbols to 32,000 entries, with a copy of the
teacher whose rows for them score -40 at every position, so that they hold no
probability mass, as a trained teacher's unused rows do), fairseq training steps -- the
task's ``train_step`` (forward + backward), gradient scaling, clipping, the
optimizer step and the criterion's ``reduce_metrics``, as
``Trainer.train_step`` runs them -- for ``label_smoothed_cross_entropy``
and every criterion of the project with a live teacher and with the offline
top-k teacher cache (``NAME_cached``), plus the teacher's forward alone and the single passes
TIE-KD, the gated hybrid and on-policy KD need (their floors).  Timings are CPU seconds of
the process (one intra-op thread by default), medians over repetitions that
interleave the criterions.  Peak memory is measured per criterion in a fresh
child process (forked by a fork server that has imported torch and fairseq and
nothing else): on the CPU the resident high-water mark of two training steps
above the resident size after construction (the kernel's VmHWM, reset after
construction; large allocations are returned to the system on free), on a
GPU ``torch.cuda.max_memory_allocated`` above the allocation after
construction.

Then the same test sentences (1,000; ``--decode-sentences``) are translated
with beam 5 by ``fairseq-generate``, the project's fairseq backend and the
CTranslate2 backend in float32 and int8 (one teacher checkpoint for all),
timed (wall clock of the decoding loop, model loading excluded; medians over
interleaved repetitions) and scored with sacreBLEU against the references.

Usage::

    python scripts/benchmark.py --json benchmark.json      # the full run (about 11 minutes on 2 cores)
    python scripts/benchmark.py --quick --json out.json    # tiny models and data (< 2 minutes)

It prints a table of ratios to ``label_smoothed_cross_entropy``, the floors
of ``tie_kd``, ``hybrid_gated_kd`` and ``on_policy_kd``, and by how much each target is
missed; ``--json PATH`` writes the ratios (format in :func:`summary_json`).
Students are randomly initialised for the step timings (the cost of a step
does not depend on the weights); the teacher is trained briefly
(``--teacher-updates``, every core, not timed) so that its translations -- the
hybrid's online greedy targets and the decoders' output -- have realistic
lengths.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: the bench package

from bench.common import ARCHS, CACHED, CRITERIA, NOMINAL_VOCABS, PLAIN, REPO, SRC, TGT, log, quiet_logging  # noqa: E402
from bench.data import ADDED_ROW_LOGIT, pad_teacher, pad_vocab, prepare_vocab, train_teacher  # noqa: E402
from bench.decoding import benchmark_decoding, build_cache  # noqa: E402
from bench.memory import measure_memory  # noqa: E402
from bench.report import print_report, summary_json  # noqa: E402
from bench.steps import Setup, time_passes, time_steps  # noqa: E402

if REPO not in sys.path:
    sys.path.insert(0, REPO)


def benchmark_vocab(info, arch, teacher, args, skipped, work):
    nominal = info["nominal"]
    names = list(CRITERIA)
    cache_dir, bytes_per_token, index_per_token = build_cache(
        info["bin"], teacher, os.path.join(work, f"cache_v{nominal}"), args.threads)
    log(f"V={nominal}: peak memory, one fresh child process per criterion")
    spec = {"bin": info["bin"], "arch": arch, "teacher": teacher, "max_tokens": args.max_tokens,
            "batches": 2, "threads": args.threads}  # two steps: the second with the optimizer's state
    memory = measure_memory(spec, names)
    memory.update(measure_memory(dict(spec, cache_dir=cache_dir), [n + "_cached" for n in CACHED]))
    for name, m in list(memory.items()):
        if "skipped" in m:
            skipped.append(f"V={nominal} {name}: {m['skipped']}")
            del memory[name]

    log(f"V={nominal}: building the setups")
    setup = Setup(info["bin"], arch, teacher, args.max_tokens, names, num_batches=args.batches)
    # its own task (--teacher-cache instead of --teacher-path): the same batches plus the cache's rows
    cached = Setup(info["bin"], arch, teacher, args.max_tokens, [n + "_cached" for n in CACHED],
                   cache_dir=cache_dir, num_batches=args.batches)
    cached_names = list(cached.criteria)
    entries = [(setup, n) for n in names] + [(cached, n) for n in cached_names]
    log(f"V={nominal}: timing {len(entries)} criterions x {len(setup.batches)} batches x {args.reps} repetitions")
    times = time_steps(entries, args.reps)
    passes = time_passes(setup, args.reps)
    del setup, cached
    plain = times[PLAIN]
    plain_peak = memory[PLAIN]["peak_bytes"]
    floors = {
        "tie_kd": (3 * (passes["student"] + passes["teacher"]) + passes["optimizer"]) / plain,
        "hybrid_gated_kd": (passes["student"] + passes["student_hyp"] + passes["teacher"] + passes["greedy"]
                            + passes["optimizer"]) / plain,
        "on_policy_kd": (passes["student_gen"] + passes["teacher_gen"] + passes["student_on_gen"]
                         + passes["optimizer"]) / plain,
    }
    timed = names + cached_names
    return {
        "step_time_ratio": {n: times[n] / plain for n in timed},
        "peak_memory_ratio": {n: memory[n]["peak_bytes"] / plain_peak for n in memory},
        "teacher_forward_share": passes["teacher"] / plain,
        "vocab": info["vocab"], "sentencepiece_pieces": info["sentencepiece_pieces"],
        "padding_symbols": info["padding_symbols"], "plain_step_seconds": plain,
        "plain_peak_bytes": plain_peak, "step_seconds": {n: times[n] for n in timed},
        "peak_bytes": {n: memory[n]["peak_bytes"] for n in memory}, "memory_method": memory[PLAIN]["how"],
        "passes": passes, "floors": floors, "batches": args.batches, "max_tokens": args.max_tokens,
        "cache_bytes_per_token": bytes_per_token, "cache_index_bytes_per_token": index_per_token,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.path.join(os.path.dirname(REPO), "shared", "data"),
                        help="folder holding multi30k_en_de (default: ../shared/data next to the checkout)")
    parser.add_argument("--work-dir", help="where data, teachers and conversions are kept (default: a temporary "
                        "folder, removed at the end); a kept one is reused by the next run")
    parser.add_argument("--json", help="write the ratios to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, 2,000 training pairs, 100 decoded sentences, fewer repetitions (CI)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default: 2)")
    parser.add_argument("--batches", type=int, help="batches per repetition (default: 1)")
    parser.add_argument("--max-tokens", type=int, help="tokens per batch (default: 1024; quick: 512)")
    parser.add_argument("--decode-sentences", type=int, help="test sentences decoded (default: 1000; quick: 100)")
    parser.add_argument("--teacher-updates", type=int, help="updates of the teacher (default: 150; quick: 30)")
    parser.add_argument("--train-pairs", type=int, help="training pairs binarized for the timed batches, the cache "
                        "and the decoding teacher (default: 4000; quick: 2000); SentencePiece and the dictionary "
                        "are learnt from all of them (quick: from the 2,000)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every timed run (default: 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or 2
    args.batches = args.batches or 1
    args.max_tokens = args.max_tokens or (512 if quick else 1024)
    args.decode_sentences = args.decode_sentences or (100 if quick else 1000)
    args.teacher_updates = args.teacher_updates or (30 if quick else 150)
    arch = "quick" if quick else "full"

    import torch

    import fairseq_kd

    fairseq_kd.register()  # the tasks, criterions and the safe checkpoint loader

    torch.set_num_threads(args.threads)
    quiet_logging()
    warnings.filterwarnings("ignore")  # hydra's and torch's deprecation notices, once per config
    started = time.time()
    work = args.work_dir or tempfile.mkdtemp(prefix="fairseq-kd-benchmark.")
    os.makedirs(work, exist_ok=True)
    args.train_pairs = args.train_pairs or (2000 if quick else 4000)
    limits = {"train": 2000 if quick else None, "valid": 100, "test": args.decode_sentences}
    skipped = []
    try:
        small, large = NOMINAL_VOCABS
        log(f"data: Multi30k {SRC}-{TGT}, SentencePiece vocabulary {small}, and its dictionary padded to {large}")
        infos = {small: prepare_vocab(args.data_root, work, small, limits, args.threads, args.train_pairs)}
        infos[large] = pad_vocab(infos[small], work, large)
        log(f"teacher: fairseq-train, {args.teacher_updates} updates; the V={large} teacher is it with rows scored "
            f"{ADDED_ROW_LOGIT:g} for the padding symbols (no mass on them; it translates alike)")
        teachers = {small: train_teacher(infos[small]["bin"], os.path.join(work, f"teacher_v{small}"), arch,
                                         args.teacher_updates, args.max_tokens)}
        teachers[large] = pad_teacher(teachers[small], infos[large], os.path.join(work, f"teacher_v{large}"))
        per_vocab = {}
        for nominal in NOMINAL_VOCABS:
            per_vocab[nominal] = r = benchmark_vocab(infos[nominal], arch, teachers[nominal], args, skipped, work)
            log(f"V={nominal} done (step time / peak memory ratios): " + ", ".join(
                f"{n} {t:.2f}/{r['peak_memory_ratio'].get(n, math.nan):.2f}" for n, t in r["step_time_ratio"].items()))
        log(f"decoding {args.decode_sentences} sentences: fairseq-generate, fairseq backend, CTranslate2 float32/int8")
        info = infos[NOMINAL_VOCABS[0]]
        decode = benchmark_decoding(info["bin"], info["raw"], teachers[NOMINAL_VOCABS[0]], args.reps, 5,
                                    args.max_tokens, args.threads, work)
        summary = summary_json(per_vocab, decode)
        summary["details"].update({
            "command": " ".join(["python", "scripts/benchmark.py"] + (argv if argv is not None else sys.argv[1:])),
            "quick": quick, "arch": ARCHS[arch], "threads": args.threads, "reps": args.reps,
            "teacher_updates": args.teacher_updates, "skipped": skipped, "cpu_count": os.cpu_count(),
            "seconds": time.time() - started, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        })
        print_report(per_vocab, decode, summary, skipped)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, args.json)
        log(f"done in {time.time() - started:.0f} s")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
