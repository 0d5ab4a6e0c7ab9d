"""The API reference (docs/api/) builds from the docstrings with warnings as
errors and every reference resolved (sphinx -W -n), and covers the public
API: every name in pydr.__all__ and every public method of pydr.Vault is in
the built inventory and has a docstring. Every exception class of pydr.errors
is exported from pydr, mechanically (a class added there is exported too).

Sphinx is a test dependency (pip install '.[test]'): without it these tests
fail, they never skip."""

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys

import pytest

import pydr
from conftest import ROOT
from pydr import errors

DOCS = os.path.join(ROOT, "docs", "api")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if importlib.util.find_spec("sphinx") is None:
        pytest.fail("sphinx is not installed: it is a test dependency, pip install '.[test]'")
    out = tmp_path_factory.mktemp("api")
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q",
                        "-b", "html", "-d", str(out / "doctrees"), DOCS, str(out / "html")],
                       cwd=out, capture_output=True, text=True, timeout=300)
    return r, out / "html"


@pytest.fixture(scope="module")
def inventory(built):
    from sphinx.util.inventory import InventoryFile

    r, html = built
    assert r.returncode == 0, r.stdout + r.stderr
    with open(html / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", os.path.join)
    data = getattr(inv, "data", inv)  # a dict {role: {name: ...}} (sphinx < 8.2: the object)
    return {name for objects in data.values() for name in objects}


def vault_attributes():
    """Every public method and property of pydr.Vault, its own or inherited
    (the recovery half lives in pydr.dr.vault_recovery), but not object's."""
    found = {}
    for klass in reversed(pydr.Vault.__mro__[:-1]):
        found.update((name, value) for name, value in vars(klass).items()
                     if not name.startswith("_")
                     and (callable(value) or isinstance(value, property)))
    return found


def vault_methods():
    return sorted(vault_attributes())


def test_the_reference_builds_without_a_warning(built):
    r, html = built
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    for page in ("index", "guide", "engine", "vault", "errors"):
        assert (html / f"{page}.html").is_file()


def test_every_public_name_is_in_the_reference(inventory):
    missing = [name for name in pydr.__all__ if f"pydr.{name}" not in inventory]
    assert not missing, f"not in docs/api: {missing}"


def test_every_public_method_of_vault_is_in_the_reference(inventory):
    methods = vault_methods()
    assert {"replicate", "status", "failover", "test_failover"} <= set(methods)
    missing = [m for m in methods if f"pydr.Vault.{m}" not in inventory]
    assert not missing, f"not in docs/api: {missing}"


def documented(value):
    doc = value.__doc__ if not isinstance(value, property) else value.fget.__doc__
    return bool(doc and doc.strip())


def test_every_public_name_has_a_docstring():
    # constants (ints, strings) are documented in the .rst; the rest by themselves
    names = [n for n in pydr.__all__ if not isinstance(getattr(pydr, n), (int, str))]
    assert not [n for n in names if not documented(getattr(pydr, n))]
    assert not [m for m in vault_methods() if not documented(vault_attributes()[m])]
    assert documented(pydr.Vault)


def exception_classes(module):
    return sorted(name for name, value in vars(module).items()
                  if isinstance(value, type) and issubclass(value, BaseException))


def test_every_exception_class_is_exported_from_pydr():
    names = exception_classes(errors)
    assert {"PydrError", "VaultError", "UnknownName", "InvalidState", "HookFailed",
            "PlanFailed", "Cancelled"} <= set(names)
    for name in names:
        assert getattr(pydr, name) is getattr(errors, name), name
        assert name in pydr.__all__ and name in dir(pydr), name
    assert {"Vault", "init_vault", "resync", "signature"} <= set(dir(pydr))


def test_an_exception_class_added_later_is_exported_too(tmp_path):
    # a copy of the installed package with one more class in pydr/errors.py
    shutil.copytree(os.path.dirname(pydr.__file__), tmp_path / "pydr",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "pydr" / "errors.py", "a") as f:
        f.write('\n\nclass BrandNew(PydrError, ValueError):\n    """Added later."""\n')
    probe = ("import pydr; print(pydr.__file__, pydr.BrandNew.__module__, "
             "'BrandNew' in pydr.__all__, 'BrandNew' in dir(pydr))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "pydr" / "__init__.py"), "pydr.errors", "True",
                                "True"]


def test_import_pydr_loads_no_vault_layer_until_vault_is_used(tmp_path):
    probe = ("import sys, pydr; before = 'pydr.dr' in sys.modules or 'numpy' in sys.modules; "
             "pydr.Vault; print(before, 'pydr.dr.vault' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def guide_code():
    with open(os.path.join(DOCS, "guide.rst")) as f:
        text = f.read()
    block = text.split(".. code-block:: python\n", 1)[1].split("\nWhat each part relies on", 1)[0]
    return "\n".join(line[4:] for line in block.splitlines())


def test_the_guide_is_50_lines_of_public_names_only():
    import ast

    code = guide_code()
    assert len([line for line in code.splitlines() if line.strip()]) <= 50
    used = {(node.value.id, node.attr) for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    assert {attr for owner, attr in used if owner == "pydr"} <= set(pydr.__all__)
    vault_calls = {attr for owner, attr in used if owner == "vault"}
    assert vault_calls and vault_calls <= set(vault_methods())
