"""Word-level KD through the real command-line tools on a slice of Multi30k.

Teacher (fairseq-train, fairseq's own criterion) -> student with ``word_kd``
(``--user-dir user_dir --task distillation_translation``) -> fairseq-generate
``--user-dir user_dir`` (torch.load with weights_only, no environment
variable) -> sacrebleu.  Plus the failure modes a user meets first and
two-process data-parallel training on CPU.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fairseq_kd import scoring
from tests import cli

pytestmark = pytest.mark.e2e

KD = ["--user-dir", cli.USER_DIR, "--task", "distillation_translation"]


def _train_student(prepared, save_dir, teacher, *extra, check=True):
    return cli.train(
        prepared.bin, save_dir, *KD, "--teacher-path", teacher, "--criterion", "word_kd",
        "--kd-alpha", "0.5", "--max-update", "100", *extra, check=check,
    )


@pytest.fixture(scope="module")
def word_kd_student(prepared, teacher_ckpt, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("word_kd_student"))
    proc = _train_student(prepared, save_dir, teacher_ckpt)
    return save_dir, proc


def test_teacher_checkpoint_loads_with_weights_only(teacher_ckpt):
    # a checkpoint written by fairseq-train, read by torch.load in its safe mode
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    assert isinstance(state["cfg"]["model"], argparse.Namespace)
    assert state["optimizer_history"][-1]["num_updates"] == 300


def test_word_kd_end_to_end(prepared, teacher_ckpt, word_kd_student, tmp_path):
    save_dir, proc = word_kd_student
    log = proc.stdout + proc.stderr
    kd_values = [float(v) for v in re.findall(r"kd_loss[ =](\d+\.\d+)", log)]
    agreement = [float(v) for v in re.findall(r"kd_top1_agree[ =](\d+\.\d+)", log)]
    assert kd_values and all(v > 0 for v in kd_values)
    assert agreement and all(0.0 <= a <= 1.0 for a in agreement)
    # validation reports plain LS-NLL: no KD keys in the valid lines
    valid_lines = [line for line in log.splitlines() if "| valid |" in line]
    assert valid_lines and not any("kd_loss" in line for line in valid_lines)

    student = os.path.join(save_dir, "checkpoint_last.pt")
    gen = cli.generate(prepared.bin, student)
    gen_out = tmp_path / "gen.out"
    gen_out.write_text(gen.stdout)
    hyp = str(tmp_path / "student.hyp")
    assert scoring.extract(str(gen_out), hyp, expect_lines=50) == 50
    bleu, chrf, signature, _ = scoring.score(hyp, os.path.join(prepared.raw, "test.de"))
    assert 0.0 <= bleu <= 100.0 and chrf > 0.0
    assert signature.startswith("nrefs:1")


def test_generate_reads_fairseqs_own_checkpoint(prepared, teacher_ckpt):
    # --user-dir user_dir is all fairseq-generate needs to read fairseq's checkpoints
    gen = cli.generate(prepared.bin, teacher_ckpt)
    assert len(re.findall(r"^D-\d+\t", gen.stdout, flags=re.M)) == 50


def test_user_dir_can_be_the_installed_copy(prepared, teacher_ckpt, tmp_path):
    # a real (not editable) install: setup.py installs user_dir/ as the package fairseq_kd_user_dir
    source, site = tmp_path / "source", str(tmp_path / "site")
    source.mkdir()
    for name in ("setup.py", "README.md", "fairseq_kd", "user_dir"):  # what the package is built from
        copy = shutil.copytree if os.path.isdir(os.path.join(cli.REPO, name)) else shutil.copy
        copy(os.path.join(cli.REPO, name), source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", site, str(source)], check=True, capture_output=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=site, OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import fairseq_kd, fairseq_kd_user_dir as u; "
                            "print(fairseq_kd.__file__); print(u.__file__)"],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), check=True).stdout.split()
    assert all(path.startswith(site) for path in where), where
    user_dir = os.path.dirname(where[1])
    gen = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.generate", prepared.bin, "--user-dir", user_dir, "--path", teacher_ckpt,
         "--gen-subset", "test", "--beam", "1", "--cpu", "--max-len-b", "5", *cli.GENERATE_BATCHING],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert len(re.findall(r"^H-\d+\t", gen.stdout, flags=re.M)) == 50


def test_student_checkpoint_does_not_hold_the_teacher(prepared, teacher_ckpt, word_kd_student, tmp_path):
    kd_dir, _ = word_kd_student
    plain_dir = str(tmp_path / "plain")
    cli.train(
        prepared.bin, plain_dir, *KD, "--criterion", "label_smoothed_cross_entropy",
        "--label-smoothing", "0.1", "--max-update", "100",
    )
    kd_size = os.path.getsize(os.path.join(kd_dir, "checkpoint_last.pt"))
    plain_size = os.path.getsize(os.path.join(plain_dir, "checkpoint_last.pt"))
    assert abs(kd_size - plain_size) / plain_size < 0.01
    state = torch.load(os.path.join(kd_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert state["criterion"] is None
    teacher_state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)["model"]
    # same architecture as the student here: the teacher's weights are not in the file
    for name, value in state["model"].items():
        if value.dtype.is_floating_point and value.numel() > 100:
            assert not torch.equal(value, teacher_state[name]), name


def _assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("fairseq-kd: error:")]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in error_lines[0]
    return error_lines[0]


def test_missing_teacher_file(prepared, tmp_path):
    missing = str(tmp_path / "no_such_teacher.pt")
    proc = _train_student(prepared, str(tmp_path / "s"), missing, check=False)
    _assert_one_line_error(proc, missing)


def test_dictionary_mismatch(prepared, teacher_ckpt, tmp_path):
    # the student's data directory has a target dictionary with two symbols swapped
    data = str(tmp_path / "bin")
    shutil.copytree(prepared.bin, data)
    dict_file = os.path.join(data, "dict.de.txt")
    lines = open(dict_file, encoding="utf-8").read().splitlines(keepends=True)
    lines[10], lines[11] = lines[11], lines[10]
    with open(dict_file, "w", encoding="utf-8") as f:
        f.writelines(lines)
    # (with --joined-dictionary dict.en.txt is the same file content: swap there too,
    # so the source check passes and the target check is the one that fails)
    shutil.copy(dict_file, os.path.join(data, "dict.en.txt"))
    proc = cli.train(
        data, str(tmp_path / "s"), *KD, "--teacher-path", teacher_ckpt, "--criterion", "word_kd",
        "--max-update", "2", check=False,
    )
    teacher_dict = os.path.join(prepared.bin, "dict.en.txt")
    line = _assert_one_line_error(proc, teacher_dict, os.path.join(data, "dict.en.txt"))
    # index in the Dictionary = 4 special symbols + line number
    assert "index 14" in line


def test_two_process_data_parallel_on_cpu(prepared, teacher_ckpt, tmp_path):
    save_dir = str(tmp_path / "ddp")
    port = cli.free_port()
    procs = []
    for rank in range(2):
        cmd = [
            sys.executable, "-m", "fairseq_cli.train", prepared.bin, "--save-dir", save_dir,
            *cli.TINY_ARCH, *cli.TINY_OPTIM, *KD, "--teacher-path", teacher_ckpt,
            "--criterion", "word_kd", "--max-update", "6",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--distributed-world-size", "2", "--distributed-rank", str(rank),
            "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cli.REPO,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "distributed init (rank 1)" in outputs[1] or "rank 1" in outputs[1]
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 6
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 2
