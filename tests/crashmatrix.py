"""The crash matrix: run an operation once to learn which crash points it
passes (PYDR_CRASH_LOG), then once per point with PYDR_CRASH_AT killing it
there (SIGKILL, deterministic: no timing involved), and after each kill check
what the operator is promised:

* the vault opens, passes PRAGMA integrity_check, and `pydr status --json`
  names an operation still recorded as interrupted, with its command;
* running the same command again finishes the work (exit 0);
* the disks hold what the operation promises, and every retained recovery
  point materialises to the sources as they were at its cycle;
* nothing is left behind (half-made disks, journals, keep notes, snapshots,
  temp files, undo steps no record names).

Each scenario is prepared once and copied back (same paths: the vault stores
absolute paths) before every kill.
"""

import collections
import json
import os
import shutil
import sqlite3
import subprocess

from conftest import pydr_command, sha

LEFTOVER_SUFFIXES = (".pydr-new", ".pydr-undo", ".pydr-undo.keep", ".pydr-snap")
STATES = ("protecting", "protected", "resync-required", "failing-over", "failed-over",
          "committing", "failover-committed")

#: (scenario, point, n, "killed" or "power cut", points verified) of every
#: run of this session (for the summary pytest prints: README's table)
RESULTS = []


class Scenario:
    """One operation of the matrix. ``prepare(work)`` builds the state (and
    returns a context dict, with "vault" and "items" when there is a vault);
    ``command(ctx)`` is the CLI command; ``check(ctx)`` asserts what the
    operation promises once it has finished."""

    remote = False  # the kill may land in the server: the client then fails on its own

    def __init__(self, name, prepare, command, check, remote=False, fs=None):
        self.name, self.prepare, self.command, self.check = name, prepare, command, check
        self.remote = remote
        self.fs = fs  # "xfs": the work directory is on XFS with reflink


