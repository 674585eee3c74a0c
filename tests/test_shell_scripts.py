"""Every shell script of the repository parses (``bash -n``) and passes shellcheck without a finding.

shellcheck runs with ``-x`` (follow ``source``) and ``--source-path=SCRIPTDIR`` so that the
recipes are checked together with the libraries they source.  When shellcheck is not installed
the shellcheck test is skipped, unless ``REQUIRE_SHELLCHECK=1`` (CI installs it and sets that).
"""

import glob
import os
import shutil
import subprocess

import pytest

from tests import cli

SCRIPTS = sorted(
    os.path.relpath(p, cli.REPO)
    for pattern in ("scripts/*.sh", "scripts/lib/*.sh", "examples/*/*.sh", "examples/*/presets/*.sh")
    for p in glob.glob(os.path.join(cli.REPO, pattern))
)


def test_the_scripts_are_found():
    assert {"scripts/lib/pipeline.sh", "scripts/lib/stages.sh", "scripts/lib/shards.sh", "scripts/decode_teacher.sh",
            "examples/wmt14/run.sh", "examples/wmt14/presets/en-de.sh", "examples/multi30k/run.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_parses(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, cwd=cli.REPO)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_finds_nothing():
    if shutil.which("shellcheck") is None:
        if os.environ.get("REQUIRE_SHELLCHECK") == "1":
            pytest.fail("shellcheck is not installed and REQUIRE_SHELLCHECK=1: apt-get install -y shellcheck")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", "--source-path=SCRIPTDIR", *SCRIPTS], capture_output=True, text=True,
                          cwd=cli.REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
