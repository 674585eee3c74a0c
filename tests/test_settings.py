"""Settings are checked before anything runs: a numeric setting that is not a number is refused in one line
before bash arithmetic could evaluate it (a command substitution in a value is never run), from --set, from
an option and from the environment, in a dry run too."""

import os

import pytest

from tests.test_wmt_recipes import WMT_RUN, FakePython, run_recipe


@pytest.mark.parametrize("how", ["set", "env", "option"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_setting_value_is_never_executed(tmp_path, how, dry_run):
    marker = tmp_path / "executed"
    value = f"PWD[$(touch {marker})]"
    fake = FakePython(tmp_path / "fake")
    env = dict(fake.env)
    args = ["--pair", "en-ro", "--scale", "cpu", "--work", tmp_path / "w"] + (["--dry-run"] if dry_run else [])
    name = {"set": "STUDENT_AVERAGE", "env": "DECODE_SHARDS", "option": "NODE_RANK"}[how]
    if how == "set":
        args += ["--set", f"{name}={value}"]
    elif how == "env":
        env[name] = value
    else:
        args += ["--node-rank", value]
    proc = run_recipe(WMT_RUN, args, env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"run.sh: error: {name} must be a whole number, got '{value}'"]
    assert not marker.exists()
    assert not fake.calls("fairseq_cli.train") and not fake.calls("fairseq_kd.prepare")


def test_a_length_penalty_takes_a_decimal_and_refuses_an_expression(tmp_path):
    fake = FakePython(tmp_path / "fake")
    base = ["--pair", "en-ro", "--scale", "cpu", "--work", tmp_path / "w", "--dry-run"]
    ok = run_recipe(WMT_RUN, base + ["--set", "LENPEN=0.6"], fake.env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = run_recipe(WMT_RUN, base + ["--set", "LENPEN=1+1"], fake.env)
    assert bad.returncode == 2 and bad.stderr.strip() == "run.sh: error: LENPEN must be a number, got '1+1'"


def test_the_multi30k_job_checks_its_environment_too(tmp_path):
    marker = tmp_path / "executed"
    fake = FakePython(tmp_path / "fake")
    env = dict(fake.env, MASTER_PORT=f"x[$(touch {marker})]")
    proc = run_recipe(os.path.join(os.path.dirname(WMT_RUN), "..", "multi30k", "run.sh"),
                      ["--work", tmp_path / "w"], env)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("run.sh: error: MASTER_PORT must be a whole number")
