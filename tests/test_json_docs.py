"""docs/JSON.md against the code: the fields it gives for `pydr resync
--json` are exactly the keys the command prints, for two disks on this
machine (pydr.engine.resync.ResyncStats) and across a connection, a push
and a pull (pydr.endpoints.transfer.TransferStats); and what each side's
reads count (this process's only) holds."""

import json
import os
import re

from conftest import LOCAL_RSH, PYDR, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB = 1 << 10


def documented(heading):
    """{field: where it is present} of the table under the docs/JSON.md
    heading that starts with `heading` (columns: field, type, present,
    meaning; a row may name several fields)."""
    with open(os.path.join(ROOT, "docs", "JSON.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    assert start is not None, f"docs/JSON.md has no section {heading!r}"
    fields, in_table = {}, False
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("field", "---") or set(cells[0]) <= {"-"}:
            continue
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            fields[name] = cells[2]
    return fields


def resync_json(*args):
    r = run_cli("resync", *args, "--json", "--rsh", LOCAL_RSH, "--remote-pydr", PYDR)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_resync_json_fields_are_the_documented_ones(tmp_path):
    src, dst = tmp_path / "s.img", tmp_path / "t.img"
    data = os.urandom(256 * KiB)
    src.write_bytes(data)
    dst.write_bytes(data[:8 * KiB] + b"x" * 4 * KiB + data[12 * KiB:])
    fields = documented("### `pydr resync --json`")
    assert set(fields.values()) == {"always", "local", "remote"}, fields
    always = {f for f, present in fields.items() if present == "always"}
    wanted = {"local": always | {f for f, p in fields.items() if p == "local"},
              "remote": always | {f for f, p in fields.items() if p == "remote"}}
    runs = [("local", "push", (src, dst)),
            ("remote", "push", (src, f"localhost:{dst}")),
            ("remote", "pull", (f"localhost:{src}", dst))]
    for kind, direction, pair in runs:
        dst.write_bytes(data[:8 * KiB] + b"y" * 4 * KiB + data[12 * KiB:])
        out = resync_json(*pair)
        assert set(out) == wanted[kind], (kind, direction, sorted(set(out) ^ wanted[kind]))
        assert out["bytes_written"] == 4 * KiB and out["blocks_changed"] == 1
        # bytes_read: what this process read, the other host's reads not counted
        assert out["bytes_read"] == out["source_bytes_read"] + out["target_bytes_read"]
        if kind == "remote":
            assert out["direction"] == direction
            here, there = (("source", "target") if direction == "push"
                           else ("target", "source"))
            assert out[f"{here}_bytes_read"] == 256 * KiB and out[f"{there}_bytes_read"] == 0
        else:
            assert out["source_bytes_read"] == out["target_bytes_read"] == 256 * KiB
