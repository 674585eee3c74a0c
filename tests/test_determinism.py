"""The main job's stages give the same bytes when run twice with the same seed and thread count.

Each stage of examples/multi30k/run.sh is run twice from the same inputs: the preparation (sentence
selection, SentencePiece, fairseq-preprocess), fairseq-train of a teacher and of the students whose
demo numbers moved between runs (seq_kd on the teacher's translations, hybrid_gated_kd with online
greedy teacher targets and a learned gate), and the teacher's decoding.  Every parameter of every
checkpoint, every binarized file and every translation must be identical.
"""

import filecmp
import os
import shutil

import pytest
import torch

from tests import cli

KD = ["--user-dir", cli.USER_DIR, "--task", "distillation_translation"]


def _values(log_line):
    """The logged values of a train_inner line, without the timings (wps, ups, wall)."""
    fields = (f.split("=", 1) for f in log_line.split(" | ")[-1].split(", ") if "=" in f)
    return {k.strip(): v for k, v in fields if k.strip() not in ("wps", "ups", "wall", "train_wall")}


def _params(checkpoint):
    from fairseq_kd.checkpoints import load_checkpoint_state

    return load_checkpoint_state(checkpoint)["model"]


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    different = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not different, f"parameters differ between two identical runs: {different[:5]}"


def test_preparation_is_byte_identical(tmp_path):
    from fairseq_kd.prepare import prepare

    outs = []
    for run in ("a", "b"):
        out = str(tmp_path / run)
        prepare("multi30k_en_de", cli.SHARED_DATA, "en", "de", out, train_lines=400, valid_lines=30, test_lines=20,
                vocab_size=300)
        outs.append(out)
    files = sorted(os.path.relpath(os.path.join(d, f), outs[0]) for d, _, fs in os.walk(outs[0]) for f in fs)
    compared = [f for f in files if not f.endswith((".model", ".log"))]  # these hold their own paths
    assert any(f.endswith(".bin") for f in compared) and any(f.endswith(".vocab") for f in compared)
    _, mismatch, errors = filecmp.cmpfiles(outs[0], outs[1], compared, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize("criterion", ["seq_kd", "hybrid_gated_kd"])
def test_student_training_is_bit_identical(prepared, teacher_ckpt, tmp_path, criterion):
    data = prepared.bin
    if criterion == "seq_kd":  # targets read from a teacher-target subset (a copy of the gold one stands in)
        data = str(tmp_path / "bin")
        shutil.copytree(prepared.bin, data)
        for f in os.listdir(data):
            if f.startswith("train."):
                shutil.copy(os.path.join(data, f), os.path.join(data, "train_teacher." + f[len("train."):]))
        extra = ["--criterion", "seq_kd", "--teacher-target-subset", "train_teacher"]
    else:
        extra = ["--teacher-path", teacher_ckpt, "--criterion", "hybrid_gated_kd", "--gate", "token", "--gate-input-dim", "32", "--hybrid-token-prefix", "teacher",
                 "--kd-alpha", "0.5"]
    logs = []
    for run in ("a", "b"):
        proc = cli.train(data, str(tmp_path / run), *KD, *extra, "--max-update", "12",
                         "--dropout", "0.1", "--log-interval", "1")
        logs.append([_values(line) for line in proc.stdout.splitlines() if "num_updates=" in line])
    _assert_same_params(str(tmp_path / "a" / "checkpoint_last.pt"), str(tmp_path / "b" / "checkpoint_last.pt"))
    assert logs[0] and logs[0] == logs[1]


def test_teacher_training_and_decoding_are_identical(prepared, teacher_ckpt, tmp_path):
    for run in ("a", "b"):
        cli.train(prepared.bin, str(tmp_path / run), "--criterion", "label_smoothed_cross_entropy",
                  "--label-smoothing", "0.1", "--max-update", "15", "--dropout", "0.3")
    _assert_same_params(str(tmp_path / "a" / "checkpoint_last.pt"), str(tmp_path / "b" / "checkpoint_last.pt"))
    outputs = [cli.generate(prepared.bin, teacher_ckpt, "--beam", "4").stdout for _ in range(2)]
    hyps = [sorted(line for line in out.splitlines() if line.startswith("H-")) for out in outputs]
    assert len(hyps[0]) == 50 and hyps[0] == hyps[1]
