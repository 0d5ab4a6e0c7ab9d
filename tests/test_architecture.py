"""The package keeps the shape of its architecture (docs/ARCHITECTURE.md):
the layer contracts of pyproject.toml hold (and would catch an upward import,
also one inside a function), no two modules of pydr import each other in a
circle (function-level imports count), no module grows past ~600 lines, and
the CLI declares each of its option blocks once.

import-linter and grimp (its library) are test dependencies (pip install
'.[test]'): without them these tests fail, they never skip."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "pydr")
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")
MAX_LINES = 600
MAX_LISTED = 50  # circles listed per set of modules that import one another

# Prints pydr's import graph as {importer: {imported: [line, ...]}}: every
# import statement, also one inside a function (grimp reads them all).
GRAPH = """
import json, grimp
graph = grimp.build_graph("pydr", cache_dir=None)
print(json.dumps({importer: {imported: sorted(d["line_number"] for d in
                                              graph.get_import_details(importer=importer,
                                                                       imported=imported))
                             for imported in graph.find_modules_directly_imported_by(importer)}
                  for importer in graph.modules}))
"""


def lint(tree):
    """lint-imports over the pydr package in `tree` (a copy of the repo)."""
    if not os.access(LINT, os.X_OK):
        pytest.fail(f"import-linter is not installed ({LINT} is missing): it is a test "
                    "dependency, pip install '.[test]'")
    return subprocess.run([LINT, "--config", os.path.join(tree, "pyproject.toml")],
                          cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                          capture_output=True, text=True, timeout=120)


def copy_with(tmp_path, module, line):
    """A copy of the repo's package and pyproject.toml with `line` appended
    to `module`."""
    tree = tmp_path / "repo"
    shutil.copytree(PACKAGE, tree / "pydr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tree)
    with open(tree / "pydr" / module, "a") as f:
        f.write("\n\n" + line)
    return str(tree)


def test_the_layer_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and " 0 broken" in r.stdout


@pytest.mark.parametrize("module, line, broken_text", [
    # a lazy import in the engine of something above it
    ("engine/journal.py", "def _later():\n    from ..dr import vault  # noqa\n", "Layers"),
    ("transport/exchange.py", "def _later():\n    from ..endpoints import local  # noqa\n", "Layers"),
    # the store reaching for the workflow
    ("dr/store.py", "def _later():\n    from . import failover  # noqa\n", "store knows no workflow"),
    ("errors.py", "def _later():\n    from .engine import bindings  # noqa\n", "at the bottom"),
    # a lazy import that closes a circle between two modules of the engine
    ("engine/devices.py", "def _later():\n    from . import journal  # noqa\n",
     "No cycles are allowed in pydr.engine."),
])
def test_an_upward_import_breaks_a_contract(tmp_path, module, line, broken_text):
    r = lint(copy_with(tmp_path, module, line))
    assert r.returncode != 0, r.stdout
    broken = r.stdout.split("Broken contracts")[-1]
    assert broken_text in broken, r.stdout


def import_graph(tree):
    """{importer: {imported: [line, ...]}} of the pydr package in `tree`."""
    r = subprocess.run([sys.executable, "-c", GRAPH], cwd=tree,
                       env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True,
                       timeout=120)
    if "No module named 'grimp'" in r.stderr:
        pytest.fail("grimp (import-linter's library) is not installed: it is a test "
                    "dependency, pip install '.[test]'")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def strongly_connected(graph):
    """The sets of two or more modules that import one another in a circle
    (Tarjan's algorithm), each a sorted list, sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    members = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.append(member)
                        if member == node:
                            break
                    if len(members) > 1:
                        found.append(sorted(members))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def circles_in(graph, members):
    """Every circle of imports through `members` (each once, from its
    smallest module), at most MAX_LISTED of them."""
    inside = set(members)
    found = []

    def walk(start, path):
        for nxt in sorted(set(graph[path[-1]]) & inside):
            if nxt == start:
                found.append(path + [start])
            elif nxt > start and nxt not in path and len(found) < MAX_LISTED:
                walk(start, path + [nxt])

    for start in sorted(inside):
        walk(start, [start])
    return found[:MAX_LISTED]


def describe_circles(graph):
    """([members, ...], a report naming every circle and the lines that
    make it) of the import graph `graph`."""
    groups = strongly_connected(graph)
    lines = []
    for members in groups:
        lines.append(f"modules that import one another: {', '.join(members)}")
        for circle in circles_in(graph, members):
            lines.append("  circle: " + " -> ".join(circle))
        for importer in members:
            for imported in sorted(set(graph[importer]) & set(members)):
                at = graph[importer][imported]
                lines.append(f"    {importer} imports {imported} "
                             f"({'lines' if len(at) > 1 else 'line'} {', '.join(map(str, at))})")
    return groups, "\n".join(lines)


def test_no_import_circles():
    """No two modules of pydr import each other, directly or through
    others, at module level or inside a function: arrows point one way."""
    groups, report = describe_circles(import_graph(ROOT))
    assert not groups, "import circles inside pydr (break each: move what both need " \
                       "down, or the import up):\n" + report


@pytest.mark.parametrize("module, line, importer, imported", [
    # the engine: journal imports devices; a lazy import back closes a circle
    ("engine/devices.py", "def _later():\n    from . import journal  # noqa\n",
     "pydr.engine.devices", "pydr.engine.journal"),
    # a package and its module: __init__ imports base (in a function), and back
    ("endpoints/base.py", "def _later():\n    from . import open_endpoint  # noqa\n",
     "pydr.endpoints.base", "pydr.endpoints"),
    # across layers, through other modules: exchange -> signatures -> devices
    ("engine/devices.py", "def _later():\n    from ..transport import exchange  # noqa\n",
     "pydr.engine.devices", "pydr.transport.exchange"),
])
def test_an_import_circle_is_found(tmp_path, module, line, importer, imported):
    added_at = len(open(os.path.join(PACKAGE, module)).read().splitlines()) + 4
    groups, report = describe_circles(import_graph(copy_with(tmp_path, module, line)))
    assert any({importer, imported} <= set(members) for members in groups), report
    circles = [c.split(": ", 1)[1].split(" -> ") for c in report.splitlines()
               if c.startswith("  circle: ")]
    assert any(importer in c and imported in c and c[0] == c[-1] for c in circles), report
    arrow = re.search(rf"^ +{re.escape(importer)} imports {re.escape(imported)} "
                      r"\(lines? ([0-9, ]+)\)$", report, re.M)
    assert arrow and str(added_at) in arrow.group(1).split(", "), report


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


# what every device has (pydr.engine.devices): asking a value for one of them
# is telling a device from a path, which is as_device()'s job
DEVICE_METHODS = {"sign", "apply_write", "apply_prepare", "size_now", "encode", "pread"}


def test_devices_are_told_from_paths_by_as_device():
    asked = []
    for path in python_modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "hasattr" \
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value in DEVICE_METHODS:
                asked.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not asked, f"use pydr.engine.devices.as_device (or isinstance Device): {asked}"


def test_undo_journal_names_are_made_in_names_py():
    """Every undo journal's path comes from pydr.engine.names (journal,
    export_journal, or beside(path, UNDO)): no other module spells the suffix."""
    spelled = []
    for path in python_modules():
        if path == os.path.join(PACKAGE, "engine", "names.py"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.rstrip("\"'").endswith(".pydr-undo"):
                spelled.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not spelled, f"ask pydr.engine.names for these journal paths: {spelled}"
