"""The study: its plots and validation-curve CSV (on a small fake fairseq-train log), its report,
and examples/multi30k/study.sh end to end at a tiny size (through tests/warm.py's warm interpreter)."""

import json
import os
import subprocess

import pytest

from tests import cli

from fairseq_kd.errors import DistillationError
from fairseq_kd.study import plots

FAKE_LOG = """\
2026-12-01 21:15:36 | INFO | train_inner | epoch 001:     20 / 136 loss=11.835, nll_loss=11.627, ppl=3162.28, wps=288, num_updates=20
2026-12-01 21:15:40 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 10.5 | nll_loss 10.3 | ppl 1260.3 | wps 5012.1 | wpb 1772 | bsz 60 | num_updates 20
2026-12-01 21:15:41 | INFO | valid | epoch 001 | valid on 'valid1' subset | loss 99.0 | nll_loss 99.0 | ppl 1 | wps 1 | wpb 1 | bsz 1 | num_updates 20
2026-12-01 21:16:40 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 9.25 | nll_loss 9.0 | ppl 512 | wps 5000 | wpb 1772 | bsz 60 | num_updates 40 | best_loss 9.25
"""


def test_parse_valid_log_and_csv(tmp_path):
    log = tmp_path / "student_baseline.train.log"
    log.write_text(FAKE_LOG)
    assert plots.parse_valid_log(str(log)) == [(20, 10.5), (40, 9.25)]
    other = tmp_path / "other.log"
    other.write_text(FAKE_LOG.replace("loss 9.25 |", "loss 8.5 |"))
    dest = tmp_path / "curves.csv"
    assert plots.write_curves_csv({"baseline": str(log), "word_kd": str(other)}, str(dest)) == 4
    assert dest.read_text().splitlines()[0] == "student,num_updates,valid_loss"
    assert plots.read_curves_csv(str(dest)) == {"baseline": [(20, 10.5), (40, 9.25)], "word_kd": [(20, 10.5), (40, 8.5)]}
    empty = tmp_path / "empty.log"
    empty.write_text("no validation here\n")
    with pytest.raises(DistillationError, match="empty.log"):
        plots.write_curves_csv({"x": str(empty)}, str(tmp_path / "x.csv"))


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    bleu = tmp_path / "bleu.png"
    plots.plot_bleu({"baseline": [20.1, 21.0, 20.5], "word_kd": [22.0, 22.4, 21.8], "tie_kd": [22.9]}, str(bleu))
    curves = tmp_path / "valid.png"
    plots.plot_valid_curves({"baseline": [(20, 10.5), (40, 9.25)], "word_kd": [(20, 10.1), (40, 8.5)]}, str(curves))
    scatter = tmp_path / "time.png"
    plots.plot_bleu_vs_time({"baseline": (600.0, 20.5), "tie_kd": (3000.0, 22.9)}, str(scatter))
    for path in (bleu, curves, scatter):
        assert _is_png(path) and path.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bleu.png", "time.png", "valid.png"]  # no temp files left


# ---- the report -----------------------------------------------------------------------------------

REFS = [f"ein hund läuft über die wiese nummer {i} ." for i in range(30)]


def test_report_has_every_row_scores_and_bootstrap(tmp_path, teacher_ckpt):
    from fairseq_kd.study import report
    from fairseq_kd.teacher import TeacherEnsemble
    from fairseq_kd.checkpoints import load_checkpoint_state

    ref = tmp_path / "test.ref"
    ref.write_text("\n".join(REFS) + "\n")
    systems = {
        "baseline_s1": [r.replace("hund", "katze").replace("wiese", "straße") for r in REFS],
        "baseline_s2": [r.replace("wiese", "straße") for r in REFS],
        "word_kd_s1": REFS,
    }
    rows = []
    for name, hyps in systems.items():
        (tmp_path / f"{name}.test.hyp").write_text("\n".join(hyps) + "\n")
        method, seed = name.rsplit("_s", 1)
        rows.append("\t".join([name, method, seed, str(tmp_path / name), teacher_ckpt, "120", "ok"]))
    rows.append("\t".join(["word_kd_cached", "word_kd_cached", "1", str(tmp_path / "x"), "-", "0",
                           "skipped: cache not available"]))
    rows_file = tmp_path / "rows.tsv"
    rows_file.write_text("\n".join(rows) + "\n")
    analysis = dict(subset="valid", tokens=100, k=5, top1_gold_rate=0.5, top1_mass=0.4, topk_mass=0.8, gold_mass=0.3)
    text = report.build_report(report.read_rows(str(rows_file)), {"test": str(ref)}, "bash study.sh", 600.0,
                               report.__file__, analysis, n_samples=200)
    table = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert {"baseline_s1", "baseline_s2", "word_kd_s1", "word_kd_cached"} <= set(table)
    assert "skipped: cache not available" in table["word_kd_cached"]
    cells = [c.strip() for c in table["word_kd_s1"].strip("|").split("|")]
    assert float(cells[1]) == 100.0 and float(cells[4]) < 0.05  # perfect output, significant vs the baseline
    assert [c.strip() for c in table["baseline_s1"].strip("|").split("|")][4] == "-"
    model = load_checkpoint_state(teacher_ckpt)["model"]
    assert report.parameter_count(teacher_ckpt) < sum(t.numel() for t in model.values())  # tied embeddings once
    assert f"{report.parameter_count(teacher_ckpt):,}" in table["word_kd_s1"]
    assert "nrefs:1|bs:200" in text and "0.68-0.94" in text and "total time: 10.0 minutes" in text
    assert "study_bleu.png" in text


