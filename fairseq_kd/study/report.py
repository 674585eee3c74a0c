"""The study's report: scores of every row on every test set, the seed spread, the paired
bootstrap test against the baseline, parameter counts, training times, the teacher analysis.

::

    python -m fairseq_kd.study.report --rows WORK/rows.tsv --testset test=REF --testset valid=REF \\
        [--analysis WORK/teacher_analysis.json] --command "..." --total-seconds N --out study.md

``rows.tsv`` has one line per row, tab-separated: ``row  method  seed  prefix  checkpoint  seconds  status
[flags]`` (``status`` is ``ok`` or ``skipped: REASON``; ``flags``, optional, the row's fairseq-train
flags, listed in the report); the hypotheses of a row on test set NAME are
``PREFIX.NAME.hyp``.  The first ``baseline`` row is the reference of sacreBLEU's paired
bootstrap resampling (``--paired-bs``, 1000 samples) for every other row.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
from typing import Dict, List, Optional, Sequence

from fairseq_kd.errors import DistillationError, exit_on_error
from fairseq_kd.scoring import read_text
from fairseq_kd.study import plots
from fairseq_kd.textio import write_lines_atomic

#: the TIE-KD paper's teacher analysis, as far as it could be verified (methods spec §2, [S])
PAPER_ANALYSIS = {"top1_gold_rate": "0.68-0.94 (WMT'14 En-De/En-Fr, WMT'16 En-Ro teachers; secondary source)"}


def read_rows(path: str) -> List[Dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) not in (7, 8):
                raise DistillationError(f"{path}:{n}: expected 7 or 8 tab-separated fields, got {len(fields)}; rebuild it")
            rows.append(dict(zip(("row", "method", "seed", "prefix", "checkpoint", "seconds", "status", "flags"), fields)))
    return rows


def parameter_count(checkpoint: str) -> int:
    """Parameters of the model in ``checkpoint``; tensors sharing storage (tied embeddings) count once."""
    from fairseq_kd.checkpoints import load_checkpoint_state

    seen, total = set(), 0
    for tensor in load_checkpoint_state(checkpoint)["model"].values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def score_testset(rows: Sequence[Dict[str, str]], name: str, ref_file: str, n_samples: int = 1000):
    """``{row: {bleu, chrf, p_bleu, p_chrf}}`` and the signatures of one test set."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    refs = read_text(ref_file)
    systems = []
    for r in rows:
        hyp_file = f"{r['prefix']}.{name}.hyp"
        hyps = read_text(hyp_file)
        if len(hyps) != len(refs):
            raise DistillationError(f"{hyp_file} has {len(hyps)} lines, the reference {ref_file} {len(refs)}; re-decode")
        systems.append((r["row"], hyps))
    baseline = [i for i, r in enumerate(rows) if r["method"] == "baseline"]
    if not baseline:
        raise DistillationError("the rows have no baseline; the bootstrap test compares every row with it")
    first = baseline[0]
    ordered = [systems[first]] + [s for i, s in enumerate(systems) if i != first]
    test = PairedTest(ordered, {"BLEU": BLEU(), "chrF": CHRF()}, references=[refs], test_type="bs", n_samples=n_samples)
    signatures, results = test()
    scores = {}
    for i, (row, _) in enumerate(ordered):
        bleu, chrf = results["BLEU"][i], results["chrF2"][i]
        scores[row] = dict(bleu=bleu.score, chrf=chrf.score, p_bleu=bleu.p_value, p_chrf=chrf.p_value)
    return scores, {k: str(v) for k, v in signatures.items()}


def _git_commit(repo: str) -> str:
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


#: the papers' orderings the study checks: (claim, higher method, lower methods)
ORDERINGS = [
    ("TIE-KD > Word-KD (Zhang et al. 2023)", "tie_kd", ["word_kd"]),
    ("Word-KD > no KD (Hinton et al.; Kim & Rush 2016)", "word_kd", ["baseline"]),
    ("Seq-KD (beam-5 teacher translations) > no KD (Kim & Rush 2016)", "seq_kd", ["baseline"]),
    ("Word-KD + Seq-KD > each alone (Kim & Rush 2016)", "word_seq_kd", ["word_kd", "seq_kd"]),
    ("hybrid > token- and sentence-level alone", "hybrid_gated_kd", ["word_kd", "seq_kd"]),
]


