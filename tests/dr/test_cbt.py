"""Changed-block tracking with real QEMU tools: a qcow2 image with
persistent dirty bitmaps written by qemu-io, and a raw disk held by
qemu-storage-daemon (an NBD export for its writer, a QMP socket, bitmaps
that live only in the daemon). Cycles read only what changed; every point
equals the disk at its cut, also when the disk is written during a cycle;
lost tracking (a killed QEMU, a missing bitmap) makes the item
resync-required, changes over half the disk make the cycle compare the whole
disk, and nothing tracked is ever lost."""

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess

import pytest

from pydr.dr.vault import Vault, init_vault

from conftest import pydr_command, sha
from qemuhelp import (cli, end_by_pidfd, qcow2_and_vault, qemu_io, raw_sha, replicate,
                      start_storage_daemon)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "qemu-io", "qemu-storage-daemon")),
    reason="needs qemu-utils and qemu-system-common (scripts/bootstrap installs them)")
MiB = 1 << 20


def check_points(vault, history, tmp_path, raw=True):
    with Vault(vault, writer=True) as v:
        for p in v.store.points("vm"):
            out = tmp_path / f"p{p['id']}"
            (path,) = v.materialize("vm", p["id"], out).paths
            assert sha(path) == history[p["id"]], p["id"]
            shutil.rmtree(out)


def status(vault):
    return json.loads(cli(vault, "status", "vm", "--json").stdout)


@pytest.fixture
def qcow2_item(tmp_path):
    img, replica, vault = qcow2_and_vault(tmp_path, "128M", "write -P 0x11 0 16M",
                                          "write -P 0x22 64M 4M")
    r = cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt")
    assert r.returncode == 0, r.stderr
    return img, replica, vault


def test_qcow2_cycles_read_only_what_changed(qcow2_item, tmp_path):
    img, replica, vault = qcow2_item
    history = {}
    first = replicate(vault)
    history[first["point_id"]] = raw_sha(img, tmp_path)
    assert sha(replica) == history[first["point_id"]]
    for cycle, (off, n) in enumerate([(3 * MiB, 4096), (100 * MiB, 2 * MiB), (127 * MiB, 8192)]):
        qemu_io(img, f"write -P 0x{0x30 + cycle:x} {off} {n}")
        res = replicate(vault)
        history[res["point_id"]] = raw_sha(img, tmp_path)
        assert sha(replica) == history[res["point_id"]]  # = qemu-img convert -O raw
        assert res["bytes_written"] == n
        assert res["bytes_read"] <= 2 * (n + 128 * 1024)  # the bitmap's extents, both sides
    check_points(vault, history, tmp_path)
    st = status(vault)
    assert st["disks"][0]["tracking"] == {"mode": "qcow2", "bitmap": "pydr-4",
                                          "granularity": 4096}
    bitmaps = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True).stdout
    assert bitmaps.count("name: pydr-") == 1  # the frozen ones went once their point was in


def test_a_killed_cycle_loses_no_tracked_change(qcow2_item, tmp_path):
    """Killed after the cut (its bitmap frozen) and while writing: the next
    cycle merges the frozen bitmap back and sends every change."""
    img, replica, vault = qcow2_item
    replicate(vault)
    for point in ("cycle.cut", "apply.written", "cycle.point"):
        qemu_io(img, f"write -P 0x5{len(point) % 10} {random.Random(point).randrange(120) * MiB} 64k")
        r = subprocess.run(pydr_command() + ["replicate", "vm", "--vault", str(vault)],
                           env={**os.environ, "PYDR_CRASH_AT": point}, capture_output=True)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr)
        replicate(vault)
        assert sha(replica) == raw_sha(img, tmp_path), point


