"""Sequence-level KD through the real tools on a slice of Multi30k.

Teacher (session fixture, fairseq-train) -> scripts/decode_teacher.sh:
decode the train split in 2 shards (two processes, fairseq's SequenceGenerator
on the safely loaded teacher), merge, binarize into the data directory ->
fairseq-train ``--task distillation_translation --teacher-target-subset
--criterion seq_kd`` (no live teacher) -> fairseq-generate -> sacrebleu.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fairseq_kd import decoding, scoring
from tests import cli

pytestmark = pytest.mark.e2e

NAME = "train_teacher"
DECODE_ARGS = "--cpu --max-len-a 1.2 --max-len-b 10 --max-tokens 3000"


@pytest.fixture(scope="module")
def seq_kd_data(prepared, teacher_ckpt, tmp_path_factory):
    """A copy of the data directory with the teacher's translations of train as ``train_teacher``."""
    data = str(tmp_path_factory.mktemp("seq_kd") / "bin")
    shutil.copytree(prepared.bin, data)
    env = dict(
        os.environ, PYTHON=sys.executable, NUM_SHARDS="2", PARALLEL="2", BEAM="5", NBEST="2",
        DECODE_ARGS=DECODE_ARGS, OMP_NUM_THREADS="1",
    )
    script = os.path.join(cli.REPO, "scripts", "decode_teacher.sh")
    proc = subprocess.run(
        ["bash", script, data, teacher_ckpt, NAME], capture_output=True, text=True, env=env,
        cwd=cli.REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return data, os.path.join(data, f"{NAME}.decode"), proc


def test_decode_merge_binarize(prepared, seq_kd_data):
    data, work, proc = seq_kd_data
    n_train = decoding.count_lines(os.path.join(prepared.spm_text, "train.en"))
    # two shards, each complete, progress shown by tqdm
    for shard in range(2):
        assert os.path.isfile(decoding.shard_path(work, shard, 2))
    assert "sent/s" in proc.stderr
    manifest = json.load(open(os.path.join(work, "manifest.json")))
    assert manifest["num_examples"] == n_train and manifest["settings"]["beam"] == 5
    # merged in source order: record i of the shards is the source line i
    sources = open(os.path.join(prepared.spm_text, "train.en"), encoding="utf-8").read().splitlines()
    records = decoding.read_shards(work, manifest)
    for i in (0, 1, n_train // 2, n_train - 1):
        assert records[i]["src"].split() == sources[i].split()
        assert len(records[i]["hyps"]) == 2
    merged = open(os.path.join(work, f"{NAME}.txt"), encoding="utf-8").read().splitlines()
    assert len(merged) == n_train
    assert merged[7] == records[7]["hyps"][0]["text"]
    assert "\u2581" in " ".join(merged)  # BPE'd tokens kept
    for ext in ("bin", "idx"):
        assert os.path.isfile(os.path.join(data, f"{NAME}.en-de.de.{ext}"))

    # Seq-Inter on the same n-best lists: never further from the references than the top-1
    inter = os.path.join(work, "inter.txt")
    report = decoding.merge(work, inter, select="bleu", progress=False)
    chosen = open(inter, encoding="utf-8").read().splitlines()
    top_bleu = sum(decoding.sentence_bleu(records[i]["hyps"][0]["text"], records[i]["ref"]) for i in range(200))
    inter_bleu = sum(decoding.sentence_bleu(chosen[i], records[i]["ref"]) for i in range(200))
    assert inter_bleu >= top_bleu and report.changed_by_selection > 0


def test_seq_kd_student_end_to_end(prepared, seq_kd_data, tmp_path):
    data, _, _ = seq_kd_data
    save_dir = str(tmp_path / "student")
    proc = cli.train(
        data, save_dir, "--user-dir", cli.USER_DIR, "--task", "distillation_translation",
        "--teacher-target-subset", NAME, "--criterion", "seq_kd", "--label-smoothing", "0.1",
        "--seq-kd-gold-weight", "0.5", "--max-update", "12",
    )
    log = proc.stdout + proc.stderr
    assert "teacher targets train_teacher" in log
    assert "teacher: " not in log  # pure Seq-KD: no live teacher is loaded
    train_lines = [line for line in log.splitlines() if "| train_inner |" in line or "| train |" in line]
    assert train_lines and all("gold_nll_loss" in line for line in train_lines)
    valid_lines = [line for line in log.splitlines() if "| valid |" in line]
    assert valid_lines and not any("gold_nll_loss" in line for line in valid_lines)

    gen = cli.generate(data, os.path.join(save_dir, "checkpoint_last.pt"))
    gen_out = tmp_path / "gen.out"
    gen_out.write_text(gen.stdout)
    hyp = str(tmp_path / "student.hyp")
    assert scoring.extract(str(gen_out), hyp, expect_lines=50) == 50
    bleu, chrf, signature, _ = scoring.score(hyp, os.path.join(prepared.raw, "test.de"))
    assert 0.0 <= bleu <= 100.0 and chrf > 0.0 and signature.startswith("nrefs:1")


def test_line_count_mismatch_through_fairseq_train(prepared, seq_kd_data, tmp_path):
    data, work, _ = seq_kd_data
    broken = str(tmp_path / "bin")
    shutil.copytree(data, broken, ignore=shutil.ignore_patterns("*.decode"))
    # the teacher targets of another split (valid) under the name train_teacher
    short = str(tmp_path / "short.txt")
    lines = open(os.path.join(work, f"{NAME}.txt"), encoding="utf-8").read().splitlines()
    with open(short, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:60]) + "\n")
    decoding.binarize(short, broken, NAME, "en", "de", split="valid")
    proc = cli.train(
        broken, str(tmp_path / "s"), "--user-dir", cli.USER_DIR, "--task", "distillation_translation",
        "--teacher-target-subset", NAME, "--criterion", "seq_kd", "--max-update", "2", check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fairseq-kd: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert os.path.join(broken, f"{NAME}.en-de.de.bin") + " has 60 lines" in errors[0]
    assert re.search(re.escape(os.path.join(broken, "train.en-de.de.bin")) + r" has \d+", errors[0])


def test_word_kd_plus_seq_kd_loads_the_teacher(prepared, teacher_ckpt, seq_kd_data, tmp_path):
    data, _, _ = seq_kd_data
    proc = cli.train(
        data, str(tmp_path / "s"), "--user-dir", cli.USER_DIR, "--task", "distillation_translation",
        "--teacher-target-subset", NAME, "--teacher-path", teacher_ckpt, "--criterion", "seq_kd",
        "--kd-alpha", "0.5", "--max-update", "5",
    )
    log = proc.stdout + proc.stderr
    assert "teacher: 1 model(s)" in log
    kd_values = [float(v) for v in re.findall(r"kd_loss[ =](\d+\.\d+)", log)]
    assert kd_values and all(v > 0 for v in kd_values)


def test_decode_a_plain_text_file_with_the_teacher(prepared, teacher_ckpt, tmp_path):
    # an already-BPE'd text file instead of a binarized split; --data gives the dictionaries
    src, ref = tmp_path / "part.en", tmp_path / "part.de"
    for name, path in (("train.en", src), ("train.de", ref)):
        lines = open(os.path.join(prepared.spm_text, name), encoding="utf-8").read().splitlines()[:20]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = str(tmp_path / "dec")
    cli.run("fairseq_kd.decoding", [
        "decode", "--data", prepared.bin, "--input", src, "--reference", ref, "--path", teacher_ckpt,
        "--out-dir", out, "--beam", "3", "--nbest", "3", "--no-progress-bar", *DECODE_ARGS.split(),
    ])
    decoding.merge(out, str(tmp_path / "t.txt"), select="bleu", progress=False)
    assert len((tmp_path / "t.txt").read_text(encoding="utf-8").splitlines()) == 20
    records = decoding.read_shards(out, decoding.read_manifest(out))
    assert all(len(records[i]["hyps"]) == 3 for i in range(20))
