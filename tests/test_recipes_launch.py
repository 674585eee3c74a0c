"""examples/wmt14/run.sh where its users run it: launchers, GPU counts, dry runs, stage fingerprints.

* ``--dry-run`` of ``--pair en-de --scale full`` on 2 nodes x 8 GPUs under torchrun and under SLURM:
  the training commands (ranks, world size, tokens per update) and the teacher decoding's work queue.
* The CPU path of ``--launcher spawn`` really trains with 2 data-parallel processes (gloo).
* A changed setting redoes exactly the stages downstream of it; ``--redo STAGE`` too.
"""

import os
import re
import shlex
import subprocess

import pytest

from tests import cli
from tests.test_wmt_recipes import WMT_RUN, FakePython, flags, run_recipe, skipped, started

REPO = cli.REPO


def stage_commands(stdout, name):
    """The command lines a --dry-run prints under stage NAME."""
    block = re.search(rf"^== stage \d+/\d+ {name} \(would run\)\n((?:    .*\n)*)", stdout, flags=re.M)
    assert block, stdout[-3000:]
    return [line.strip() for line in block.group(1).splitlines() if not line.strip().startswith("#")]


def argv_of(line):
    """A printed command as argv (the '| tee' / '> file' tail cut off)."""
    words = shlex.split(line)
    for stop in ("2>&1", ">"):
        if stop in words:
            words = words[:words.index(stop)]
    return words