def verdict(bleu: float, p_value: Optional[float], baseline: Sequence[float], alpha: float = 0.05) -> str:
    """A KD row against the baseline: better / worse only when it is outside the baseline's seed range
    AND the paired bootstrap test finds the difference significant; else no clear difference."""
    if p_value is None:
        return "reference"
    if bleu > max(baseline) and p_value < alpha:
        return "better"
    if bleu < min(baseline) and p_value < alpha:
        return "worse"
    return "no clear difference"


def ordering_lines(method_bleu: Dict[str, List[float]]) -> List[str]:
    """Which of :data:`ORDERINGS` held, by the methods' mean BLEU (rows missing from the study are skipped)."""
    mean = {m: statistics.mean(v) for m, v in method_bleu.items() if v}
    lines = []
    for claim, high, lows in ORDERINGS:
        if high not in mean or any(low not in mean for low in lows):
            continue
        held = all(mean[high] > mean[low] for low in lows)
        detail = ", ".join(f"{m} {mean[m]:.2f}" for m in [high] + lows)
        lines.append(f"- {claim}: {'held' if held else 'did not hold'} ({detail})")
    return lines


def _p(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def build_report(rows, testsets: Dict[str, str], command: str, total_seconds: float, repo: str,
                 analysis: Optional[dict] = None, n_samples: int = 1000, collect: Optional[dict] = None,
                 student_args: Optional[str] = None) -> str:
    """The markdown report; ``collect``, when given, receives ``{test set: {row: scores}}``."""
    scored_rows = [r for r in rows if r["status"] == "ok"]
    lines = [
        "# Distillation study: Multi30k En-De",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {_machine()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- git commit: {_git_commit(repo)}",
        f"- total time: {total_seconds / 60:.1f} minutes",
        "",
    ]
    params = {r["row"]: parameter_count(r["checkpoint"]) for r in scored_rows}
    for name, ref in testsets.items():
        scores, signatures = score_testset(scored_rows, name, ref, n_samples)
        if collect is not None:
            collect[name] = scores
        base = [scores[r["row"]]["bleu"] for r in scored_rows if r["method"] == "baseline"]
        lines += [f"## {name}", "", f"baseline over {len(base)} seed(s): BLEU {statistics.mean(base):.2f}"
                  + (f" (std {statistics.stdev(base):.2f}, {min(base):.2f}..{max(base):.2f})" if len(base) > 1 else ""),
                  "", "| row | BLEU | chrF | BLEU - baseline mean | p (BLEU) | p (chrF) | parameters | training time | vs baseline |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['row']} | {r['status']} | | | | | | | |")
                continue
            s = scores[r["row"]]
            judged = "-" if r["method"] in ("baseline", "teacher") else verdict(s["bleu"], s["p_bleu"], base)
            lines.append(
                f"| {r['row']} | {s['bleu']:.2f} | {s['chrf']:.2f} | {s['bleu'] - statistics.mean(base):+.2f} | "
                f"{_p(s['p_bleu'])} | {_p(s['p_chrf'])} | {params[r['row']]:,} | {float(r['seconds']) / 60:.1f} min | {judged} |"
            )
        method_bleu: Dict[str, List[float]] = {}
        for r in scored_rows:
            method_bleu.setdefault(r["method"], []).append(scores[r["row"]]["bleu"])
        lines += ["", f"p: sacreBLEU paired bootstrap resampling ({n_samples} samples) against the first baseline seed. "
                  "vs baseline: better / worse when the BLEU is outside the baseline seeds' range and p < 0.05. "
                  "training time: wall clock of fairseq-train, with another job on the other core.",
                  "", "The papers' orderings on this test set (mean BLEU over a method's seeds):", "",
                  *ordering_lines(method_bleu), "",
                  f"reference: {ref}", *[f"sacrebleu {k}: {v}" for k, v in sorted(signatures.items())], ""]
    if analysis is not None:
        lines += ["## Teacher analysis (TIE-KD, Zhang et al. 2023)", "",
                  f"teacher on the `{analysis['subset']}` split, {analysis['tokens']} target tokens, k = {analysis['k']}", "",
                  "| quantity | this study | paper |", "|---|---:|---:|"]
        for key, label in (("top1_gold_rate", "teacher top-1 = gold token"), ("top1_mass", "probability mass in the top-1"),
                           ("topk_mass", f"probability mass in the top-{analysis['k']}"), ("gold_mass", "probability of the gold token")):
            lines.append(f"| {label} | {analysis[key]:.4f} | {PAPER_ANALYSIS.get(key, 'not reported in the sources available')} |")
        lines.append("")
    if any(r.get("flags") for r in rows):
        lines += ["## Rows", ""]
        if student_args:
            lines += [f"every student: `{student_args}`", ""]
        lines += ["| row | fairseq-train flags |", "|---|---|"]
        lines += [f"| {r['row']} | `{r['flags']}` |" for r in rows if r.get("flags")]
        lines.append("")
    lines += ["![BLEU per method](study_bleu.png)", "", "![validation loss](study_valid_loss.png)", "",
              "![BLEU against training time](study_bleu_vs_time.png)"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_kd.study.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", required=True, help="rows.tsv written by the study")
    parser.add_argument("--testset", action="append", required=True, metavar="NAME=REF", help="test set and reference")
    parser.add_argument("--analysis", default=None, help="teacher analysis JSON (fairseq-kd-analyze-teacher --json)")
    parser.add_argument("--command", required=True, help="the command that ran the study")
    parser.add_argument("--total-seconds", type=float, required=True)
    parser.add_argument("--bootstrap-samples", type=int, default=1000)
    parser.add_argument("--student-args", default=None, help="the flags every student shares (listed in the report)")
    parser.add_argument("--out", required=True, help="markdown report")
    parser.add_argument("--log", action="append", default=[], metavar="ROW=TRAIN_LOG",
                        help="fairseq-train log of a row, for the validation curves")
    parser.add_argument("--curves", default=None, help="write the validation curves of the --log files here (CSV)")
    parser.add_argument("--plots", default=None, help="folder for study_bleu.png, study_valid_loss.png, study_bleu_vs_time.png")
    args = parser.parse_args(argv)
    with exit_on_error(parser.prog):
        testsets = {}
        for item in args.testset:
            if "=" not in item:
                raise DistillationError(f"--testset {item!r}: expected NAME=REFERENCE_FILE")
            name, ref = item.split("=", 1)
            testsets[name] = ref
        analysis = None
        if args.analysis:
            import json

            with open(args.analysis, encoding="utf-8") as f:
                analysis = json.load(f)
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rows = read_rows(args.rows)
        collected: dict = {}
        text = build_report(rows, testsets, args.command, args.total_seconds, repo, analysis,
                            args.bootstrap_samples, collected, args.student_args)
        write_lines_atomic(args.out, text.split("\n"))
        logs = dict(item.split("=", 1) for item in args.log)
        if args.curves and logs:
            plots.write_curves_csv(logs, args.curves)
        if args.plots:
            first = collected[next(iter(testsets))]
            ok = [r for r in rows if r["status"] == "ok" and r["row"] in first]
            by_method: Dict[str, List[float]] = {}
            for r in ok:
                by_method.setdefault(r["method"], []).append(first[r["row"]]["bleu"])
            plots.plot_bleu(by_method, os.path.join(args.plots, "study_bleu.png"))
            plots.plot_bleu_vs_time({r["row"]: (float(r["seconds"]), first[r["row"]]["bleu"]) for r in ok},
                                    os.path.join(args.plots, "study_bleu_vs_time.png"))
            if args.curves and logs:
                plots.plot_valid_curves(plots.read_curves_csv(args.curves), os.path.join(args.plots, "study_valid_loss.png"))
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
