"""The main job, examples/multi30k/run.sh, end to end at --size tiny in real processes: every stage, the
results table with every row, the deployment table, and a re-run that redoes nothing."""

import os
import re
import subprocess

import pytest

from tests import cli

pytestmark = pytest.mark.e2e

ROWS = ["teacher", "student baseline_s1", "student baseline_s2", "student word_kd", "student seq_kd",
        "student tie_kd", "student self_evolution_kd", "student hybrid_gated_kd"]


def _rows(text):
    """The markdown table rows of ``text`` as lists of cells (header and rule left out)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set("-: ") and cells[0] not in ("system", "model"):
            rows.append(cells)
    return rows


def _table(text):
    return {cells[0]: cells[1:] for cells in _rows(text)}


def test_main_job_tiny_end_to_end_and_resume(tmp_path):
    work = tmp_path / "work"
    cmd = ["bash", os.path.join(cli.REPO, "examples", "multi30k", "run.sh"), "--size", "tiny", "--work", str(work)]
    env = dict(os.environ, PYTHON=cli.python(), PYTHONPATH=cli.REPO, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the stages of the lanes are logged to WORK/lane_*.log and repeated on stdout when the lanes end
    started = re.findall(r"^== stage \d+/(\d+) (\S+) \(started", first.stdout, re.M)
    assert {total for total, _ in started} == {"21"} and len({name for _, name in started}) == 21
    results = _table((work / "results.md").read_text())
    assert list(results) == ROWS
    for cells in results.values():
        assert 0.0 <= float(cells[0]) <= 100.0
    for row in ROWS:
        hyp = work / (f"{row.replace('student ', 'student_')}.test.hyp" if row != "teacher" else "teacher.test.hyp")
        assert sum(1 for _ in open(hyp, encoding="utf-8")) == 30  # --size tiny's test slice
    deployment = (work / "deployment.md").read_text()
    rows = _rows(deployment)
    # the teacher and the best KD student (not a baseline), each as fairseq fp32 and CTranslate2 int8
    assert [(r[0], r[1]) for r in rows][:2] == [("teacher", "fairseq fp32"), ("teacher", "CTranslate2 int8")]
    assert len(rows) == 4 and rows[2][0] == rows[3][0] and rows[2][0] in ROWS[3:]
    assert [r[1] for r in rows[2:]] == ["fairseq fp32", "CTranslate2 int8"]
    best = max(ROWS[3:], key=lambda row: float(results[row][0]))
    assert f"best KD student: {rows[2][0]}" in deployment and float(results[rows[2][0]][0]) == float(results[best][0])
    assert sorted(p.name for p in work.glob("deployment/*.int8") if (p / "model.bin").is_file()) == [
        f"{rows[2][0].replace('student ', 'student_')}.int8", "teacher.int8"]
    assert first.stdout.rstrip().endswith(f"results: {work}/results.md and {work}/deployment.md")

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    skipped = set(re.findall(r"^== stage \d+/21 (\S+): up to date, skipped", second.stdout, re.M))
    assert "(started" not in second.stdout and len(skipped) == 21
    assert _table((work / "results.md").read_text()) == results


def test_main_job_refuses_an_unknown_size(tmp_path):
    cmd = ["bash", os.path.join(cli.REPO, "examples", "multi30k", "run.sh"), "--size", "huge", "--work", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "run.sh: error: --size must be demo, full or tiny, got huge"
