"""``scripts/benchmark.py --quick --json out.json`` runs and writes the ratios it documents.

No timing is asserted: only the structure of the JSON and that every ratio is
a positive finite number (the BLEU deltas finite).
"""

import json
import math
import os
import sys

import pytest

from tests import cli

pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install 'fairseq-kd[ct2]'); "
                    "the benchmark decodes with it")

CRITERIA = [
    "label_smoothed_cross_entropy", "word_kd", "word_kd_rkl", "word_kd_skl", "word_kd_srkl", "word_kd_jsd", "tie_kd",
    "self_evolution_kd", "hybrid_gated_kd", "selective_kd", "seq_kd", "on_policy_kd",
]


def positive_finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_benchmark_quick_writes_the_ratios(tmp_path):
    out = tmp_path / "out.json"
    import subprocess

    env = dict(os.environ, PYTHONPATH=cli.REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(cli.REPO, "scripts", "benchmark.py"), "--quick", "--json", str(out),
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, env=env, cwd=cli.REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    assert set(result) == {"vocab", "decode", "details"}
    assert set(result["vocab"]) == {"8000", "32000"}
    for nominal, r in result["vocab"].items():
        assert set(r) == {"step_time_ratio", "peak_memory_ratio", "teacher_forward_share"}
        for kind in ("step_time_ratio", "peak_memory_ratio"):
            assert set(CRITERIA) <= set(r[kind]), (nominal, kind, sorted(r[kind]))
            assert r[kind]["label_smoothed_cross_entropy"] == 1.0
            for name, ratio in r[kind].items():
                assert positive_finite(ratio), (nominal, kind, name, ratio)
                assert name in CRITERIA or (name.endswith("_cached") and name[: -len("_cached")] in CRITERIA)
        assert positive_finite(r["teacher_forward_share"])
        # the achieved vocabulary is recorded next to the nominal one
        details = result["details"]["vocab"][nominal]
        assert details["vocab"] >= int(nominal)
    assert set(result["decode"]) == {"ct2_float32", "ct2_int8"}
    for name, d in result["decode"].items():
        assert set(d) == {"speedup", "bleu_delta"}
        assert positive_finite(d["speedup"]) and math.isfinite(d["bleu_delta"])
    # every decoder translated the same sentences; the table and the target lines were printed
    assert result["details"]["decode"]["sentences"] == 100
    assert "| label_smoothed_cross_entropy |" in proc.stdout and "targets:" in proc.stdout