def test_kill_9_of_the_qemu_side_means_resync_then_tracking_again(qcow2_item, tmp_path):
    """A qemu-nbd holding the image read-write is SIGKILLed: its bitmap stays
    marked in use, so tracking cannot be trusted."""
    img, replica, vault = qcow2_item
    replicate(vault)
    sock, pid_file = tmp_path / "vm.sock", tmp_path / "vm.pid"
    # --fork: the parent exits once the server listens (or it failed), so
    # there is nothing to wait for by time
    r = subprocess.run(["qemu-nbd", "--fork", "--pid-file", str(pid_file), "-f", "qcow2",
                        "-k", str(sock), "-t", str(img)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and pid_file.exists(), f"qemu-nbd did not start: {r.stderr}"
    vm = os.pidfd_open(int(pid_file.read_text()))  # the server, not our child
    try:
        qemu_io(f"nbd+unix:///?socket={sock}", "write -P 0x66 10M 1M", fmt="raw")
        signal.pidfd_send_signal(vm, signal.SIGKILL)
        select.select([vm], [], [])  # a pidfd is readable once its process is gone
    finally:
        os.close(vm)
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 15 and b"--resync" in r.stderr, r.stderr
    st = status(vault)
    assert st["state"] == "resync-required" and "in use" in st["last_error"]
    assert sha(replica) != raw_sha(img, tmp_path)  # nothing was sent on a lost bitmap
    full = replicate(vault, "--resync")
    # both sides compared in full: every allocated block of each (20 MiB), not the extents
    assert sha(replica) == raw_sha(img, tmp_path) and full["bytes_read"] >= 2 * 20 * MiB
    qemu_io(img, "write -P 0x67 50M 4k")
    again = replicate(vault)  # tracking again, on a fresh bitmap
    assert again["bytes_read"] < MiB and sha(replica) == raw_sha(img, tmp_path)


def test_a_missing_bitmap_is_named_and_nothing_is_sent(qcow2_item, tmp_path):
    img, replica, vault = qcow2_item
    replicate(vault)
    qemu_io(img, "write -P 0x44 1M 64k")
    subprocess.run(["qemu-img", "bitmap", "--remove", str(img), "pydr-1"], check=True)
    before = sha(replica)
    r = cli(vault, "replicate", "vm")
    err = r.stderr.decode()
    # one line naming the problem, then the hint: the command that gets further
    lines = err.splitlines()
    assert r.returncode == 15 and len(lines) == 2 and "Traceback" not in err, err
    assert "pydr-1" in lines[0] and lines[1] == "hint: run 'pydr replicate vm --resync'", err
    assert "pydr-1" in status(vault)["last_error"] and "missing" in status(vault)["last_error"]
    assert sha(replica) == before


def test_protect_cbt_needs_a_trackable_source(tmp_path):
    raw = tmp_path / "plain.img"
    raw.write_bytes(bytes(MiB))
    vault = tmp_path / "v"
    init_vault(vault)
    r = cli(vault, "protect", "vm", "--disk", f"{raw}=/tmp/x.img", "--cbt")
    assert r.returncode == 2 and b"qcow2 image or a live disk" in r.stderr
    r = cli(vault, "protect", "vm", "--disk", f"qmp:{tmp_path / 'no.sock'}:disk0=/tmp/x.img", "--cbt")
    assert r.returncode != 0 and b"Traceback" not in r.stderr and b"no.sock" in r.stderr


class LiveDisk:
    """A raw disk held by qemu-storage-daemon: an NBD export for its writer,
    a QMP socket for pydr, dirty bitmaps that live only in the daemon."""

    def __init__(self, tmp_path):
        self.disk = tmp_path / "live.img"
        with open(self.disk, "wb") as f:
            f.truncate(64 * MiB)
            f.write(random.Random(9).randbytes(8 * MiB))
        self.qmp, self.nbd = tmp_path / "qmp.sock", tmp_path / "nbd.sock"
        self.qmp2 = tmp_path / "qmp2.sock"
        self.start()

    @property
    def spec(self):
        return f"qmp:{self.qmp}:disk0?nbd={self.nbd}"

    def start(self):
        for s in (self.qmp, self.nbd, self.qmp2):
            if s.exists():
                s.unlink()
        _, self.pidfd = start_storage_daemon(
            self.disk.with_name("qsd.pid"),
            "--blockdev", f"driver=file,node-name=file0,filename={self.disk}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
            "--export", "type=nbd,id=writer,node-name=disk0,name=disk0,writable=on",
            "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0",
            # a second monitor: a test looks while a stopped pydr holds the first
            "--chardev", f"socket,path={self.qmp2},server=on,wait=off,id=qmp1",
            "--monitor", "chardev=qmp1", sockets=(self.qmp, self.nbd, self.qmp2))

    def _signal(self, sig):
        """Send `sig` and wait until the daemon is gone (its pidfd readable)."""
        end_by_pidfd(self.pidfd, sig, gone_ok=True)
        self.pidfd = None

    def write(self, offset, length, pattern):
        qemu_io(f"nbd+unix:///disk0?socket={self.nbd}", f"write -P {pattern} {offset} {length}",
                fmt="raw")

    def bitmaps(self):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.qmp))
            f = s.makefile("rwb")
            f.readline()
            for cmd in ("qmp_capabilities", "query-named-block-nodes"):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while "event" in (reply := json.loads(f.readline())):
                    pass
        node = next(n for n in reply["return"] if n["node-name"] == "disk0")
        return {b["name"]: b for b in node.get("dirty-bitmaps") or []}

    def kill(self):
        self._signal(signal.SIGKILL)

    def stop(self):
        if self.pidfd is not None:
            self._signal(signal.SIGTERM)


