"""Memory and throughput of the streaming Moses + BPE preparation (fairseq_kd.prepare_bpe), on a synthetic corpus.

::

    python scripts/measure_prepare.py --out work/measure_prepare [--markdown work/measure_prepare/results.md]

Builds two synthetic En-De corpora from the local Multi30k text (``--data-root``/multi30k_en_de): ``short``,
``--large`` pairs (2 lines each) of its sentences cycled, for the memory runs, and ``long``, ``--speed``
pairs whose lines join two sentences (about the length of a WMT sentence), for the throughput runs.
Learns ``--merges`` BPE codes on the first ``--codes-pairs`` long pairs, then runs the per-line steps of
``prepare_bpe`` (tokenization chain, BPE word counts, BPE, clean-corpus-n) in a fresh process per
measurement:

* peak memory (max RSS of the main process and of one worker) at ``--small`` and ``--large`` pairs
  with 2 workers;
* throughput with 1 and 2 workers on ``--speed`` pairs, ``--repeat`` times each, alternating: wall time (the
  fastest run of each, the one least disturbed by other work), and CPU time per line (main process plus
  workers), which stays meaningful on a shared machine;
* the time extrapolated for each WMT pair at 8 and 32 workers, from the CPU time per line with 1
  worker, the parallel efficiency measured with 2, and the main process' own CPU time per line (the
  ceiling on throughput however many workers there are).

Prints the results as markdown (and writes them to ``--markdown``).  See docs/data_preparation.md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# approximate training-set sizes (sentence pairs before the length filter) of the recipes' corpora
WMT_PAIRS = {"WMT'14 En-De": 4.5e6, "WMT'14 En-Fr": 36e6, "WMT'16 En-Ro": 0.61e6}


def build_corpus(data_root: str, dest: str, pairs: int, joined: bool) -> None:
    from fairseq_kd.textio import read_text_lines

    if all(os.path.exists(os.path.join(dest, f"train.{lang}")) for lang in ("en", "de")):
        return
    os.makedirs(dest, exist_ok=True)
    src = os.path.join(data_root, "multi30k_en_de")
    sides = {}
    for lang in ("en", "de"):
        path = next(p for p in (os.path.join(src, f"train.{lang}"), os.path.join(src, f"train.{lang}.gz"))
                    if os.path.exists(p))
        sides[lang] = list(read_text_lines(path))
    n = len(sides["en"])
    for lang, lines in sides.items():
        tmp = os.path.join(dest, f"train.{lang}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(pairs):
                f.write(f"{lines[i % n]} {lines[(7 * i + 3) % n]}\n" if joined else f"{lines[i % n]}\n")
        os.replace(tmp, os.path.join(dest, f"train.{lang}"))


def head(src: str, dest: str, n: int) -> None:
    with open(src, encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            out.write(line)


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def child(args) -> None:
    """One measurement in this (fresh) process: the per-line steps of prepare_bpe over ``--pairs`` pairs."""
    from collections import Counter

    from fairseq_kd import prepare_bpe as pb
    from fairseq_kd.streaming import map_file, reduce_files

    work = args.work
    os.makedirs(work, exist_ok=True)
    for lang in ("en", "de"):
        head(os.path.join(args.corpus, f"train.{lang}"), os.path.join(work, f"raw.{lang}"), args.pairs)
    steps = {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    self0 = resource.getrusage(resource.RUSAGE_SELF)

    def mark(name, t, c):
        steps[name] = {"wall": time.perf_counter() - t, "cpu": cpu_seconds() - c}
        return time.perf_counter(), cpu_seconds()

    t, c = t0, c0
    for lang in ("en", "de"):
        map_file(pb.moses_chunks, (lang, False, True, True), os.path.join(work, f"raw.{lang}"),
                 os.path.join(work, f"tok.{lang}"), args.workers)
    t, c = mark("tokenize", t, c)
    reduce_files(pb.word_count_chunks, (), [os.path.join(work, f"tok.{lang}") for lang in ("en", "de")], pb._add,
                 Counter(), args.workers)
    t, c = mark("word counts", t, c)
    for lang in ("en", "de"):
        map_file(pb.bpe_chunks, (args.codes,), os.path.join(work, f"tok.{lang}"), os.path.join(work, f"bpe.{lang}"),
                 args.workers)
    t, c = mark("bpe", t, c)
    pick = lambda p: tuple(os.path.join(work, f"{p}.{lang}") for lang in ("en", "de"))  # noqa: E731
    read, kept = pb.filter_pairs(pick("bpe"), pick("raw"), pick("clean"), pick("clean_raw"), workers=args.workers)
    mark("clean-corpus-n", t, c)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(work, "tok.en"), encoding="utf-8") as f:  # outside the timed steps
        words = sum(len(line.split()) for line in f)
    print(json.dumps({
        "pairs": args.pairs, "lines": 2 * args.pairs, "workers": args.workers, "kept": kept,
        "words_per_line": words / args.pairs, "wall": wall, "cpu": cpu,
        "main_cpu": (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime),
        "main_rss_mb": self1.ru_maxrss / 1024, "worker_rss_mb": children.ru_maxrss / 1024, "steps": steps,
    }))


def run_child(args, pairs: int, workers: int, codes: str, corpus: str) -> dict:
    work = os.path.join(args.out, f"run_{pairs}_{workers}")
    subprocess.run(["rm", "-rf", work], check=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--pairs", str(pairs), "--workers", str(workers),
           "--corpus", os.path.join(args.out, corpus), "--codes", codes, "--work", work, "--out", args.out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"measure_prepare: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", work], check=True)
    print(f"  {pairs} pairs, {workers} worker(s): {result['wall']:.1f} s wall, {result['cpu']:.1f} s CPU, "
          f"main {result['main_rss_mb']:.0f} MB, worker {result['worker_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return result


def hms(seconds: float) -> str:
    h, m = divmod(int(round(seconds / 60)), 60)
    return f"{h} h {m:02d} min"


def report(args, small, large, ones, twos, commit, machine) -> str:
    one, two = min(ones, key=lambda r: r["wall"]), min(twos, key=lambda r: r["wall"])
    us = lambda r, key="cpu": 1e6 * r[key] / r["lines"]  # noqa: E731
    eff = us(one) / us(two)  # CPU per line with 1 worker / with 2 (parallel overhead)
    main_us = us(two, "main_cpu")
    lines = [
        f"Command: `python scripts/measure_prepare.py --out {args.out} --small {args.small} --large {args.large} "
        f"--speed {args.speed} --repeat {args.repeat} --merges {args.merges}` at commit `{commit}`; {machine}.",
        "",
        "Peak memory (max RSS; 2 workers; the per-line steps: tokenization chain, BPE word counts, BPE, "
        "clean-corpus-n; the `short` corpus, Multi30k sentences cycled; the main process holds torch and fairseq, "
        "which the `fairseq_kd.wmt` package loads):",
        "",
        "| lines | main process | one worker | wall | CPU |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['lines']:,} | {r['main_rss_mb']:.0f} MB | {r['worker_rss_mb']:.0f} MB | {r['wall']:.0f} s | "
          f"{r['cpu']:.0f} s |" for r in (small, large)],
        "",
        f"Throughput on {one['lines']:,} lines of the `long` corpus (two Multi30k sentences a line, "
        f"{one['words_per_line']:.1f} tokens a line after tokenization); the fastest of {len(ones)} runs each "
        f"(wall times of all runs: 1 worker " + ", ".join(f"{r['wall']:.1f}" for r in ones) + " s; 2 workers "
        + ", ".join(f"{r['wall']:.1f}" for r in twos) + " s):",
        "",
        "| workers | wall | lines/s (wall) | CPU per line (main + workers) | main process CPU per line |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['workers']} | {r['wall']:.1f} s | {r['lines'] / r['wall']:,.0f} | {us(r):.0f} µs | "
          f"{us(r, 'main_cpu'):.0f} µs |" for r in (one, two)],
        "",
        f"Speed-up of 2 workers over 1: {one['wall'] / two['wall']:.2f}x in wall time; from CPU time, "
        f"2 x {eff:.3f} = {2 * eff:.2f}x (the speed-up on 2 free cores: the parallel overhead is "
        f"{100 * (1 / eff - 1):+.1f}% CPU per line).",
        "",
        "Per step, 1 worker (CPU per line): " + ", ".join(
            f"{name} {1e6 * s['cpu'] / one['lines']:.0f} µs" for name, s in one["steps"].items()) + ".",
        "",
        "Extrapolated time of these steps for each WMT training set (2 lines per pair; W workers on W free cores: "
        f"lines x {us(one):.0f} µs / (W x {eff:.3f}), but not less than lines x {main_us:.1f} µs, the main "
        "process' own work; BPE learning, whose cost follows the vocabulary and the merges, and "
        "fairseq-preprocess are not included):",
        "",
        "| corpus | pairs (approx.) | 8 workers | 32 workers |",
        "|---|---:|---:|---:|",
    ]
    for name, pairs in WMT_PAIRS.items():
        n = 2 * pairs
        t = {w: max(n * us(one) / (w * eff), n * main_us) / 1e6 for w in (8, 32)}
        lines.append(f"| {name} | {pairs / 1e6:.2f}M | {hms(t[8])} | {hms(t[32])} |")
    lines += ["", "Raw results:", "", "```json", json.dumps([small, large, *ones, *twos], indent=1), "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="work/measure_prepare", help="working folder (corpus, codes, runs)")
    parser.add_argument("--data-root", default=os.path.join(REPO, "..", "shared", "data"),
                        help="folder holding multi30k_en_de/")
    parser.add_argument("--small", type=int, default=250_000, help="pairs of the small memory run (2 lines each)")
    parser.add_argument("--large", type=int, default=1_000_000, help="pairs of the large memory run and the corpus")
    parser.add_argument("--speed", type=int, default=250_000, help="pairs of the 1- and 2-worker throughput runs")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each throughput measurement (the fastest is reported)")
    parser.add_argument("--merges", type=int, default=10_000, help="BPE merges learned for the runs")
    parser.add_argument("--codes-pairs", type=int, default=50_000, help="pairs the BPE codes are learned on")
    parser.add_argument("--machine", default="", help="a note on the machine (e.g. shared with other jobs)")
    parser.add_argument("--markdown", default=None, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--codes", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, REPO)
    from fairseq_kd import prepare_bpe as pb

    build_corpus(args.data_root, os.path.join(args.out, "short"), max(args.large, args.small), joined=False)
    corpus = os.path.join(args.out, "long")
    build_corpus(args.data_root, corpus, max(args.speed, args.codes_pairs), joined=True)
    codes = os.path.join(args.out, "bpecodes")
    if not os.path.exists(codes):
        sample = os.path.join(args.out, "codes_sample")
        os.makedirs(sample, exist_ok=True)
        texts = []
        for lang in ("en", "de"):
            head(os.path.join(corpus, f"train.{lang}"), os.path.join(sample, f"raw.{lang}"), args.codes_pairs)
            texts.append(os.path.join(sample, f"tok.{lang}"))
            from fairseq_kd.streaming import map_file

            map_file(pb.moses_chunks, (lang, False, True, True), os.path.join(sample, f"raw.{lang}"), texts[-1], 2)
        pb.learn_codes(texts, args.merges, codes, workers=2)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    load = os.getloadavg()[0]
    machine = args.machine or f"{os.cpu_count()} cores, load average {load:.1f} at the start"
    # the throughput runs first, while the machine is as it was when the load was read
    ones, twos = [], []
    for _ in range(args.repeat):
        ones.append(run_child(args, args.speed, 1, codes, "long"))
        twos.append(run_child(args, args.speed, 2, codes, "long"))
    small = run_child(args, args.small, 2, codes, "short")
    large = run_child(args, args.large, 2, codes, "short")
    text = report(args, small, large, ones, twos, commit, machine)
    print(text)
    if args.markdown:
        with open(args.markdown + ".tmp", "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(args.markdown + ".tmp", args.markdown)


if __name__ == "__main__":
    main()