def test_verdict_needs_the_seed_range_and_significance():
    from fairseq_kd.study.report import verdict

    base = [10.0, 11.0, 12.0]
    assert verdict(12.5, 0.01, base) == "better"
    assert verdict(12.5, 0.20, base) == "no clear difference"  # above every seed, not significant
    assert verdict(11.5, 0.001, base) == "no clear difference"  # significant against seed 1, inside the range
    assert verdict(9.0, 0.01, base) == "worse"
    assert verdict(11.0, None, base) == "reference"


def test_orderings_held_or_not_by_method_means():
    from fairseq_kd.study.report import ordering_lines

    lines = ordering_lines({"baseline": [10.0, 12.0], "word_kd": [12.0, 13.0], "tie_kd": [12.0], "seq_kd": [11.5]})
    assert lines == [
        "- TIE-KD > Word-KD (Zhang et al. 2023): did not hold (tie_kd 12.00, word_kd 12.50)",
        "- Word-KD > no KD (Hinton et al.; Kim & Rush 2016): held (word_kd 12.50, baseline 11.00)",
        "- Seq-KD (beam-5 teacher translations) > no KD (Kim & Rush 2016): held (seq_kd 11.50, baseline 11.00)",
    ]  # the orderings whose methods are not all in the study are left out


# ---- the study's script, end to end at a tiny size ----------------------------------------------------

STUDY_ROWS = ["teacher", "baseline_s1", "baseline_s2", "baseline_s3", "word_kd_s1", "word_kd_s2", "word_kd_s3",
              "word_kd_live", "seq_kd", "word_seq_kd", "tie_kd", "self_evolution_kd", "hybrid_gated_kd",
              "selective_kd", "word_kd_rkl"]


def _sections(text):
    """{section title: {row: cells}} of the report's score tables."""
    sections, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
            sections[title] = {}
        elif line.startswith("| ") and title is not None and not line.startswith("| row"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            sections[title][cells[0]] = cells[1:]
    return sections


def test_study_script_tiny_end_to_end_and_resume(tmp_path):
    """examples/multi30k/study.sh --size tiny: every stage, every output, every row; a re-run redoes nothing."""
    extra = tmp_path / "extra"
    extra.mkdir()
    toy = os.path.join(cli.SHARED_DATA, "opennmt_toy_en_de")
    for lang in ("en", "de"):
        with open(os.path.join(toy, f"valid.{lang}"), encoding="utf-8") as f:
            (extra / f"toy.{lang}").write_text("".join(f.readline() for _ in range(12)), encoding="utf-8")
    work = tmp_path / "work"
    cmd = ["bash", os.path.join(cli.REPO, "examples", "multi30k", "study.sh"), "--size", "tiny", "--work", str(work),
           "--extra-test", f"toy={extra / 'toy.en'},{extra / 'toy.de'}"]
    env = dict(os.environ, PYTHON=cli.python(), PYTHONPATH=cli.REPO, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = work / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        "study.md", "study_bleu.png", "study_bleu_vs_time.png", "study_valid_loss.png", "valid_curves.csv"]
    for png in ("study_bleu.png", "study_bleu_vs_time.png", "study_valid_loss.png"):
        assert _is_png(results / png)
    text = (results / "study.md").read_text()
    sections = _sections(text)
    for name in ("test", "valid", "toy"):
        assert list(sections[name]) == STUDY_ROWS, name
        for row, cells in sections[name].items():
            assert 0.0 <= float(cells[0]) <= 100.0 and 0.0 <= float(cells[1]) <= 100.0  # BLEU, chrF
            assert (cells[3] == "-") == (row == "baseline_s1")  # the bootstrap's reference row has no p-value
            assert int(cells[5].replace(",", "")) > 0  # parameters
    assert list(sections["Rows"]) == STUDY_ROWS
    assert "--teacher-cache WORK/teacher_cache" in sections["Rows"]["word_kd_s2"][0]
    assert "--teacher-path WORK/teacher/checkpoint_best.pt" in sections["Rows"]["word_kd_live"][0]
    curves = plots.read_curves_csv(str(results / "valid_curves.csv"))
    assert sorted(curves) == sorted(STUDY_ROWS[1:]) and all(curves.values())
    for row in STUDY_ROWS[1:]:
        assert sum(1 for _ in open(work / f"student_{row}.toy.hyp", encoding="utf-8")) == 12
    analysis = json.loads((work / "teacher_analysis.json").read_text())
    assert 0.0 <= analysis["top1_gold_rate"] <= 1.0 and analysis["top1_mass"] <= analysis["topk_mass"] <= 1.0

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + "".join(p.read_text() for p in work.glob("lane_*.log"))
    assert "(started" not in out  # every stage was up to date
    assert out.count("up to date, skipped") == 35
    assert _sections((results / "study.md").read_text())["test"] == sections["test"]