@pytest.fixture
def live(tmp_path):
    d = LiveDisk(tmp_path)
    vault = tmp_path / "vault"
    init_vault(vault)
    r = cli(vault, "protect", "vm", "--disk", f"{d.spec}={tmp_path / 'replica.img'}", "--cbt")
    assert r.returncode == 0, r.stderr
    yield d, vault, tmp_path / "replica.img"
    d.stop()


def test_live_disk_points_equal_the_disk_at_their_cut_even_when_written_meanwhile(live, tmp_path):
    disk, vault, replica = live
    history = {}
    res = replicate(vault)
    history[res["point_id"]] = sha(disk.disk)
    assert sha(replica) == history[res["point_id"]]
    disk.write(3 * MiB, 8192, "0x21")
    # a cycle stopped right after its cut; the guest writes; then it goes on
    p = subprocess.Popen(pydr_command() + ["replicate", "vm", "--vault", str(vault), "--json"],
                         env={**os.environ, "PYDR_STOP_AT": "cycle.cut"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, st = os.waitpid(p.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(st)
    at_cut = sha(disk.disk)
    disk.write(3 * MiB, 4096, "0x99")      # over a block the cycle is about to read
    disk.write(40 * MiB, 65536, "0x98")    # and one it does not know about yet
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    res = json.loads(out)
    history[res["point_id"]] = at_cut
    assert sha(replica) == at_cut  # the disk as it was at the cut, not as it is now
    res = replicate(vault)  # the writes after the cut come with the next cycle
    history[res["point_id"]] = sha(disk.disk)
    assert sha(replica) == history[res["point_id"]] and res["bytes_read"] < 2 * MiB
    check_points(vault, history, tmp_path)
    points = json.loads(cli(vault, "points", "vm", "--json").stdout)
    assert {p["cut"] for p in points} == {"fleece"}
    assert list(disk.bitmaps()) == [status(vault)["disks"][0]["tracking"]["bitmap"]]


def test_a_restarted_qemu_lost_its_bitmap(live, tmp_path):
    disk, vault, replica = live
    replicate(vault)
    disk.write(5 * MiB, 4096, "0x31")
    disk.kill()  # SIGKILL: the bitmap lived in the daemon only
    disk.start()
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 15, r.stderr
    st = status(vault)
    assert st["state"] == "resync-required" and "missing" in st["last_error"]
    replicate(vault, "--resync")
    assert sha(replica) == sha(disk.disk)
    disk.write(6 * MiB, 4096, "0x32")
    again = replicate(vault)
    assert again["bytes_read"] < MiB and sha(replica) == sha(disk.disk)


def test_changes_over_half_the_disk_are_compared_whole_and_stay_tracked(live, tmp_path):
    """40 MiB written of a 64 MiB disk: the cycle compares the whole disk
    (as an untracked cycle: the source read in full, the replica through its
    signature cache) instead of refusing; the replica is exact, the bitmaps
    rotate, and the next small write is a tracked cycle again."""
    disk, vault, replica = live
    replicate(vault)
    disk.write(0, 40 * MiB, "0x41")
    res = replicate(vault)
    assert sha(replica) == sha(disk.disk)
    assert res["bytes_written"] == 40 * MiB, res
    st = status(vault)
    assert st["state"] == "protected" and not st["last_error"], st
    (name, info), = disk.bitmaps().items()  # the frozen one dropped with the point recorded
    assert name == st["disks"][0]["tracking"]["bitmap"] and info["count"] == 0
    disk.write(50 * MiB, 4096, "0x42")
    again = replicate(vault)
    assert again["bytes_read"] < MiB and sha(replica) == sha(disk.disk)


def qmp_lists(disk, monitor=None):
    """{command: its list} of the daemon's block jobs, named nodes and exports
    (through `monitor`, default the first)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(monitor or disk.qmp))
        f = s.makefile("rwb")
        f.readline()
        out = {}
        for cmd in ("qmp_capabilities", "query-block-jobs", "query-named-block-nodes",
                    "query-block-exports"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
            out[cmd] = reply["return"]
    return out


def pydr_names(disk, monitor=None):
    """Every job, node and export of pydr's in the daemon (by their names)."""
    lists = qmp_lists(disk, monitor)
    return ([j["device"] for j in lists["query-block-jobs"] if j["device"].startswith("pydr")]
            + [n["node-name"] for n in lists["query-named-block-nodes"]
               if n["node-name"].startswith("pydr")]
            + [e["id"] for e in lists["query-block-exports"] if e["id"].startswith("pydr")])


def scratch_files(disk):
    """The scratch files of pydr's overlays in the daemon (their node's file,
    a json: pseudo-filename when the backing is a node)."""
    out = []
    for n in qmp_lists(disk)["query-named-block-nodes"]:
        if n["node-name"].startswith("pydr-fleece-"):
            f = n["file"]
            out.append(json.loads(f[5:])["file"]["filename"] if f.startswith("json:") else f)
    return out


#: the crash points of a cycle while its fleece is held (between its set-up and tear-down)
FLEECE_POINTS = ("cycle.cut", "cycle.disk", "cycle.steps")


@pytest.mark.parametrize("crash_point", FLEECE_POINTS)
def test_a_cycle_killed_while_its_fleece_is_held_then_the_same_command_again(
        crash_point, live, tmp_path):
    """kill -9 of a tracked cycle of a live disk while its fleece is held
    leaves the backup job, overlay and export in the daemon (pydr-N busy);
    the same command again removes them before its cut and succeeds, its
    point exact, and nothing of pydr's is left in the daemon."""
    disk, vault, replica = live
    replicate(vault)
    disk.write(7 * MiB, 8192, "0x51")
    r = cli(vault, "replicate", "vm", env={**os.environ, "PYDR_CRASH_AT": crash_point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert pydr_names(disk), "the kill left no fleece: the test tests nothing"
    scratch = scratch_files(disk)
    assert scratch and all(os.path.exists(f) for f in scratch), scratch
    disk.write(9 * MiB, 4096, "0x52")
    res = replicate(vault)
    assert not [f for f in scratch if os.path.exists(os.path.dirname(f))], scratch
    assert sha(replica) == sha(disk.disk)
    assert res["bytes_read"] < 2 * MiB, res  # still a tracked cycle
    assert pydr_names(disk) == []
    st = status(vault)
    assert st["state"] == "protected" and not st["last_error"], st
    assert list(disk.bitmaps()) == [st["disks"][0]["tracking"]["bitmap"]]
    disk.write(11 * MiB, 4096, "0x53")
    again = replicate(vault)
    assert again["bytes_read"] < MiB and sha(replica) == sha(disk.disk)
    assert pydr_names(disk) == []


def test_another_programs_job_node_and_export_are_left_alone(live, tmp_path):
    """What pydr did not name for this node stays through its cycles: a
    backup job, overlay and export of other names (another program's
    fleece of another node), pydr's own names for another node (another
    pydr's fleece), an overlay and an export of this node of other names."""
    from pydr.transport.qemu import Qmp, fleece_tag, qemu_img

    disk, vault, replica = live
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(64 * MiB)
    scratch = {}
    for name in ("theirs", "pydrs", "pydrish"):
        scratch[name] = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(scratch[name]), str(64 * MiB))
    tag = f"{fleece_tag('disk1')}-aaaaaa"
    with Qmp(str(disk.qmp)) as q:
        q.execute("blockdev-add", driver="raw", **{"node-name": "disk1"},
                  file={"driver": "file", "filename": str(other)})
        for overlay, base, name, job in (("fleece-theirs", "disk1", "theirs", "job-theirs"),
                                         (f"pydr-fleece-{tag}", "disk1", "pydrs",
                                          f"pydr-job-{tag}")):
            q.execute("blockdev-add", driver="qcow2", **{"node-name": overlay},
                      file={"driver": "file", "filename": str(scratch[name])}, backing=base)
            q.execute("blockdev-backup", device=base, target=overlay, sync="none",
                      **{"job-id": job})
        q.execute("block-export-add", type="nbd", id="export-theirs",
                  **{"node-name": "fleece-theirs"}, name="theirs", writable=False)
        q.execute("block-export-add", type="nbd", id=f"pydr-{tag}",
                  **{"node-name": f"pydr-fleece-{tag}"}, name=f"pydr-{tag}", writable=False)
        q.execute("blockdev-add", driver="qcow2", **{"node-name": "pydrish"},
                  file={"driver": "file", "filename": str(scratch["pydrish"])}, backing="disk0",
                  **{"read-only": True})
        q.execute("block-export-add", type="nbd", id="pydr-of-disk0",
                  **{"node-name": "disk0"}, name="pydr-of-disk0", writable=False)
    before = qmp_lists(disk)
    for _ in range(2):
        res = replicate(vault)
        assert res["point_id"] and sha(replica) == sha(disk.disk)
    after = qmp_lists(disk)
    assert sorted(j["device"] for j in after["query-block-jobs"]) == \
        sorted(j["device"] for j in before["query-block-jobs"]) == ["job-theirs", f"pydr-job-{tag}"]
    assert sorted(e["id"] for e in after["query-block-exports"]) == \
        sorted(e["id"] for e in before["query-block-exports"])
    assert {n["node-name"] for n in after["query-named-block-nodes"]} == \
        {n["node-name"] for n in before["query-named-block-nodes"]}
    assert all(p.exists() for p in scratch.values())


def named_bitmaps(disk):
    """{name: info} of the named dirty bitmaps of disk0 (pydr's)."""
    from pydr.transport.qemu import Qmp, node_bitmaps

    with Qmp(str(disk.qmp)) as q:
        return node_bitmaps(q, "disk0")


def test_normalize_records_a_write_made_while_it_merges(live, tmp_path):
    """After a cycle killed at its cut (pydr-1 frozen, pydr-2 recording),
    the next cut's normalize makes pydr-1 record again before pydr-2 is
    merged and removed: a guest write in between (made here just before
    the remove) is in pydr-1, not lost with pydr-2."""
    from pydr.dr import tracking

    disk, vault, replica = live
    replicate(vault)
    r = cli(vault, "replicate", "vm", env={**os.environ, "PYDR_CRASH_AT": "cycle.cut"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    before = named_bitmaps(disk)  # the killed cut's fleece holds an unnamed one too
    assert not before["pydr-1"]["recording"] and before["pydr-1"]["count"] == 0, before
    with Vault(vault, writer=True) as v:
        t = tracking.tracker(v, "vm", v.disks("vm")[0])
        remove = t.remove

        def write_then_remove(name):
            disk.write(20 * MiB, 4096, "0x61")
            remove(name)

        t.remove = write_then_remove
        t.normalize()
    after = named_bitmaps(disk)
    assert list(after) == ["pydr-1"] and after["pydr-1"]["recording"], after
    assert after["pydr-1"]["count"] >= 4096, after
    res = replicate(vault)
    assert sha(replica) == sha(disk.disk) and res["bytes_read"] < 2 * MiB, res


class OwnServerDisk(LiveDisk):
    """A LiveDisk whose daemon runs no NBD server: pydr starts its own for
    each fleece (qmp:SOCKET:NODE without ?nbd=); nothing writes to it."""

    @property
    def spec(self):
        return f"qmp:{self.qmp}:disk0"

    def start(self):
        if self.qmp.exists():
            self.qmp.unlink()
        _, self.pidfd = start_storage_daemon(
            self.disk.with_name("qsd.pid"),
            "--blockdev", f"driver=file,node-name=file0,filename={self.disk}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0", sockets=(self.qmp,))


def test_a_killed_cycle_with_pydrs_own_nbd_server_then_the_same_command_again(tmp_path):
    """Without ?nbd= the killed cycle's NBD server (pydr's, on a socket in its
    fleece's directory) stays too: the next cycle stops it with the rest."""
    disk = OwnServerDisk(tmp_path)
    try:
        vault = tmp_path / "vault"
        init_vault(vault)
        replica = tmp_path / "replica.img"
        r = cli(vault, "protect", "vm", "--disk", f"{disk.spec}={replica}", "--cbt")
        assert r.returncode == 0, r.stderr
        replicate(vault)
        r = cli(vault, "replicate", "vm", env={**os.environ, "PYDR_CRASH_AT": "cycle.disk"})
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert pydr_names(disk)
        for _ in range(2):
            res = replicate(vault)
            assert sha(replica) == sha(disk.disk) and res["point_id"]
            assert pydr_names(disk) == []
        assert status(vault)["state"] == "protected"
    finally:
        disk.stop()


def test_a_fleece_a_live_pydr_holds_is_not_cleared_as_left(live, tmp_path):
    """A cycle stopped while it holds its fleece (PYDR_STOP_AT=cycle.cut): a
    clearing of the node's left fleeces (what another pydr's fleece of the
    node does first) leaves it alone; the stopped cycle then ends well."""
    from pydr.transport.qemu import Qmp, clear_left_fleeces

    disk, vault, replica = live
    replicate(vault)
    disk.write(13 * MiB, 4096, "0x71")
    p = subprocess.Popen(pydr_command() + ["replicate", "vm", "--vault", str(vault), "--json"],
                         env={**os.environ, "PYDR_STOP_AT": "cycle.cut"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, st = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(st)
        held = pydr_names(disk, disk.qmp2)  # the first monitor: the stopped pydr's
        assert len(held) == 3, held  # its job, overlay and export
        with Qmp(str(disk.qmp2)) as q:
            assert clear_left_fleeces(q, "disk0", nbd_socket=str(disk.nbd)) == []
        assert pydr_names(disk, disk.qmp2) == held
        at_cut = sha(disk.disk)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert sha(replica) == at_cut and pydr_names(disk) == []


def test_a_tracked_item_is_reprotected_and_failed_back_with_its_replicas_exact(tmp_path):
    """Reprotect swaps source and replica: a raw replica cannot hold dirty
    bitmaps, so the new direction is untracked (a note says so) -- it used
    to crash with an AttributeError (exit 1) and leave the item stuck."""
    img, replica, vault = qcow2_and_vault(tmp_path, "16M", "write -P 0x11 0 1M")
    assert cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt").returncode == 0
    replicate(vault)
    for args in (["failover", "vm", "--point", "latest-processed"], ["commit", "vm"]):
        r = cli(vault, *args)
        assert r.returncode == 0, r.stderr
    r = cli(vault, "reprotect", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert any("changed-block tracking is off for disk 0" in n for n in json.loads(r.stdout)["notes"])
    with Vault(vault) as v:
        assert v.disks("vm")[0]["tracking"] is None
    with open(replica, "r+b") as f:  # site B writes
        f.seek(2 << 20)
        f.write(b"\x5a" * 4096)
    replicate(vault)
    assert raw_sha(img, tmp_path) == sha(replica)
    for args in (["failback", "vm"], ["commit", "vm"], ["reprotect", "vm"]):
        r = cli(vault, *args)
        assert r.returncode == 0, r.stderr
    qemu_io(img, "write -P 0x22 4M 1M")
    replicate(vault)
    assert raw_sha(img, tmp_path) == sha(replica)
