"""The public API is typed: mypy in strict mode passes on the public modules
(the list below, which pyproject.toml's [tool.mypy] config names too), and a
small client (tests/typing/client.py) type-checks against the installed
package (its py.typed), with each call's type pinned, so the annotations
serve a caller and are not Any.

mypy is a test dependency (pip install '.[test]'): without it these tests
fail, they never skip."""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# The modules whose every line is checked strictly (pyproject.toml names the
# same): the package's front door, its errors, and the public DR modules.
PUBLIC_MODULES = ["pydr/__init__.py", "pydr/errors.py", "pydr/dr/vault.py",
                  "pydr/dr/vault_recovery.py", "pydr/dr/results.py", "pydr/dr/events.py",
                  "pydr/dr/vault_policy.py", "pydr/dr/policy.py"]
CLIENT = os.path.join(ROOT, "tests", "typing", "client.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: it is a test dependency, pip install '.[test]'")
    return str(tmp_path_factory.mktemp("mypy-cache"))


def mypy(*args, cwd, cache):
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", cache, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_the_config_checks_the_public_modules():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)["tool"]["mypy"]
    assert config["files"] == PUBLIC_MODULES
    assert config["strict"] is True


def test_the_public_modules_pass_strict_mypy(cache):
    r = mypy("--strict", *PUBLIC_MODULES, cwd=ROOT, cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"no issues found in {len(PUBLIC_MODULES)} source files" in r.stdout


def test_the_installed_package_says_it_is_typed():
    import pydr

    assert os.path.isfile(os.path.join(os.path.dirname(pydr.__file__), "py.typed"))


def test_a_client_type_checks_against_the_installed_package(cache, tmp_path):
    # run outside the source tree: mypy reads the installed pydr, which it
    # refuses without py.typed ("missing library stubs or py.typed marker")
    r = mypy("--strict", CLIENT, cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no issues found in 1 source file" in r.stdout


def test_the_guides_code_type_checks(cache, tmp_path):
    # docs/api/guide.rst's orchestrator is annotated: every result attribute
    # and keyword it uses must exist on the installed package's types
    from test_api_docs import guide_code

    (tmp_path / "guide.py").write_text(guide_code())
    r = mypy("--strict", "guide.py", cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no issues found in 1 source file" in r.stdout


WRONG_CALLS = [
    ('assert_type(pydr.rollback("a.img"), str)', 'Expression is of type "int", not "str"'),
    ('pydr.signature("a.img", block_size="64k")', 'incompatible type "str"; expected "int"'),
    ('pydr.resync("a", "b", verfy=True)', 'Unexpected keyword argument "verfy"'),
    ('pydr.Vault("/srv/vault", writer=True).no_such_call()', 'has no attribute "no_such_call"'),
    ('pydr.Vault("/srv/vault").status("web").points', 'has no attribute "points"'),
    ('pydr.Vault("/srv/vault").failover("web", to="/dr")', 'Unexpected keyword argument "to"'),
    ('pydr.Vault("/srv/vault").replicate("web").by_item["web"].nope',
     'has no attribute "nope"'),
]


def test_each_wrong_call_fails_the_check(cache, tmp_path):
    # one file, one wrong call a line: each line must get its own complaint
    header = "import pydr\nfrom typing_extensions import assert_type\n"
    wrong = tmp_path / "wrong.py"
    wrong.write_text(header + "".join(line + "\n" for line, _ in WRONG_CALLS))
    r = mypy("--strict", wrong.name, cwd=tmp_path, cache=cache)
    assert r.returncode == 1, r.stdout + r.stderr
    first = header.count("\n") + 1
    for number, (_, complaint) in enumerate(WRONG_CALLS, first):
        said = [line for line in r.stdout.splitlines() if line.startswith(f"{wrong.name}:{number}:")]
        assert any(complaint in line for line in said), (number, complaint, r.stdout)
