"""The package keeps the shape of its architecture (docs/ARCHITECTURE.md):
the layer contracts of pyproject.toml hold (and would catch an upward import,
also one inside a function), no module grows past ~600 lines, and the CLI
declares each of its option blocks once."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "pydr")
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")
MAX_LINES = 600

needs_linter = pytest.mark.skipif(not os.access(LINT, os.X_OK),
                                  reason="import-linter is not installed (pip install .[test])")


def lint(tree):
    """lint-imports over the pydr package in `tree` (a copy of the repo)."""
    return subprocess.run([LINT, "--config", os.path.join(tree, "pyproject.toml")],
                          cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                          capture_output=True, text=True, timeout=120)


@needs_linter
def test_the_layer_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and " 0 broken" in r.stdout


@needs_linter
@pytest.mark.parametrize("module, line, contract", [
    # a lazy import in the engine of something above it
    ("engine/journal.py", "def _later():\n    from ..dr import vault  # noqa\n", "Layers"),
    ("transport/exchange.py", "def _later():\n    from ..endpoints import local  # noqa\n", "Layers"),
    # the store reaching for the workflow
    ("dr/store.py", "def _later():\n    from . import failover  # noqa\n", "store knows no workflow"),
    ("errors.py", "def _later():\n    from .engine import bindings  # noqa\n", "at the bottom"),
])
def test_an_upward_import_breaks_a_contract(tmp_path, module, line, contract):
    tree = tmp_path / "repo"
    shutil.copytree(PACKAGE, tree / "pydr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tree)
    with open(tree / "pydr" / module, "a") as f:
        f.write("\n\n" + line)
    r = lint(str(tree))
    assert r.returncode != 0, r.stdout
    broken = r.stdout.split("Broken contracts")[-1]
    assert contract in broken, r.stdout


def python_modules():
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def test_no_module_is_over_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in python_modules()
            if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"split these modules by concept: {long}"


def test_each_cli_option_block_is_declared_once():
    """No add_argument call of the CLI is written twice with the same
    arguments: a block that several commands share comes from one helper."""
    seen = {}
    for path in python_modules():
        if os.sep + "cli" + os.sep not in path:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                key = ast.dump(ast.Call(func=ast.Name("f"), args=node.args, keywords=node.keywords))
                seen.setdefault(key, []).append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    repeated = [places for places in seen.values() if len(places) > 1]
    assert not repeated, f"declare these once, in pydr/cli/common.py: {repeated}"
