"""Every command-line tool is a console script of setup.py, and each answers ``--help``."""

import ast
import os
import subprocess
import sys

import pytest

from tests import cli


def _console_scripts():
    """``name -> (module, function)`` from setup.py's ``entry_points`` (read as text, not executed)."""
    tree = ast.parse(open(os.path.join(cli.REPO, "setup.py"), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            out = {}
            for spec in scripts:
                name, target = (part.strip() for part in spec.split("="))
                module, function = target.split(":")
                out[name] = (module, function)
            return out
    raise AssertionError("setup.py declares no entry_points")


SCRIPTS = _console_scripts()


def _modules_with_a_main():
    """The modules under fairseq_kd/ that run as ``python -m`` (a ``__main__`` block or a ``__main__.py``)."""
    found = set()
    root = os.path.join(cli.REPO, "fairseq_kd")
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, cli.REPO)[:-3].replace(os.sep, ".")
            if name == "__main__.py":
                found.add(module.rsplit(".", 1)[0])
            elif 'if __name__ == "__main__":' in open(path, encoding="utf-8").read():
                found.add(module)
    return found


def test_names_follow_fairseq_style():
    assert SCRIPTS
    for name in SCRIPTS:
        assert name.startswith("fairseq-kd-") and name == name.lower() and "_" not in name, name


def test_every_python_m_tool_has_a_console_script():
    targets = {module for module, _ in SCRIPTS.values()}
    # a package's __main__ delegates to a module of the package: either name counts
    missing = [m for m in _modules_with_a_main() if m not in targets and not any(t.startswith(m + ".") for t in targets)]
    assert not missing, f"command-line modules without a console script in setup.py: {missing}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help(name):
    module, function = SCRIPTS[name]
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function} as main; main(['--help'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cli.REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and len(proc.stdout.splitlines()) > 3, proc.stdout
