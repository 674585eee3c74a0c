"""Tokens per update of examples/wmt14/run.sh for every launcher, pair and GPU count (from ``--dry-run``).

The paper's 32,768 target tokens per update hold for the training commands (world size x --max-tokens x
--update-freq) and for the iterative rounds (the flags iterate.sh receives), ``single`` is one process on
a node with 8 GPUs, and the table of examples/wmt14/README.md is the one the dry runs print.
"""

import os
import re
import shlex

import pytest

from tests import cli
from tests.test_recipes_launch import argv_of, srun_on_path, stage_commands
from tests.test_wmt_recipes import WMT_RUN, FakePython, flags, run_recipe

PAIRS = ("en-de", "en-fr", "en-ro", "de-en")
# (launcher, nodes, GPUs per node): the node's GPUs; single uses one of them
ROWS = [("single", 1, 1), ("single", 1, 8), ("spawn", 1, 1), ("spawn", 1, 8), ("torchrun", 1, 1),
        ("torchrun", 1, 8), ("torchrun", 2, 8), ("slurm", 1, 1), ("slurm", 1, 8), ("slurm", 2, 8)]


def dry_run(tmp_path, pair, launcher, nodes, gpus):
    fake = FakePython(tmp_path / "fake", gpus=gpus)
    unlabeled = tmp_path / "news.txt"
    unlabeled.write_text("a sentence\n")
    args = ["--pair", pair, "--scale", "full", "--students", "baseline", "--work", tmp_path / "w",
            "--data-root", tmp_path / "c", "--launcher", launcher, "--rounds", "1", "--unlabeled", unlabeled,
            "--dry-run"]
    if launcher != "single":
        args += ["--nodes", nodes, "--gpus-per-node", gpus]
    if launcher == "slurm":  # the recipe checks that srun is there, in a dry run too
        fake.env["PATH"] = srun_on_path(tmp_path)
    proc = run_recipe(WMT_RUN, args, fake.env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def tokens_lines(pair, launcher, nodes, gpus, tmp_path=None):
    import tempfile

    out = dry_run(tmp_path or __import__("pathlib").Path(tempfile.mkdtemp()), pair, launcher, nodes, gpus)
    train = re.search(r"^tokens per update: (.*)$", out, flags=re.M).group(1)
    rounds = re.search(r"^tokens per update of the iterative rounds: (.*)$", out, flags=re.M).group(1)
    return train, rounds


def cell(line):
    """'16 GPUs x 2048 tokens x update-freq 1 = 32768 (paper: 32768)' -> '16 x 2048 x 1 = 32768'."""
    m = re.match(r"(\d+) GPUs x (\d+) tokens x update-freq (\d+) = (\d+) \(paper: 32768\)$", line)
    assert m, line
    return "{} x {} x {} = {}".format(*m.groups())


def world_tokens(f):
    return int(f["--distributed-world-size"]) * int(f["--max-tokens"]) * int(f.get("--update-freq", 1))


def test_single_is_exactly_one_process_on_a_node_with_eight_gpus(tmp_path):
    out = dry_run(tmp_path, "en-de", "single", 1, 8)
    assert "tokens per update: 1 GPUs x 4096 tokens x update-freq 8 = 32768 (paper: 32768)" in out
    for name in ("teacher", "student_baseline"):
        (line,) = stage_commands(out, name)
        f = flags(argv_of(line))
        # fairseq's default world size is the GPU count: without the flag it would spawn 8 ranks (8 x 32k)
        assert f["--distributed-world-size"] == "1" and f["--update-freq"] == "8" and f["--max-tokens"] == "4096"
        assert argv_of(line)[1:3] == ["-m", "fairseq_cli.train"]


@pytest.mark.parametrize("launcher, nodes, gpus", ROWS)
def test_the_commands_train_with_the_papers_tokens_per_update(tmp_path, launcher, nodes, gpus):
    out = dry_run(tmp_path, "en-de", launcher, nodes, gpus)
    world = 1 if launcher == "single" else nodes * gpus
    for name in ("teacher", "student_baseline"):
        (line,) = stage_commands(out, name)
        f = flags(argv_of(line))
        assert int(f["--distributed-world-size"]) == world and world_tokens(f) == 32768
        if launcher == "torchrun":
            assert int(f["--nnodes"]) * int(f["--nproc_per_node"]) == world
        if launcher == "slurm":
            assert int(f["--nodes"]) * int(f["--ntasks-per-node"]) == world
    # the iterative rounds: node 0's GPUs (one for single), their own update-freq
    (env_line,) = [line for line in out.splitlines() if "TRAIN_ARGS=" in line]
    (train_args,) = [w[len("TRAIN_ARGS="):] for w in shlex.split(env_line) if w.startswith("TRAIN_ARGS=")]
    f = flags(train_args.split())
    assert int(f["--distributed-world-size"]) == (1 if launcher == "single" else gpus)
    assert world_tokens(f) == 32768 and train_args.count("--max-tokens") == 1 and train_args.count("--update-freq") == 1


def readme_table():
    with open(os.path.join(cli.REPO, "examples", "wmt14", "README.md"), encoding="utf-8") as f:
        text = f.read()
    header = "| launcher | GPUs | " + " | ".join(PAIRS) + " | iterative rounds |"
    assert header in text
    rows = []
    for line in text[text.index(header):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_the_readme_table_is_what_the_dry_runs_print(tmp_path):
    rows = readme_table()
    assert [(r[0], r[1]) for r in rows] == [(l, f"{n}x{g}" if n > 1 else str(g)) for l, n, g in ROWS]
    for (launcher, nodes, gpus), row in zip(ROWS, rows):
        for pair, expected in zip(PAIRS, row[2:6]):
            train, rounds = tokens_lines(pair, launcher, nodes, gpus, tmp_path / f"{launcher}{nodes}{gpus}{pair}")
            assert cell(train) == expected, (launcher, nodes, gpus, pair)
            assert cell(rounds) == row[6], (launcher, nodes, gpus, pair)
