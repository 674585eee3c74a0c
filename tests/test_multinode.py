"""examples/wmt14/run.sh on several nodes: torchrun on CPUs for real, and the cross-node model.

* Two real runs of run.sh share one work folder as torchrun nodes 0 and 1 (127.0.0.1, one CPU process
  each, gloo through scripts/distributed_rank.py); node 1 is killed while it holds a chunk of the teacher
  decoding (a work queue of several chunks per process) and started again: both exit 0, node 0 prints
  the results table, the merged teacher file has one line per source line, every example decoded once.
* With a fake ``python`` (tests/test_wmt_recipes.py), two nodes at --scale full: node 1 runs no stage of
  its own (no corpus download, no iterative rounds), joins every training node 0 runs (also one node 0
  redoes after a settings change), decodes chunks of a queue with more chunks than processes, and exits
  0; a failure of node 0 reaches node 1 as one line.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from scripts import distributed_rank
from tests import cli
from tests.test_wmt_recipes import WMT_RUN, FakePython, flags, read, started

REPO = cli.REPO


def launch(args, env, log):
    with open(log, "w") as out:
        return subprocess.Popen(["bash", WMT_RUN, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)


def finish(proc, log, timeout=600):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    with open(log, encoding="utf-8") as f:
        return rc, f.read()


def test_rank_flags_from_torchrun_and_srun_environments(monkeypatch):
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29600",
                "TORCHELASTIC_USE_AGENT_STORE": "True"}
    argv = distributed_rank.train_argv(["data", "--cpu"], torchrun)
    f = flags(argv)
    assert f.items() >= {"--distributed-rank": "3", "--distributed-world-size": "4", "--device-id": "1",
                         "--distributed-init-method": "tcp://node0:29600", "--distributed-backend": "gloo",
                         "--distributed-no-spawn": True, "--ddp-backend": "legacy_ddp"}.items()
    own_store = dict(torchrun, TORCHELASTIC_USE_AGENT_STORE="False")
    assert flags(distributed_rank.train_argv([], own_store))["--distributed-init-method"] == "tcp://node0:29601"
    assert flags(distributed_rank.train_argv(["--ddp-backend", "c10d"], torchrun))["--ddp-backend"] == "c10d"
    monkeypatch.setattr(distributed_rank, "first_host", lambda nodelist: {"gpu[07-08]": "gpu07"}[nodelist])
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_STEP_NODELIST": "gpu[07-08]",
            "FAIRSEQ_KD_MASTER_PORT": "16234"}
    f = flags(distributed_rank.train_argv([], srun))
    assert f.items() >= {"--distributed-rank": "5", "--distributed-world-size": "16", "--device-id": "5",
                         "--distributed-init-method": "tcp://gpu07:16234"}.items()
    with pytest.raises(SystemExit):
        distributed_rank.train_argv([], {})


def chunk_held_by(out_dir, prefix):
    """A chunk whose lock names a worker of ``prefix`` (a live claim), or None."""
    if not os.path.isdir(out_dir):
        return None
    for name in os.listdir(out_dir):
        if name.endswith(".jsonl.lock"):
            try:
                with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                continue
            if str(holder.get("worker", "")).startswith(prefix):
                return name[:-len(".lock")]
    return None


@pytest.mark.e2e
def test_torchrun_two_cpu_nodes_for_real_node1_killed_mid_decode_and_restarted(tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TRAIN_LINES="300", VALID_LINES="40",
               TEST_LINES="50", VOCAB="300", TEACHER_UPDATES="8", STUDENT_UPDATES="8", TEST_BEAM="2")
    port = cli.free_port()
    args = ["--pair", "en-ro", "--scale", "cpu", "--students", "seq_kd", "--work", work, "--launcher", "torchrun",
            "--nodes", "2", "--master-addr", "127.0.0.1", "--master-port", port, "--set", "DECODE_CHUNK=20",
            "--set", "NODE_POLL=1", "--set", "NODE_HEARTBEAT=2", "--set", "NODE_TIMEOUT=300"]
    node0 = launch([*args, "--node-rank", "0"], env, tmp_path / "node0.log")
    node1 = launch([*args, "--node-rank", "1"], env, tmp_path / "node1.log")
    decode_dir = str(work / "seq_kd_decode")
    held, deadline = None, time.time() + 400
    while held is None and time.time() < deadline and node1.poll() is None:
        held = chunk_held_by(decode_dir, "node1.")
        time.sleep(0.2)
    assert held, open(tmp_path / "node1.log").read()[-3000:]
    os.killpg(node1.pid, signal.SIGKILL)  # node 1 and its decode workers, mid-chunk
    node1.wait()
    restarted = launch([*args, "--node-rank", "1"], env, tmp_path / "node1b.log")
    rc0, out0 = finish(node0, tmp_path / "node0.log")
    rc1, out1 = finish(restarted, tmp_path / "node1b.log")
    assert rc0 == 0, out0[-4000:]
    assert rc1 == 0, out1[-4000:]
    assert "| teacher |" in out0 and "| student seq_kd |" in out0  # node 0's results table
    assert started(out0) == ["prepare", "teacher", "translate_teacher", "decode_train_with_teacher",
                             "student_seq_kd", "translate_student_seq_kd", "score"]
    # the restarted node 1 rejoined: it trained the student with node 0 and ran no stage of its own
    assert "student_seq_kd (started" in out1 and "node 1: node 0 is done" in out1
    assert not any(s in out1 for s in ("stage 1/7 prepare", "translate_teacher (started", "score (started"))
    # every source line decoded exactly once, the chunk of the killed node too; one merged line per source line
    shards = sorted(f for f in os.listdir(decode_dir) if f.endswith(".jsonl"))
    assert len(shards) == 15 and held in shards
    ids = [json.loads(line)["id"] for s in shards for line in read(os.path.join(decode_dir, s))]
    assert sorted(ids) == list(range(300))
    assert len(read(work / "seq_kd_decode" / "train_teacher.txt")) == 300
    assert not [f for f in os.listdir(decode_dir) if ".tmp" in f or f.endswith(".lock")]
    # both nodes' ranks trained each model together (rank 0 on node 0 logs a world of 2)
    assert "distributed init (rank 1)" in out1 and "training on 2 devices" in out0


# ---- the cross-node model with a fake python ------------------------------------------------------------

def fake_nodes(tmp_path, *extra, node0_iterate=None, timeout=120):
    """run.sh at --scale full as torchrun nodes 0 and 1 (2 GPUs each) with fake pythons; (rc, out, fake) per node."""
    unlabeled = tmp_path / "news.en"
    unlabeled.write_text("a source sentence\n")
    args = ["--pair", "en-de", "--scale", "full", "--students", "baseline seq_kd", "--work", tmp_path / "w",
            "--data-root", tmp_path / "corpora", "--rounds", "1", "--unlabeled", unlabeled, "--launcher", "torchrun",
            "--nodes", "2", "--gpus-per-node", "2", "--master-addr", "node0", *extra]
    fakes = [FakePython(tmp_path / f"fake{r}", gpus=2) for r in (0, 1)]
    for fake in fakes:
        fake.env.update(NODE_POLL="0.2", NODE_HEARTBEAT="1", NODE_TIMEOUT="60", FAKE_RDZV_DIR=str(tmp_path / "rdzv"))
    if node0_iterate:
        fakes[0].env["ITERATE_SH"] = node0_iterate
    n = len(os.listdir(tmp_path))
    logs = [tmp_path / f"node{r}.{n}.log" for r in (0, 1)]
    procs = [launch([*args, "--node-rank", r], fakes[r].env, logs[r]) for r in (0, 1)]
    return [(*finish(p, log, timeout), f) for p, log, f in zip(procs, logs, fakes)]


def torchrun_calls(fake):
    return [c["argv"] for c in fake.calls("torch.distributed.run")]


def test_two_nodes_node1_only_joins_the_distributed_stages_and_exits_0(tmp_path):
    (rc0, out0, fake0), (rc1, out1, fake1) = fake_nodes(tmp_path)
    assert rc0 == 0, out0[-3000:]
    assert rc1 == 0, out1[-3000:]  # defect 1: node 1 does not look for the merged file only node 0 writes
    # defect 2: the "always" stages (download, iterative rounds) ran on node 0 only
    assert fake0.calls("fairseq_kd.wmt", "prepare") and not fake1.calls("fairseq_kd.wmt")
    assert not fake1.calls("fairseq_kd.prepare") and len(fake0.iterate_calls()) == 1 and not fake1.iterate_calls()
    assert fake0.calls("fairseq_kd.decoding", "merge") and not fake1.calls("fairseq_kd.decoding", "merge")
    assert fake1.calls("fairseq_kd.decoding", "decode") and "node 1: node 0 is done" in out1


def test_two_nodes_decode_every_chunk_and_rejoin_a_redone_stage(tmp_path):
    (rc0, out0, fake0), (rc1, out1, fake1) = fake_nodes(tmp_path, "--set", "DECODE_CHUNK=3")
    assert rc0 == 0, out0[-3000:]
    assert rc1 == 0, out1[-3000:]
    # defect 2: the "always" stages (download, iterative rounds) ran on node 0 only
    assert fake0.calls("fairseq_kd.wmt", "prepare") and not fake1.calls("fairseq_kd.wmt")
    assert not fake1.calls("fairseq_kd.prepare") and len(fake0.iterate_calls()) == 1 and not fake1.iterate_calls()
    # both nodes ran every training, each with its own rank
    saves = lambda fake: [flags(a)["--save-dir"].rsplit("/", 1)[-1] for a in torchrun_calls(fake)]  # noqa: E731
    assert saves(fake0) == saves(fake1) == ["teacher", "student_baseline", "student_seq_kd"]
    assert {flags(a)["--node_rank"] for a in torchrun_calls(fake1)} == {"1"}
    # defects 1 and 3: 14 chunks of 3 of the 40 sentences for 4 workers, every one decoded once, node 0 merged
    chunks = [c["argv"] for f in (fake0, fake1) for c in f.calls() if c["argv"][0] == "chunk"]
    assert sorted(int(c[1]) for c in chunks) == list(range(14))
    assert {c[2].split(".")[0] for c in chunks} <= {"node0", "node1"}
    assert fake0.calls("fairseq_kd.decoding", "merge") and not fake1.calls("fairseq_kd.decoding", "merge")
    assert len(read(tmp_path / "w" / "seq_kd_decode" / "train_teacher.txt")) == 40
    assert "node 1: node 0 is done" in out1

    # defect 3: node 0 redoes the teacher after a settings change; node 1 joins it again (no hang)
    (rc0, out0, fake0), (rc1, out1, fake1) = fake_nodes(tmp_path, "--set", "DECODE_CHUNK=3",
                                                        "--set", "TEACHER_UPDATES=1000")
    assert rc0 == 0 and rc1 == 0, out0[-2000:] + out1[-2000:]
    assert "teacher" in started(out0) and "student_baseline" not in started(out0)
    again = [torchrun_calls(f)[3:] for f in (fake0, fake1)]  # after the first run's 3 trainings
    assert [flags(a)["--save-dir"].rsplit("/", 1)[-1] for a in again[1]] == ["teacher", "student_seq_kd"]
    assert [flags(a)["--max-update"] for a in again[1]][0] == "1000" and len(again[0]) == 2


def test_a_failure_of_node_0_reaches_node_1_as_one_line(tmp_path):
    failing = tmp_path / "iterate.sh"  # node 0 fails in its last stage, the iterative rounds
    failing.write_text("#!/usr/bin/env bash\necho 'iterate.sh: error: no unlabeled text' >&2\nexit 7\n")
    (rc0, out0, _), (rc1, out1, _) = fake_nodes(tmp_path, node0_iterate=str(failing))
    assert rc0 == 7, out0[-2000:]
    assert rc1 == 1, out1[-2000:]
    errors = [line for line in out1.splitlines() if "error" in line]
    assert errors == ["run.sh: error: node 0 failed: stage iterate (exit 7); node 1 stops (see node 0's output)"]


# ---- SLURM, with srun/sbatch/scontrol shims on PATH that start local processes --------------------------

FAKE_SRUN = r'''
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps(["srun", *args]) + "\n")
valued = {"--nodes", "--ntasks", "--ntasks-per-node", "--cpus-per-task", "--gpus-per-node", "--gpus-per-task",
          "--partition", "--comment", "--time", "--mem"}
opts, i = {}, 0
while args[i].startswith("-"):
    if args[i] in valued:
        opts[args[i]] = args[i + 1]
        i += 2
    else:
        opts[args[i]] = True
        i += 1
command = args[i:]
nodes = int(opts.get("--nodes", 1))
ntasks = int(opts["--ntasks"]) if "--ntasks" in opts else nodes * int(opts.get("--ntasks-per-node", 1))
per_node = -(-ntasks // nodes)
procs = []
for rank in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank % per_node),
               SLURM_NODEID=str(rank // per_node), SLURM_NNODES=str(nodes), SLURM_STEP_NODELIST="fakenode[0-1]",
               SLURM_NTASKS_PER_NODE=str(per_node))
    procs.append(subprocess.Popen(command, env=env))
codes = [p.wait() for p in procs]
sys.exit(max(codes))
'''
FAKE_SCONTROL = r'''
import sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("127.0.0.1")
'''
FAKE_SBATCH = r'''
import sys
sys.stderr.write("sbatch: a nested job from inside the allocation\n")
sys.exit(1)
'''


@pytest.mark.e2e
def test_slurm_launcher_end_to_end_with_fake_srun(tmp_path):
    from tests.test_wmt_recipes import write_tool

    bin_dir = str(tmp_path / "bin")
    for name, source in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        write_tool(bin_dir, name, source)
    log = tmp_path / "slurm.log"
    work = tmp_path / "work"
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], FAKE_SLURM_LOG=str(log),
               SLURM_JOB_ID=str(40000 + cli.free_port() % 10000), PYTHONPATH=REPO, OMP_NUM_THREADS="1",
               TRAIN_LINES="300", VALID_LINES="40", TEST_LINES="50", VOCAB="300", TEACHER_UPDATES="8",
               STUDENT_UPDATES="8", TEST_BEAM="2")
    args = ["--pair", "en-ro", "--scale", "cpu", "--students", "seq_kd", "--work", work, "--launcher", "slurm",
            "--nodes", "2", "--gpus-per-node", "1", "--set", "DECODE_CHUNK=60",
            "--set", "SRUN_ARGS=--comment 'kd run'"]
    proc = launch(args, env, tmp_path / "run.log")
    rc, out = finish(proc, tmp_path / "run.log")
    assert rc == 0, out[-4000:]
    assert "| teacher |" in out and "| student seq_kd |" in out
    steps = [json.loads(line) for line in read(log)]
    trainings = [s for s in steps if "scripts/distributed_rank.py" in " ".join(s)]
    assert len(trainings) == 2  # teacher and student, each one step of 2 tasks over 2 nodes
    for s in trainings:
        f = flags(s)
        assert f.items() >= {"--nodes": "2", "--ntasks-per-node": "1", "--kill-on-bad-exit=1": True,
                             "--comment": "kd run"}.items()
    (decode,) = [s for s in steps if "fairseq_kd.decoding" in s]
    assert flags(decode).items() >= {"--ntasks": "2", "--kill-on-bad-exit=1": True, "--chunk-size": "60",
                                     "--wait": True}.items()
    # the port of the job, both ranks in one world; 5 chunks decoded by the 2 tasks
    port = 15000 + int(env["SLURM_JOB_ID"]) % 50000
    assert f"distributed init (rank 1): tcp://127.0.0.1:{port}" in out and "training on 2 devices" in out
    decode_dir = work / "seq_kd_decode"
    assert sorted(f for f in os.listdir(decode_dir) if f.endswith(".jsonl")) == [
        f"shard{i:03d}-of-005.jsonl" for i in range(5)]
    assert len(read(decode_dir / "train_teacher.txt")) == 300
