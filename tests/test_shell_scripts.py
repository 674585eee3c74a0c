"""Every shell script of the repository parses (``bash -n``) and passes shellcheck without a finding.

shellcheck runs with ``-x`` (follow ``source``) and ``--source-path=SCRIPTDIR`` so that the
recipes are checked together with the libraries they source.  When shellcheck is not installed
the shellcheck test is skipped (CI installs it).
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


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_finds_nothing():
    proc = subprocess.run(["shellcheck", "-x", "--source-path=SCRIPTDIR", *SCRIPTS], capture_output=True, text=True,
                          cwd=cli.REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
