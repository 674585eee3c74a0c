"""The study's validation curves (parsed from fairseq-train logs, written as CSV) and its PNG plots.

* :func:`parse_valid_log`: ``(num_updates, valid loss)`` of every validation in a
  fairseq-train log (the ``valid on 'valid' subset | loss ... | num_updates N`` lines);
* :func:`write_curves_csv` / :func:`read_curves_csv`: ``student,num_updates,valid_loss`` rows;
* :func:`plot_bleu`: BLEU per method, the seed spread (min..max) as error bars;
* :func:`plot_valid_curves`: validation loss per update, one line per student;
* :func:`plot_bleu_vs_time`: BLEU against training wall time.

matplotlib runs with the Agg backend (no display needed); every PNG is written under a
temporary name and renamed.
"""

import csv
import os
import re
from typing import Dict, List, Sequence, Tuple

from fairseq_kd.errors import DistillationError

VALID_LINE = re.compile(r"valid on '(?P<subset>[^']+)' subset \| loss (?P<loss>[-\d.]+) .*?\| num_updates (?P<updates>\d+)")


def parse_valid_log(path: str, subset: str = "valid") -> List[Tuple[int, float]]:
    """Every ``(num_updates, loss)`` validation of ``subset`` in a fairseq-train log, in log order."""
    points = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = VALID_LINE.search(line)
            if m and m.group("subset") == subset:
                points.append((int(m.group("updates")), float(m.group("loss"))))
    return points


def write_curves_csv(logs: Dict[str, str], dest: str) -> int:
    """``student,num_updates,valid_loss`` of each ``{student: train log}``; returns the row count."""
    rows = []
    for name, path in logs.items():
        points = parse_valid_log(path)
        if not points:
            raise DistillationError(f"{path}: no validation lines; train with validation enabled and re-run")
        rows += [(name, u, loss) for u, loss in points]
    tmp = dest + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "num_updates", "valid_loss"])
        writer.writerows(rows)
    os.replace(tmp, dest)
    return len(rows)


def read_curves_csv(path: str) -> Dict[str, List[Tuple[int, float]]]:
    curves: Dict[str, List[Tuple[int, float]]] = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["student"], []).append((int(row["num_updates"]), float(row["valid_loss"])))
    return curves


def _pyplot():
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font search logs at DEBUG under fairseq's root level

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, dest: str) -> None:
    tmp = dest + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, dest)


def plot_bleu(methods: Dict[str, Sequence[float]], dest: str, title: str = "test BLEU") -> None:
    """One bar per method at the mean over its seeds; error bars from the lowest to the highest seed."""
    plt = _pyplot()
    names = list(methods)
    means = [sum(v) / len(v) for v in methods.values()]
    low = [m - min(v) for m, v in zip(means, methods.values())]
    high = [max(v) - m for m, v in zip(means, methods.values())]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    ax.bar(range(len(names)), means, yerr=[low, high], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("BLEU (mean; bars: seed min..max)")
    ax.set_title(title)
    _save(fig, dest)
    plt.close(fig)


def plot_valid_curves(curves: Dict[str, List[Tuple[int, float]]], dest: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([u for u, _ in points], [loss for _, loss in points], marker=".", label=name)
    ax.set_xlabel("updates")
    ax.set_ylabel("validation loss (LS-NLL, bits)")
    ax.legend(fontsize="small", ncol=2)
    _save(fig, dest)
    plt.close(fig)


def plot_bleu_vs_time(points: Dict[str, Tuple[float, float]], dest: str) -> None:
    """``{row: (training seconds, BLEU)}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (seconds, bleu) in points.items():
        ax.scatter([seconds / 60.0], [bleu])
        ax.annotate(name, (seconds / 60.0, bleu), fontsize="small", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training wall time (minutes)")
    ax.set_ylabel("test BLEU")
    _save(fig, dest)
    plt.close(fig)
