"""The deployment table (``python -m fairseq_kd.deployment``): the best candidate by BLEU, the fp32
checkpoint without optimizer state, the fairseq fp32 row's translations equal to the fairseq backend's,
the CTranslate2 int8 row's sizes, and the speeds and markdown computed from the measurements.
"""

import json
import os

import pytest

from tests import cli
from tests.test_export import fairseq_greedy

pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install 'fairseq-kd[ct2]')")
spm = pytest.importorskip("sentencepiece")


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return str(path)


def test_best_candidate_is_the_highest_bleu(tmp_path):
    from fairseq_kd.deployment import best_candidate
    from fairseq_kd.errors import DistillationError

    refs = ["ein Mann fährt Fahrrad .", "zwei Hunde spielen im Schnee .", "eine Frau liest ein Buch ."]
    exact = _write(tmp_path / "exact.hyp", refs)
    poor = _write(tmp_path / "poor.hyp", ["ein Mann", "zwei Hunde spielen", "Buch"])
    name, ckpt, bleu = best_candidate([("poor", "p.pt", poor), ("exact", "e.pt", exact), ("again", "a.pt", exact)], refs)
    assert (name, ckpt) == ("exact", "e.pt") and bleu == pytest.approx(100.0)  # the first of equals
    with pytest.raises(DistillationError, match="missing.hyp not found"):
        best_candidate([("m", "m.pt", str(tmp_path / "missing.hyp"))], refs)


def test_speeds_and_markdown_from_the_measurements():
    from fairseq_kd.deployment import finish_rows, markdown

    rows = finish_rows([
        dict(model="teacher", format="fairseq fp32", bleu=20.004, bytes=26_300_000, sentences=1000, tokens=15000,
             seconds=20.0),
        dict(model="student x", format="CTranslate2 int8", bleu=12.345, bytes=1_450_000, sentences=1000,
             tokens=14000, seconds=2.5),
    ])
    assert rows[0]["sentences_per_second"] == 50.0 and rows[0]["tokens_per_second"] == 750.0
    assert rows[1]["sentences_per_second"] == 400.0 and rows[1]["tokens_per_second"] == 5600.0
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == 8.0
    text = markdown(rows, ("student x", "x.pt", 12.3), "settings line")
    assert text.splitlines()[2] == "| teacher | fairseq fp32 | 20.00 | 26.3 MB | 50.0 | 750 | 1.00x |"
    assert text.splitlines()[3] == "| student x | CTranslate2 int8 | 12.35 | 1.4 MB | 400.0 | 5600 | 8.00x |"
    assert "best KD student: student x (test BLEU 12.30" in text and text.endswith("settings line\n")


def test_fp32_checkpoint_drops_the_optimizer_state_and_loads(teacher_ckpt, tmp_path):
    import torch

    from fairseq_kd.checkpoints import load_checkpoint_state, safe_torch_load
    from fairseq_kd.deployment import write_fp32_checkpoint

    out = str(tmp_path / "t.fp32.pt")
    size = write_fp32_checkpoint(teacher_ckpt, out)
    assert size == os.path.getsize(out) < os.path.getsize(teacher_ckpt)
    raw = safe_torch_load(out)
    assert "last_optimizer_state" not in raw and "last_optimizer_state" in safe_torch_load(teacher_ckpt)
    original, stripped = load_checkpoint_state(teacher_ckpt)["model"], load_checkpoint_state(out)["model"]
    assert original.keys() == stripped.keys()
    assert all(torch.equal(original[k].float(), stripped[k]) and stripped[k].dtype == torch.float32
               for k in original)
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_table_of_the_best_candidate(prepared, teacher_ckpt, tmp_path):
    reference, _ = fairseq_greedy(prepared, teacher_ckpt, str(tmp_path / "fairseq"))
    with open(os.path.join(prepared.raw, "test.de"), encoding="utf-8") as f:
        refs = f.read().splitlines()
    good = _write(tmp_path / "good.hyp", reference)
    bad = _write(tmp_path / "bad.hyp", ["x"] * len(refs))
    out = tmp_path / "deploy"
    proc = cli.run("fairseq_kd.deployment", [
        "--data", prepared.bin, "--src-text", os.path.join(prepared.raw, "test.en"),
        "--ref", os.path.join(prepared.raw, "test.de"), "--candidate", f"bad one={teacher_ckpt}={bad}",
        "--candidate", f"good one={teacher_ckpt}={good}", "--beam", "1", "--max-len-a", "0", "--max-len-b", "60",
        "--batch-size", "7", "--out-dir", str(out), "--markdown", str(tmp_path / "t.md"),
        "--json", str(tmp_path / "t.json")])
    rows = json.load(open(tmp_path / "t.json"))
    assert [(r["model"], r["format"]) for r in rows] == [("good one", "fairseq fp32"), ("good one", "CTranslate2 int8")]
    fp32, int8 = rows
    # fairseq fp32 from raw text: exactly the fairseq backend's greedy translations of the binarized split
    with open(out / "good_one.fp32.hyp", encoding="utf-8") as f:
        assert f.read().splitlines() == reference
    import sacrebleu

    assert fp32["bleu"] == pytest.approx(sacrebleu.metrics.BLEU().corpus_score(reference, [refs]).score, abs=1e-9)
    pieces = 0  # the target subword tokens the fairseq backend wrote (EOS not counted)
    for name in os.listdir(tmp_path / "fairseq"):
        if name.endswith(".jsonl"):
            with open(tmp_path / "fairseq" / name, encoding="utf-8") as f:
                pieces += sum(len(json.loads(line)["hyps"][0]["text"].split()) for line in f)
    assert fp32["tokens"] == pieces
    with open(out / "good_one.int8.hyp", encoding="utf-8") as f:
        int8_hyps = f.read().splitlines()
    assert len(int8_hyps) == 50 and int8["bleu"] == pytest.approx(
        sacrebleu.metrics.BLEU().corpus_score(int8_hyps, [refs]).score, abs=1e-9)
    from fairseq_kd.export import folder_bytes

    assert fp32["bytes"] == os.path.getsize(out / "good_one.fp32.pt")
    # the folder counts its vocabulary and spm.model too (most of it for this 32-dim model): the weights
    # alone are smaller than the float32 checkpoint
    assert int8["bytes"] == folder_bytes(str(out / "good_one.int8"))
    assert os.path.getsize(out / "good_one.int8" / "model.bin") < fp32["bytes"]
    for r in rows:
        assert r["sentences"] == 50 and r["sentences_per_second"] == pytest.approx(50 / r["seconds"])
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])
    text = open(tmp_path / "t.md", encoding="utf-8").read()
    assert text == proc.stdout and f"| good one | fairseq fp32 | {fp32['bleu']:.2f} |" in text
    assert "best KD student: good one" in text