def run(args, work, extra_env=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYDR_CRASH", "PYDR_STOP"))}
    env.update(extra_env or {})
    return subprocess.run(pydr_command() + [str(a) for a in args], cwd=work, env=env,
                          capture_output=True, timeout=300)


def restore(snapshot, work):
    shutil.rmtree(work)
    shutil.copytree(snapshot, work, symlinks=True)
    rebind_replicas(work)


def rebind_replicas(work):
    """A copied replica has a new inode and change time, which a cycle takes
    for a write outside pydr (pydr.dr.ownership): record the copies'
    identities in the copied vault, as if the state had never been copied."""
    import glob

    from pydr.dr import ownership
    from pydr.engine.identity import file_identity

    from pydr.engine import names

    records = glob.glob(os.path.join(work, "**", "cache", "*", "*.replica"), recursive=True)
    records += glob.glob(os.path.join(work, "**", "cache", "*", "*.baseline"), recursive=True)
    for path in records:
        with open(path, "rb") as f:
            rec = ownership.decode(f.read(), path)
        if rec.identity is None:
            continue
        replica = rec.replica.split(":", 1)[-1]  # "127.0.0.1:PATH" on the test's sshd is here too
        if path.endswith(".baseline"):  # a failover's baseline beside the replica
            replica = names.beside(replica, names.BASE)
        if os.path.exists(replica):  # durable first: a power-cut disk writes it back only then
            fd = os.open(replica, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        now = file_identity(replica)
        if isinstance(now, tuple):
            rec.identity = now
            with open(path, "wb") as f:
                f.write(ownership.encode(rec))
        if path.endswith(".replica"):
            rebind_cache(path[:-len(".replica")] + ".sig", [replica, names.beside(
                replica, names.BASE)])


def rebind_cache(cache, disks):
    """A copied replica has a new inode, which its signature cache (v2: its
    header binds it to the device, inode, size and mtime of the disk the last
    cycle left) takes for another file: bind the copied cache to the copy of
    the disk it described (same size and mtime: copytree keeps mtimes), and
    give every ownership record that named the old cache the new one's
    digest, as if the state had never been copied."""
    import glob

    from pydr.dr import ownership
    from pydr.engine import names
    from pydr.engine import sigcache_layout as L

    if not os.path.exists(cache):
        return
    with open(cache, "rb") as f:
        raw = bytearray(f.read(L.HEADER_BYTES))
    if raw[:8] != L.MAGIC:
        return
    fields = list(L.HEADER.unpack_from(raw))
    dev, ino, size, mtime = fields[-4:]
    if (dev, ino, size, mtime) == L.NO_TARGET:
        return
    # the copy of the disk it described: the one of its size, or of its size
    # and mtime where several are (the power-cut file system does not keep
    # the times copytree sets)
    sized = [os.stat(d) for d in disks if os.path.exists(d) and os.stat(d).st_size == size]
    same = sized if len(sized) == 1 else [st for st in sized if st.st_mtime_ns == mtime]
    if len(same) != 1:
        return  # it describes none of them: left as it is, for the cycle to refuse
    st = same[0]
    old = ownership.cache_digest(cache)
    packed = L.HEADER.pack(*fields[:-4], st.st_dev, st.st_ino, size, st.st_mtime_ns)
    raw[:L.HEADER.size + 8] = packed + L.xxh64(packed)
    with open(cache, "r+b") as f:
        f.write(raw)
    new = ownership.cache_digest(cache)
    vault = os.path.dirname(os.path.dirname(os.path.dirname(cache)))
    records = glob.glob(os.path.join(vault, "cache", "*", "*.replica"))
    records += glob.glob(os.path.join(vault, "cache", "*", "*.baseline"))
    records += [names.beside(d, names.OWNER) for d in disks]
    for path in records:
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            rec = ownership.decode(f.read(), path)
        if rec.cache == old:
            rec.cache = new
            with open(path, "wb") as f:
                f.write(ownership.encode(rec))


def points_passed(scenario, work, ctx, log):
    """{point: times passed} of one whole run, which must succeed."""
    if os.path.exists(log):
        os.unlink(log)
    r = run(scenario.command(ctx), work, {"PYDR_CRASH_LOG": str(log)})
    assert r.returncode == 0, (scenario.name, r.stderr.decode())
    scenario.check(ctx)
    with open(log) as f:
        return collections.Counter(line.strip() for line in f if line.strip())


def check_vault(ctx, work):
    """The vault after a kill: intact, and status says what was interrupted."""
    db = sqlite3.connect(os.path.join(ctx["vault"], "vault.db"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    for item in ctx["items"]:
        r = run(["status", item, "--vault", ctx["vault"], "--json"], work)
        assert r.returncode == 0, r.stderr.decode()
        st = json.loads(r.stdout)
        assert st["state"] in STATES, st
        op = st["operation"]
        if op is not None:  # recorded: it was interrupted, and says how to finish it
            assert op["interrupted"] is True, op
            assert op["command"].startswith("pydr ") and item in op["command"], op


def check_points(ctx, tmp):
    """Every retained point of every item materialises to the sources as
    they were at its cycle (ctx["history"][item][point]); a point the
    operation itself made, to the sources as they are now."""
    from pydr.dr.vault import Vault

    verified = 0
    with Vault(ctx["vault"], writer=True) as v:
        for item in ctx["items"]:
            if v.item(item)["state"] in ("committing", "failover-committed"):
                continue  # its points are (being) discarded
            sources = [d["source"] for d in v.disks(item)]
            for p in v.store.points(item):
                expected = ctx["history"][item].get(p["id"]) or [sha(s) for s in sources]
                out = os.path.join(tmp, f"point-{item}-{p['id']}")
                paths = v.materialize(item, p["id"], out).paths
                assert [sha(x) for x in paths] == expected, (item, p["id"])
                shutil.rmtree(out)
                verified += 1
    return verified


def leftovers(work, ctx):
    """Files pydr made that nothing needs any more."""
    found = []
    for root, _, files in os.walk(work):
        for f in files:
            if f.endswith(LEFTOVER_SUFFIXES):
                found.append(os.path.join(root, f))
    if ctx.get("vault"):
        db = sqlite3.connect(os.path.join(ctx["vault"], "vault.db"))
        try:
            named = {r[0] for r in db.execute("SELECT path FROM steps")}
        finally:
            db.close()
        for root, _, files in os.walk(os.path.join(ctx["vault"], "undo")):
            found += [os.path.join(root, f) for f in files
                      if f.endswith(".undo") and os.path.join(root, f) not in named]
    return found


def run_matrix(scenario, tmp_path, work=None, disk=None):
    """Kill `scenario` at every crash point it passes (the first time, and
    the last time for points passed more than once) and check each time.
    With `disk` (a power-cut file system mounted at `work`'s parent, see
    tests/dr/test_power_cuts.py), every kill is followed by a power cut:
    what was not fsynced is lost before anything is checked. Returns the
    points passed."""
    work = work or tmp_path / "work"
    snapshot = tmp_path / "snapshot"
    work.mkdir()
    ctx = scenario.prepare(work)
    shutil.copytree(work, snapshot, symlinks=True)
    passed = points_passed(scenario, work, ctx, tmp_path / "points.log")
    cases = [(p, 1) for p in passed] + [(p, n) for p, n in passed.items() if n > 1]
    for point, n in cases:
        restore(snapshot, work)
        if disk is not None:
            disk.sync()  # the state to start from is on disk
        killed = run(scenario.command(ctx), work, {"PYDR_CRASH_AT": f"{point}:{n}"})
        where = f"{scenario.name} killed at {point}:{n}" + (" + power cut" if disk else "")
        if disk is not None:
            disk.cut()
        if scenario.remote:
            assert killed.returncode != 0, where
        else:
            assert killed.returncode == -9, (where, killed.returncode, killed.stderr.decode())
        if ctx.get("vault"):
            check_vault(ctx, work)
        again = run(scenario.command(ctx), work)
        assert again.returncode == 0, (where, again.stderr.decode())
        assert b"Traceback" not in again.stderr
        scenario.check(ctx)
        verified = 0
        if ctx.get("vault"):
            verified = check_points(ctx, str(tmp_path))
            for item in ctx["items"]:
                st = json.loads(run(["status", item, "--vault", ctx["vault"], "--json"],
                                    work).stdout)
                assert st["operation"] is None, (where, st["operation"])
        left = leftovers(work, ctx)
        assert not left, (where, left)
        RESULTS.append((scenario.name, point, n, "power cut" if disk else "killed", verified))
    restore(snapshot, work)
    return set(passed)
