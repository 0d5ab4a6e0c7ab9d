"""The CLI starts lean: a fresh interpreter runs a command's whole path, then
reports the modules it loaded. numpy (~0.1 s), zstandard, the transport and
the DR layer are loaded only by commands that need them."""

import json
import os
import struct
import subprocess
import sys

import pytest

# Runs `pydr ARGS...` in this interpreter, then writes what sys.modules holds.
PROBE = """
import json, os, sys
from pydr.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
with open(os.environ["PYDR_PROBE_OUT"], "w") as f:
    json.dump({"rc": rc, "modules": sorted(sys.modules)}, f)
"""

HEAVY = ("numpy", "zstandard")
LAYERS_ABOVE_ENGINE = ("pydr.transport", "pydr.dr", "pydr.cli.drdemo")


def loaded(tmp_path, *args, stdin=None):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=tmp_path,
                       env={**os.environ, "PYDR_PROBE_OUT": str(out)}, input=stdin,
                       capture_output=True, timeout=60)
    res = json.loads(out.read_text())
    assert res["rc"] == 0, r.stderr
    return set(res["modules"])


def present(modules, *prefixes):
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.fixture
def images(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(os.urandom(1 << 20))
    b.write_bytes(os.urandom(1 << 20))
    return a, b


def test_version_loads_no_layer_and_no_numpy(tmp_path):
    mods = loaded(tmp_path, "--version")
    assert not present(mods, *HEAVY, *LAYERS_ABOVE_ENGINE, "pydr.endpoints")


def test_local_signature_loads_no_numpy_transport_or_vault(tmp_path, images):
    mods = loaded(tmp_path, "signature", images[0], "-o", tmp_path / "a.sig", "-q")
    assert "pydr.engine.signatures" in mods  # the probe sees the command's own imports
    assert not present(mods, *HEAVY, *LAYERS_ABOVE_ENGINE)


def test_local_resync_loads_numpy_but_no_transport_or_vault(tmp_path, images):
    mods = loaded(tmp_path, "resync", images[0], images[1], "-q")
    assert "numpy" in mods  # the comparison needs it
    assert not present(mods, "zstandard", *LAYERS_ABOVE_ENGINE)


def test_serve_answers_a_stat_without_numpy(tmp_path, images):
    def frame(ftype, obj):
        body = json.dumps(obj).encode()
        return struct.pack("<IHH", len(body), ftype, 0) + body

    from pydr.transport import protocol as P

    stdin = frame(P.HELLO, {"protocol": P.VERSION}) + frame(P.STAT, {"path": str(images[0])})
    mods = loaded(tmp_path, "serve", "--stdio", stdin=stdin)
    assert "pydr.transport.server" in mods
    assert not present(mods, *HEAVY, "pydr.dr", "pydr.transport.exchange")
