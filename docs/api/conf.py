"""Sphinx configuration of pydr's API reference, built from the docstrings
of the installed package:

    pip install '.[test]'
    python -m sphinx -W --keep-going -n docs/api build/api

tests/test_api_docs.py builds it the same way (warnings are errors, every
reference must resolve) and checks that every public name is in it."""

import ast
import importlib.util
import os
import sys

# the installed pydr (its compiled core), never the source tree beside us
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

from docutils import nodes  # noqa: E402
from docutils.parsers.rst import Directive  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402

import pydr  # noqa: E402
from pydr import errors  # noqa: E402

project = "pydr"
release = version = pydr.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Pages about modules that other parts of issue 21 add: built once the module
# exists (until then they are left out, never half-built).
PENDING = {"results.rst": "pydr.dr.results", "events.rst": "pydr.dr.events"}
MISSING = [page for page, module in PENDING.items() if importlib.util.find_spec(module) is None]
exclude_patterns += MISSING

# Names from outside pydr: no intersphinx (the build never downloads), so the
# standard library's and numpy's names are left as text.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(os\.PathLike|threading\.Event|typing\.\w+|collections\.abc\.\w+)(\[.*\])?"),
    ("py:class", r"datetime\.(datetime|timedelta|timezone)"),
    ("py:class", r"(numpy|np|npt)\..*"),
    ("py:class", r"(str|int|float|bool|bytes|bytearray|object|None|list|dict|tuple|type)"),
    ("py:class", r"(Exception|BaseException|ValueError|RuntimeError|LookupError|"
                 r"ConnectionError|BrokenPipeError|OSError)"),
    ("py:class", r"(Any|_S|Device|pydr\.engine\.devices\.Device)"),
    # pydr's internals (not in this reference) named in a public docstring;
    # the public DR modules are not among them: a reference to them must resolve
    (r"py:.*", r"pydr\.(engine|transport|endpoints|cli)\..*"),
    (r"py:.*", r"pydr\.dr\.(?!results\b|events\b|vault\b)\w+\..*"),
    ("py:exc", r"(ValueError|OSError|FileNotFoundError|PermissionError|LookupError)"),
]


class ExitCodes(Directive):
    """``.. pydr-exit-codes::``: the table of exit codes, read from
    pydr.errors (the classes and their ``exit_code``), so it cannot drift."""

    def run(self):
        by_code = {}
        for name in pydr.__all__:
            value = getattr(pydr, name)
            if isinstance(value, type) and issubclass(value, errors.PydrError):
                by_code.setdefault(value.exit_code, []).append(name)
        names = {code: name for name, code in vars(errors).items() if name.startswith("EXIT_")}
        lines = [".. list-table::", "   :header-rows: 1", "",
                 "   * - exit code", "     - constant (pydr.errors)", "     - raised as"]
        for code in sorted(names):
            classes = ", ".join(f":class:`~pydr.{c}`" for c in sorted(by_code.get(code, ())))
            lines += [f"   * - {code}", f"     - ``{names[code]}``", f"     - {classes or '-'}"]
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source="pydr.errors"), self.content_offset, node)
        return node.children


class Exceptions(Directive):
    """``.. pydr-exceptions::``: every exception class pydr exports (all of
    pydr.errors, mechanically), documented as ``pydr.NAME`` (a reference to
    ``pydr.errors.NAME`` finds it too: autodoc records the canonical name)."""

    def run(self):
        lines = []
        for name in pydr.__all__:
            value = getattr(pydr, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                lines += [f".. autoexception:: pydr.{name}", "   :members:", ""]
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source="pydr.errors"), self.content_offset, node)
        return node.children


def types_for_checkers(app, obj, bound_method):
    """pydr's annotations are strings (``from __future__ import annotations``)
    naming types a module imports only ``if TYPE_CHECKING:`` (typing costs
    start-up time): run that block in the module, once, before autodoc reads
    one of its signatures, so the reference shows the types themselves."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None or getattr(module, "__file__", None) is None \
            or module.__dict__.get("_DOCS_TYPES_LOADED"):
        return
    module._DOCS_TYPES_LOADED = True
    with open(module.__file__) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            block = ast.Module(body=node.body, type_ignores=[])
            exec(compile(block, module.__file__, "exec"), module.__dict__)


def leave_out_missing(app, docname, source):
    """The index's table of contents without the pages left out above."""
    if docname == "index":
        for page in MISSING:
            source[0] = source[0].replace(f"\n   {page[:-len('.rst')]}\n", "\n")


def setup(app):
    app.connect("source-read", leave_out_missing)
    app.connect("autodoc-before-process-signature", types_for_checkers)
    app.add_directive("pydr-exit-codes", ExitCodes)
    app.add_directive("pydr-exceptions", Exceptions)
