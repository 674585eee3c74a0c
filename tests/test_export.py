"""``fairseq-kd-export``: a checkpoint trained by the project, exported to CTranslate2, translates raw
text exactly as the fairseq backend decodes the binarized test split (greedy, float32); fairseq's old
checkpoint format (``args``, fp16 weights) exports too; an ensemble and an architecture CTranslate2
cannot convert end with one line.
"""

import json
import os

import pytest

from tests import cli

pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install 'fairseq-kd[ct2]')")
spm = pytest.importorskip("sentencepiece")


def export(prepared, ckpt, out_dir, *extra, check=True):
    return cli.run("fairseq_kd.export", ["export", "--path", ckpt, "--data", prepared.bin, "--out-dir", out_dir,
                                         *extra], check=check)


def translate(model_dir, src, out, *extra):
    cli.run("fairseq_kd.export", ["translate", "--model", model_dir, "--input", src, "--output", out,
                                  "--batch-size", "7", *extra])
    with open(out, encoding="utf-8") as f:
        return f.read().splitlines()


def fairseq_greedy(prepared, ckpt, out_dir):
    """The fairseq backend's greedy translations of the binarized test split, desegmented, and its sources."""
    cli.run("fairseq_kd.decoding", [
        "decode", "--data", prepared.bin, "--split", "test", "--path", ckpt, "--out-dir", out_dir,
        "--beam", "1", "--nbest", "1", "--max-len-a", "0", "--max-len-b", "60", "--cpu",
        "--batch-size", "16", "--no-progress-bar",
    ])
    records = {}
    for name in os.listdir(out_dir):
        if name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    records[rec["id"]] = rec
    sp = spm.SentencePieceProcessor(model_file=prepared.spm_model)
    ids = sorted(records)
    assert ids == list(range(50))
    return ([sp.decode_pieces(records[i]["hyps"][0]["text"].split()) for i in ids],
            [records[i]["src"] for i in ids])


def test_round_trip_equals_fairseq_greedy(prepared, teacher_ckpt, tmp_path):
    out = str(tmp_path / "fp32")
    proc = export(prepared, teacher_ckpt, out, "--quantization", "float32")
    record = json.loads(proc.stdout)
    assert record["quantization"] == "float32" and record["segmentation"] == "spm"
    for name in ("model.bin", "config.json", "spm.model", "fairseq_kd_export.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    reference, sources = fairseq_greedy(prepared, teacher_ckpt, str(tmp_path / "fairseq"))
    # the export segments raw text exactly as the binarized split was segmented
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
    with open(os.path.join(prepared.raw, "test.en"), encoding="utf-8") as f:
        raw = f.read().splitlines()
    assert [" ".join(sp.encode(line, out_type=str)) for line in raw] == sources
    hyps = translate(out, os.path.join(prepared.raw, "test.en"), str(tmp_path / "hyp.de"), "--max-len-b", "60")
    assert len(hyps) == 50
    same = sum(h == r for h, r in zip(hyps, reference))
    assert same == 50, f"{same}/50 greedy translations identical: " + next(
        f"{h!r} != {r!r}" for h, r in zip(hyps, reference) if h != r)


def test_int8_exports_are_smaller_and_translate(prepared, teacher_ckpt, tmp_path):
    sizes = {}
    for q in ("float32", "int8", "int8_float16"):
        out = str(tmp_path / q)
        export(prepared, teacher_ckpt, out, "--quantization", q)
        sizes[q] = os.path.getsize(os.path.join(out, "model.bin"))
        hyps = translate(out, os.path.join(prepared.raw, "test.en"), str(tmp_path / f"{q}.de"), "--beam", "2")
        assert len(hyps) == 50 and sum(bool(h.strip()) for h in hyps) >= 45
    # int8 matrices are a quarter of their float32 bytes; biases, norms and the 1026 x 32 position table
    # stay float32, which is 44% of this 32-dimensional model's float32 file
    assert sizes["int8"] < 0.65 * sizes["float32"]
    assert sizes["int8_float16"] < sizes["float32"]
    # an existing folder is not overwritten without --force
    proc = export(prepared, teacher_ckpt, str(tmp_path / "int8"), check=False)
    assert proc.returncode == 1 and "exists; pass --force" in proc.stderr.strip().splitlines()[-1]


def _old_format(teacher_ckpt, path):
    """fairseq's pre-0.10 checkpoint layout: ``args`` (a Namespace), no ``cfg``, fp16 weights."""
    import torch

    from fairseq_kd.checkpoints import install_safe_globals

    install_safe_globals()
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    old = {
        "args": state["cfg"]["model"],
        "model": {k: v.half() for k, v in state["model"].items()},
        "optimizer_history": state["optimizer_history"],
        "extra_state": state["extra_state"],
        "last_optimizer_state": None,
    }
    torch.save(old, path)
    return path


def test_old_format_fp16_checkpoint_exports(prepared, teacher_ckpt, tmp_path):
    old = _old_format(teacher_ckpt, str(tmp_path / "old.pt"))
    out = str(tmp_path / "old-fp32")
    record = json.loads(export(prepared, old, out, "--quantization", "float32").stdout)
    assert record["arch"] == "transformer" and record["parameters"] > 0
    # the fp16 weights, read as float32 by both: the same greedy translations as the fairseq backend
    reference, _ = fairseq_greedy(prepared, old, str(tmp_path / "fairseq"))
    hyps = translate(out, os.path.join(prepared.raw, "test.en"), str(tmp_path / "hyp.de"), "--max-len-b", "60")
    assert hyps == reference


def _error_line(proc):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_ensemble_and_unconvertible_architecture_are_refused(prepared, teacher_ckpt, tmp_path):
    line = _error_line(export(prepared, f"{teacher_ckpt}:{teacher_ckpt}", str(tmp_path / "e"), check=False))
    assert line.startswith("fairseq-kd-export: error: ") and "an ensemble of 2 checkpoints cannot be exported" in line
    assert "fairseq-kd-average-checkpoints" in line

    import torch

    from fairseq_kd.checkpoints import install_safe_globals

    install_safe_globals()
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    state["cfg"]["model"].activation_fn = "tanh"  # fairseq builds and runs it; CTranslate2 has no tanh
    tanh = str(tmp_path / "tanh.pt")
    torch.save(state, tanh)
    line = _error_line(export(prepared, tanh, str(tmp_path / "t"), check=False))
    assert f"CTranslate2 cannot convert {tanh} (arch transformer)" in line and "activation-fn tanh" in line
    assert not os.path.exists(str(tmp_path / "t")) and not [n for n in os.listdir(tmp_path) if ".tmp" in n]