def dry_run(tmp_path, *extra, gpus=0, env=None):
    fake = FakePython(tmp_path / "fake", gpus=gpus)
    fake.env.update(env or {})
    args = ["--pair", "en-de", "--scale", "full", "--students", "baseline seq_kd tie_kd", "--work", tmp_path / "w",
            "--data-root", tmp_path / "corpora", "--dry-run", *extra]
    proc = run_recipe(WMT_RUN, args, fake.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not fake.calls("fairseq_cli.train") and not fake.calls("fairseq_kd.decoding")  # nothing ran
    return proc.stdout


def test_the_ctranslate2_conversion_goes_to_the_work_folder(tmp_path):
    out = dry_run(tmp_path, "--launcher", "torchrun", "--nodes", "1", "--gpus-per-node", "2",
                  "--decode-args", "--backend ctranslate2")
    decode = [c for c in stage_commands(out, "decode_train_with_teacher") if "decoding decode" in c]
    assert len(decode) == 2
    for c in decode:  # converted once, under a lock, into WORK/ct2 (the checkpoint's folder may be read-only)
        f = flags(argv_of(c))
        assert f["--backend"] == "ctranslate2" and f["--ct2-dir"] == str(tmp_path / "w" / "ct2")
    # the fairseq backend gets no --ct2-dir; a --ct2-dir of the user's is kept
    plain = dry_run(tmp_path / "plain", "--launcher", "torchrun", "--nodes", "1", "--gpus-per-node", "2")
    assert "--ct2-dir" not in plain
    own = dry_run(tmp_path / "own", "--launcher", "torchrun", "--nodes", "1", "--gpus-per-node", "2",
                  "--decode-args", "--backend ctranslate2 --ct2-dir /models/ct2")
    assert [flags(argv_of(c))["--ct2-dir"] for c in stage_commands(own, "decode_train_with_teacher")
            if "decoding decode" in c] == ["/models/ct2"] * 2


def test_dry_run_torchrun_two_nodes_of_eight_gpus(tmp_path):
    out = dry_run(tmp_path, "--launcher", "torchrun", "--nodes", "2", "--gpus-per-node", "8",
                  "--master-addr", "node0", "--master-port", "29601")
    # 32768 tokens per update on 16 GPUs: 2048 tokens each, no accumulation
    assert "tokens per update: 16 GPUs x 2048 tokens x update-freq 1 = 32768 (paper: 32768)" in out
    for name in ("teacher", "student_baseline", "student_seq_kd", "student_tie_kd"):
        (line,) = stage_commands(out, name)
        argv = argv_of(line)
        assert argv[0].endswith("python") and argv[1:4] == ["-m", "torch.distributed.run", "--nnodes"]
        f = flags(argv)
        assert f.items() >= {"--nnodes": "2", "--nproc_per_node": "8", "--node_rank": "0", "--master_addr": "node0",
                             "--master_port": "29601", "--distributed-world-size": "16",
                             "--max-tokens": "2048", "--fp16": True}.items()
        assert "--update-freq" not in f and "--cpu" not in f
        assert argv[argv.index("-m", 3) + 1] == "fairseq_cli.train"
    assert flags(argv_of(stage_commands(out, "student_tie_kd")[0]))["--ddp-backend"] == "legacy_ddp"
    # the teacher decoding: a work queue, one worker per GPU of this node, waiting for every chunk (node 0 merges)
    decode = [c for c in stage_commands(out, "decode_train_with_teacher") if "decoding decode" in c]
    assert [c.split()[0] for c in decode] == [f"CUDA_VISIBLE_DEVICES={g}" for g in range(8)]
    assert [flags(argv_of(c))["--worker-id"] for c in decode] == [f"node0.{g}" for g in range(8)]
    assert all(flags(argv_of(c)).items() >= {"--chunk-size": "20000", "--wait": True}.items() for c in decode)
    assert all("--shard-id" not in c and "--max-len-a" not in c and "--teacher-precision" not in c for c in decode)

    # node 1: the same command lines with its rank; its workers decode chunks and leave the merge to node 0
    out1 = dry_run(tmp_path / "n1", "--launcher", "torchrun", "--nodes", "2", "--gpus-per-node", "8",
                   "--master-addr", "node0", "--node-rank", "1")
    assert re.search(r"^== stage \d+/\d+ teacher \(would run with node 0", out1, flags=re.M)
    assert re.search(r"^== stage \d+/\d+ prepare: node 0 runs it$", out1, flags=re.M)
    assert "--node_rank 1" in out1 and "--worker-id node1.7" in out1 and "decoding merge" not in out1
    decode1 = [line.strip() for line in out1.splitlines() if "decoding decode" in line]
    assert len(decode1) == 8 and not any("--wait" in c for c in decode1)


def srun_on_path(tmp_path):
    """PATH with an ``srun`` (never run by a dry run; the recipe checks at start that the launcher's tool is there)."""
    shim = tmp_path / "slurm-bin"
    shim.mkdir(parents=True)
    (shim / "srun").write_text("#!/bin/sh\nexit 99\n")
    (shim / "srun").chmod(0o755)
    return f"{shim}{os.pathsep}{os.environ['PATH']}"


def test_dry_run_slurm_two_nodes_of_eight_gpus(tmp_path):
    out = dry_run(tmp_path, "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "8",
                  "--set", "SRUN_ARGS=--partition gpu --comment 'kd run'",
                  env={"SLURM_JOB_ID": "1234", "PATH": srun_on_path(tmp_path)})
    (line,) = stage_commands(out, "teacher")
    argv = argv_of(line)
    assert argv[:9] == ["srun", "--nodes", "2", "--ntasks-per-node", "8", "--cpus-per-task", "4",
                        "--kill-on-bad-exit=1", "--partition"]
    assert argv[9:14] == ["gpu", "--comment", "kd run", "--gpus-per-node", "8"]
    f = flags(argv)
    assert argv[14].endswith("python") and argv[15:17] == ["-m", "fairseq_cli.train"]
    # the port comes from the job id: two jobs on one node do not collide
    assert f["--distributed-world-size"] == "16" and f["--distributed-port"] == "16234" and f["--max-tokens"] == "2048"
    # the teacher decoding: one srun step inside the allocation (no nested sbatch), one GPU per task
    assert "sbatch" not in out
    (decode,) = [c for c in stage_commands(out, "decode_train_with_teacher") if "decoding decode" in c]
    argv = shlex.split(decode)
    assert argv[:12] == ["srun", "--nodes", "2", "--ntasks", "16", "--cpus-per-task", "4", "--kill-on-bad-exit=1",
                         "--gpus-per-task", "1", "--partition", "gpu"]
    assert flags(argv).items() >= {"--chunk-size": "20000", "--wait": True, "--claim-timeout": "600"}.items()
    assert "--worker-id" not in argv  # each task's worker id is its SLURM_PROCID
    merge = [c for c in stage_commands(out, "decode_train_with_teacher") if "decoding merge" in c]
    assert len(merge) == 1


def test_slurm_srun_args_with_an_unmatched_quote_is_one_line(tmp_path):
    fake = FakePython(tmp_path / "fake", gpus=0)
    proc = run_recipe(WMT_RUN, ["--pair", "en-de", "--scale", "full", "--work", tmp_path / "w", "--launcher", "slurm",
                                "--dry-run", "--set", "SRUN_ARGS=--comment 'kd run"], fake.env)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "run.sh: error: SRUN_ARGS: quote its values as in a shell, got: --comment 'kd run"], proc.stderr


