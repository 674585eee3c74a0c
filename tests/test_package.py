"""The package layer: importing does nothing, one registration call, the import graph (docs/architecture.md)."""

import ast
import os
import subprocess
import sys

from tests import cli

PACKAGE = os.path.join(cli.REPO, "fairseq_kd")


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the repository first on the path); its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cli.REPO,
                          env=dict(os.environ, PYTHONPATH=cli.REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_importing_the_package_or_the_losses_imports_no_fairseq():
    for module in ("fairseq_kd", "fairseq_kd.losses"):
        out = _fresh(f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'fairseq'))")
        assert out.strip() == "[]", (module, out)


PATCHED = """
import sys
from fairseq import checkpoint_utils, trainer
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.tasks import TASK_REGISTRY

def seen():
    return (checkpoint_utils.load_checkpoint_to_cpu, checkpoint_utils.torch, trainer.Trainer.load_checkpoint,
            trainer.Trainer.state_dict, "distillation_translation" in TASK_REGISTRY, "word_kd" in CRITERION_REGISTRY)

before = seen()
import fairseq_kd, fairseq_kd.cache.cli, fairseq_kd.decoding.cli, fairseq_kd.checkpoints
print("import", seen() == before, before[4:])
fairseq_kd.register()
first = seen()
fairseq_kd.register()
print("register", first[4:], first == seen(), [a is not b for a, b in zip(first[:4], before[:4])],
      checkpoint_utils.load_checkpoint_to_cpu.__wrapped__ is before[0],
      trainer.Trainer.load_checkpoint.__wrapped__ is before[2])
"""


def test_import_patches_nothing_and_register_is_idempotent():
    lines = dict(line.split(" ", 1) for line in _fresh(PATCHED).splitlines() if " " in line)
    # importing the package and its command-line modules changes no fairseq attribute and registers nothing
    assert lines["import"] == "True (False, False)"
    # register() registers the tasks and criterions and wraps each of the four attributes exactly once
    assert lines["register"] == "(True, True) True [True, True, True, True] True True"


# ---- the import graph ----------------------------------------------------------------------------------------

# Layers, lowest first: a module imports its own layer or lower ones.  A module not named here is a component
# (checkpoints, teacher, data, modules, cache, decoding, corpora, scoring, study, wmt, ...).
LAYERS = [
    ("fairseq_kd.errors", "fairseq_kd.hashing", "fairseq_kd.textio", "fairseq_kd.download", "fairseq_kd.cliargs"),
    ("fairseq_kd.losses",),
    (),  # components
    ("fairseq_kd.criterions",),
    ("fairseq_kd.tasks",),
    ("fairseq_kd.plugin",),
]
#: imports allowed to run upward (at most two)
UPWARD = set()


def _layer(module: str) -> int:
    if module == "fairseq_kd":  # the root defines register(), which calls the plugin
        return len(LAYERS) - 1
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return 2


def import_graph(root: str = PACKAGE):
    """``{module: {imported fairseq_kd modules}}`` from the source files (every import, also inside functions);
    ``from PKG import NAME`` counts as an import of ``PKG.NAME`` when that is a module."""
    base = os.path.dirname(root)
    modules = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                modules[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    target = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([target] if target else []))
                for a in node.names:
                    edges.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
        graph[module] = {e for e in edges if e in modules and e != module}
    return graph


def cycles(graph):
    """Every import circle of ``graph`` (each as a list of modules, the first repeated at the end)."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_circle_and_at_most_two_upward_imports():
    graph = import_graph()
    assert "fairseq_kd.checkpoints" in graph and "fairseq_kd.hashing" in graph["fairseq_kd.checkpoints"]
    assert cycles(graph) == []
    upward = {(m, n) for m, targets in graph.items() for n in targets if _layer(n) > _layer(m)}
    assert upward <= UPWARD and len(UPWARD) <= 2, sorted(upward - UPWARD)


def test_the_losses_import_torch_only():
    graph = import_graph()
    for module in (m for m in graph if m.startswith("fairseq_kd.losses")):
        assert all(n.startswith("fairseq_kd.losses") for n in graph[module]), (module, graph[module])
        tree = ast.parse(open(os.path.join(cli.REPO, *module.split(".")) + ("/__init__.py" if module == "fairseq_kd.losses" else ".py")).read())
        roots = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert "fairseq" not in roots, module


def test_a_cache_with_the_older_dictionary_record_is_refused_with_one_line(tmp_path):
    from fairseq_kd.cache.manifest import check_manifest
    from fairseq_kd.errors import DistillationError
    from fairseq_kd.hashing import dictionary_hashes

    for lang, text in (("en", "a 1\n"), ("de", "b 1\n")):
        (tmp_path / f"dict.{lang}.txt").write_text(text)
    hashes = dictionary_hashes(str(tmp_path), ("en", "de"))
    assert sorted(hashes) == ["dict.de.txt", "dict.en.txt"] and len(set(hashes.values())) == 2
    old = {"dictionaries": {"src": hashes["dict.en.txt"], "tgt": hashes["dict.de.txt"]}}
    try:
        check_manifest(str(tmp_path), old, {"dictionaries": hashes})
    except DistillationError as e:
        message = str(e)
    else:
        raise AssertionError("an older cache was accepted")
    assert "\n" not in message and "manifest.json" in message and "rebuild the cache" in message, message
    check_manifest(str(tmp_path), {"dictionaries": dict(hashes)}, {"dictionaries": hashes})  # today's form passes
