"""The README's set-up commands and .ci/run agree."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    setup = readme.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in _bash_blocks(setup)]
    assert len(blocks) == 2, "the set-up section shows exactly two commands"
    main_job, tests = blocks
    assert "examples/multi30k/run.sh" in main_job and main_job.startswith("pip install torch==2.13.0 ")
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert tests in ci.splitlines(), ".ci/run must run the README's test command verbatim"
    assert os.access(os.path.join(REPO, ".ci", "run"), os.X_OK)