def test_tokens_per_update_with_three_gpus_is_rounded_and_said(tmp_path):
    out = dry_run(tmp_path, "--launcher", "spawn", "--gpus-per-node", "3")
    assert "3 GPUs x 3640 tokens x update-freq 3 = 32760 (paper: 32768, rounded)" in out
    f = flags(argv_of(stage_commands(out, "teacher")[0]))
    assert f["--update-freq"] == "3" and f["--max-tokens"] == "3640" and f["--distributed-world-size"] == "3"


def test_teacher_cache_stage_only_when_asked(tmp_path):
    out = dry_run(tmp_path, "--launcher", "spawn", "--gpus-per-node", "2", "--teacher-cache")
    cache = stage_commands(out, "build_teacher_cache")
    assert [c.split()[0] for c in cache] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
    assert all("fairseq_kd.cache build" in c and "--num-shards 2" in c for c in cache)
    assert "--teacher-cache" in stage_commands(out, "student_tie_kd")[0]
    assert "build_teacher_cache" not in dry_run(tmp_path / "b", "--launcher", "spawn", "--gpus-per-node", "2")


def test_full_scale_without_a_gpu_stops_unless_allowed(tmp_path):
    fake = FakePython(tmp_path / "fake", gpus=0)
    args = ["--pair", "en-ro", "--scale", "full", "--students", "baseline", "--work", tmp_path / "w",
            "--data-root", tmp_path / "c"]
    proc = run_recipe(WMT_RUN, args, fake.env)
    assert proc.returncode == 2 and "--scale full needs a GPU" in proc.stderr and "--allow-cpu" in proc.stderr
    assert not fake.calls("fairseq_kd.wmt")
    proc = run_recipe(WMT_RUN, [*args, "--allow-cpu"], fake.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    teacher = [flags(c["argv"]) for c in fake.calls("fairseq_cli.train")][0]
    # en-ro's own preset: dropout 0.3, 50k updates, early stopping
    assert teacher["--cpu"] is True and teacher["--dropout"] == "0.3" and teacher["--max-update"] == "50000"
    assert teacher["--patience"] == "10" and teacher["--validate-interval-updates"] == "1000"


def test_a_changed_setting_redoes_exactly_the_stages_downstream(tmp_path):
    fake = FakePython(tmp_path / "fake")
    work = tmp_path / "w"
    args = ["--pair", "en-ro", "--scale", "cpu", "--students", "baseline word_kd seq_kd", "--work", work]
    proc = run_recipe(WMT_RUN, args, fake.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    everything = started(proc.stdout)
    assert everything == ["prepare", "teacher", "translate_teacher", "student_baseline", "translate_student_baseline",
                          "student_word_kd", "translate_student_word_kd", "decode_train_with_teacher",
                          "student_seq_kd", "translate_student_seq_kd", "score"]
    assert "== stage times" in proc.stdout and re.search(r"^   teacher +0:00:\d\d$", proc.stdout, flags=re.M)

    # the teacher's update count: the teacher and everything that reads it, not prepare nor the baseline
    proc = run_recipe(WMT_RUN, [*args, "--set", "TEACHER_UPDATES=700"], fake.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert started(proc.stdout) == ["teacher", "translate_teacher", "student_word_kd", "translate_student_word_kd",
                                    "decode_train_with_teacher", "student_seq_kd", "translate_student_seq_kd", "score"]
    assert skipped(proc.stdout) == ["prepare", "student_baseline", "translate_student_baseline"]
    assert re.search(r"teacher: its settings changed since it ran", proc.stdout)
    assert re.search(r"student_word_kd: a stage it depends on was redone \(teacher\)", proc.stdout)
    assert train_updates(fake, "teacher")[-1] == "700"

    # the students' extra flags: the three students and their translations, then the table
    proc = run_recipe(WMT_RUN, [*args, "--set", "TEACHER_UPDATES=700", "--student-args", "--dropout 0.2"], fake.env)
    assert started(proc.stdout) == ["student_baseline", "translate_student_baseline", "student_word_kd",
                                    "translate_student_word_kd", "student_seq_kd", "translate_student_seq_kd", "score"]
    # nothing changed: nothing runs; --redo one stage: it and what reads it
    same = [*args, "--set", "TEACHER_UPDATES=700", "--student-args", "--dropout 0.2"]
    assert started(run_recipe(WMT_RUN, same, fake.env).stdout) == []
    proc = run_recipe(WMT_RUN, [*same, "--redo", "translate_teacher"], fake.env)
    assert started(proc.stdout) == ["translate_teacher", "score"]
    assert "redone on request (--redo translate_teacher)" in proc.stdout


def train_updates(fake, name):
    return [flags(c["argv"])["--max-update"] for c in fake.calls("fairseq_cli.train")
            if flags(c["argv"])["--save-dir"].endswith("/" + name)]


def test_set_rejects_unknown_settings(tmp_path):
    fake = FakePython(tmp_path / "fake")
    proc = run_recipe(WMT_RUN, ["--pair", "en-ro", "--scale", "cpu", "--work", tmp_path / "w", "--set", "NOPE=1"],
                      fake.env)
    assert proc.returncode == 2 and "--set NOPE: unknown setting" in proc.stderr


def test_cpu_spawn_launcher_trains_two_data_parallel_processes(prepared, tmp_path):
    """The launcher's CPU path: two fairseq-train ranks (gloo, tcp:// rendezvous), one model."""
    work = tmp_path / "work"
    script = f"""
set -euo pipefail
RECIPE=test REPO={REPO} WORK={work} PYTHON=python CORPUS=x DATA_ROOT=x SRC=en TGT=de TRAIN_LINES= VALID_LINES=
TEST_LINES= TEST_FROM_VALID= VOCAB=1 WORKERS=1 TEACHER_UPDATES=4 STUDENT_UPDATES=1 STUDENTS=baseline
STUDENT_AVERAGE=0 AVERAGE_UPPER_BOUND= TRAIN_BEAM=1 DECODE_SHARDS=1 DECODE_PARALLEL=1 DECODE_ARGS=
TEST_BEAM=1 LENPEN=1 TEST_BATCH=1 FP16=0
TRAIN_ARGS="{' '.join(cli.TINY_OPTIM[:-1])} --ddp-backend legacy_ddp"
TEACHER_ARGS="{' '.join(cli.TINY_ARCH)}" STUDENT_ARGS=
LAUNCHER=spawn NPROC=2 MASTER_PORT=29617 PIPELINE_CPU=1
source {REPO}/scripts/lib/pipeline.sh
pipeline_setup
BIN={prepared.bin}
train_teacher
"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = [(work / f"teacher.train.log.rank{r}").read_text() for r in (0, 1)]
    for r, log in enumerate(logs):
        assert f"distributed init (rank {r}): tcp://localhost:29617" in log and f"as rank {r}" in log
    # rank 0 logs for both: one model trained on 2 devices, its 4 updates over both ranks' batches
    assert "training on 2 devices" in logs[0] and "'distributed_world_size': 2" in logs[0]
    assert re.search(r"num_updates 4\b", logs[0]) and "done training" in logs[0], logs[0][-2000:]
    assert (work / "teacher" / "checkpoint_last.pt").exists()
    assert "training on 2 devices" in (work / "teacher.train.log").read_text()
