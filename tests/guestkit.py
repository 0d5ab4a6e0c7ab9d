"""A small real Linux guest for the tests of libvirt domains: the host's
Debian kernel booted directly (no bootloader) with a busybox initramfs built
here, a virtio qcow2 disk holding an ext4 file system, the serial console
logged to a file, and qemu-guest-agent on the virtio-serial channel
org.qemu.guest_agent.0. It boots to userspace in seconds under TCG.

    from guestkit import guest_kit, wait_for_console, last_synced, verify_records  # noqa: F401

    disk = guest_kit.make_disk(tmp_path / "vda.qcow2")
    xml = guest_kit.domain_xml("pydr-t-1", disk, console_log=tmp_path / "console.log")
    with libvirtd.domain(xml) as dom:
        wait_for_console(log, r"PYDR-READY", timeout=120, domain=dom)

What the guest does (/init, a busybox sh script; markers go to the serial
console /dev/ttyS0, one per line):

1. loads the kernel modules (virtio, virtio_pci, virtio_blk, virtio_console,
   virtio_net, ext4 and what they need), then reads the superblock of
   /dev/vda and prints ``PYDR-JOURNAL clean`` or ``PYDR-JOURNAL
   needs-recovery`` (feature_incompat bit 0x4, RECOVER: the file system was
   not unmounted cleanly and mounting it replays its journal);
2. mounts /dev/vda (ext4) at /data and verifies every record of
   /data/records with /bin/pydr-verify-records: ``PYDR-VERIFY OK last=N``
   or ``PYDR-VERIFY FAIL <reason>``;
3. starts qemu-ga (daemonized, log in /tmp/qemu-ga.log; ``PYDR-AGENT
   /dev/vportNpM`` or ``PYDR-AGENT none``), whatever the verification said,
   so that an agent probe can run /bin/pydr-verify-records (guest-exec) and
   see it fail;
4. only if the records verified: cuts a torn last line away, prints
   ``PYDR-READY`` and runs the writer forever: record N+1, N+2, ... each
   appended, then fsync'd (busybox ``sync FILE``), then ``PYDR-SYNCED N``.

Record format (/records on the disk; the guest sees /data/records): one
line per record, ``N RANDOM MD5`` + newline, where N is the record's number
in decimal (1, 2, 3, ... consecutive from 1), RANDOM 16 lowercase hex digits
from /dev/urandom and MD5 the 32 lowercase hex digits of md5("N RANDOM"),
the first two fields joined by one space, no newline. A file verifies when
it holds no NUL byte and every complete line (ending in a newline) is such a
record, numbered from 1; a final line without a newline is a write torn by a
crash before its fsync, and is ignored (then cut away by the next boot).
`verify_records` checks the same on the host from the disk image.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from typing import Iterable, Optional, Sequence
from xml.sax.saxutils import escape, quoteattr

import pytest

# in load order once their dependencies (modules.dep) come first
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net",
           "crc32c_generic", "ext4")
QEMU_GA = "/usr/sbin/qemu-ga"
BUSYBOX = "/bin/busybox"
RECORD = re.compile(rb"([1-9][0-9]*) ([0-9a-f]{16}) ([0-9a-f]{32})")
INSTALL_HINT = ("run scripts/bootstrap, or apt-get install linux-image-amd64 busybox-static "
                "qemu-guest-agent qemu-system-x86 qemu-utils e2fsprogs")

INIT = r"""#!/bin/sh
# /init of pydr's test guest (tests/guestkit.py): verify the records, then write more
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /data /tmp /run/qemu-ga /dev/virtio-ports
exec </dev/null >/dev/ttyS0 2>&1
say() { echo "$*" >/dev/ttyS0; }

for m in $(cat /etc/pydr-modules); do
    insmod /lib/modules/$m.ko || say "PYDR-MODULE-FAIL $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 50000; i=$((i + 1)); done

start_agent() {
    port=""
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat $d/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${d##*/}
    done
    if [ -n "$port" ]; then
        ln -sf $port /dev/virtio-ports/org.qemu.guest_agent.0
        qemu-ga -d -m virtio-serial -p $port -l /tmp/qemu-ga.log -f /run/qemu-ga.pid \
            -t /run/qemu-ga
        say "PYDR-AGENT $port"
    else
        say "PYDR-AGENT none"
    fi
}

# a NIC (QEMU's user network): its usual address; pydr.listen=PORT on the
# command line answers each TCP connection to PORT with "PYDR-TCP-OK"
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
for arg in $(cat /proc/cmdline); do
    case $arg in pydr.listen=*)
        printf '#!/bin/sh\necho PYDR-TCP-OK\n' >/bin/pydr-tcp-reply
        chmod 755 /bin/pydr-tcp-reply
        nc -ll -p ${arg#pydr.listen=} -e /bin/pydr-tcp-reply &
        say "PYDR-LISTEN ${arg#pydr.listen=}" ;;
    esac
done

# ext4's superblock is at 1024; feature_incompat at +0x60, RECOVER = 0x4
flags=$(dd if=/dev/vda bs=1 skip=1120 count=1 2>/dev/null | hexdump -e '1/1 "%u"')
if [ -z "$flags" ]; then
    say "PYDR-JOURNAL unreadable"
elif [ $((flags & 4)) -ne 0 ]; then
    say "PYDR-JOURNAL needs-recovery"
else
    say "PYDR-JOURNAL clean"
fi

if ! mount -t ext4 /dev/vda /data; then
    say "PYDR-VERIFY FAIL cannot mount /dev/vda"
    start_agent
    exec sleep 2147483647
fi
result=$(pydr-verify-records /data/records)
ok=$?
say "$result"
start_agent
if [ $ok -ne 0 ]; then
    exec sleep 2147483647
fi

n=${result##*last=}
truncate -s $(cat /tmp/pydr-valid-bytes) /data/records  # a torn last line
sync /data/records
say "PYDR-READY"
while :; do
    n=$((n + 1))
    r=$(hexdump -n 8 -e '8/1 "%02x"' /dev/urandom)
    s=$(printf '%s %s' $n $r | md5sum)
    printf '%s %s %s\n' $n $r ${s%% *} >>/data/records && sync /data/records \
        || { say "PYDR-WRITE FAIL $n"; exec sleep 2147483647; }
    say "PYDR-SYNCED $n"
    usleep 100000
done
"""

VERIFY = r"""#!/bin/sh
# pydr-verify-records [FILE]: exit 0 iff every complete record of FILE
# (/data/records) verifies (format: tests/guestkit.py); prints
# "PYDR-VERIFY OK last=N" or "PYDR-VERIFY FAIL <reason>".
f=${1:-/data/records}
t=/tmp/pydr-verify.$$
fail() { rm -rf $t; echo "PYDR-VERIFY FAIL $*"; exit 1; }
[ -f "$f" ] || fail "no file $f"
nul=$(tr -cd '\000' <"$f" | wc -c)
[ "$nul" -eq 0 ] || fail "$nul NUL bytes in $f"
lines=$(wc -l <"$f")  # complete lines: a torn last one has no newline
rm -rf $t
mkdir -p $t
awk -v n=$lines -v t=$t '
NR > n { exit }
{
    if (NF != 3 || ($1 "") != (NR "") || $2 !~ /^[0-9a-f]+$/ || length($2) != 16 ||
        $3 !~ /^[0-9a-f]+$/ || length($3) != 32) {
        print "record " NR ": malformed line: " substr($0, 1, 80) > (t "/bad")
        exit
    }
    printf "%s %s", $1, $2 > (t "/" NR)
    close(t "/" NR)
    print $3 "  " NR > (t "/sums")
    bytes += length($0) + 1
}
END { print bytes + 0 > (t "/bytes") }' "$f" || fail "awk failed"
[ -f $t/bad ] && fail "$(cat $t/bad)"
if [ "$lines" -gt 0 ]; then
    if ! (cd $t && md5sum -c sums >check 2>&1); then
        bad=$(grep -v ': OK$' $t/check | head -n 1)
        fail "record ${bad%%:*}: checksum mismatch"
    fi
fi
cp $t/bytes /tmp/pydr-valid-bytes
rm -rf $t
echo "PYDR-VERIFY OK last=$lines"
"""


class _Cpio:
    """A cpio archive in the "newc" format, the one the kernel unpacks."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        self.out.write(b"070701" + b"".join(b"%08x" % v for v in fields) + encoded)
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.out.getvalue()


def find_kernel() -> tuple:
    """(kernel path, its version) of the newest readable /boot/vmlinuz-*
    that has modules in /lib/modules; raises RuntimeError when none."""
    found = []
    for path in glob.glob("/boot/vmlinuz-*"):
        version = path[len("/boot/vmlinuz-"):]
        if os.access(path, os.R_OK) and os.path.exists(f"/lib/modules/{version}/modules.dep"):
            found.append((os.path.getmtime(path), path, version))
    if not found:
        raise RuntimeError("no readable /boot/vmlinuz-* with /lib/modules/VERSION/modules.dep")
    _, path, version = max(found)
    return path, version


def _module_order(version: str, wanted: Iterable[str]) -> list:
    """[(name, path)] of `wanted` and everything they depend on, each
    after its dependencies (modules.dep lists a module's, transitively)."""
    base = f"/lib/modules/{version}"
    deps, by_name = {}, {}
    with open(f"{base}/modules.dep") as f:
        for line in f:
            mod, _, rest = line.partition(":")
            name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", os.path.basename(mod)).replace("-", "_")
            by_name[name] = mod
            deps[mod] = rest.split()
    order, seen = [], set()

    def visit(mod: str) -> None:
        if mod in seen:
            return
        seen.add(mod)
        for dep in reversed(deps.get(mod, [])):  # modprobe loads the list's end first
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise RuntimeError(f"no module {name} in {base}/modules.dep")
        visit(by_name[name])
    return [(re.sub(r"\.ko(\.(xz|zst|gz))?$", "", os.path.basename(m)), f"{base}/{m}")
            for m in order]


def _read_module(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", path], capture_output=True, check=True).stdout
    return data


def _libraries(binary: str) -> list:
    """The shared libraries `binary` loads and its loader (ldd), as paths."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def build_initramfs(version: str, path: str) -> list:
    """Writes the guest's initramfs (cpio newc, gzip) to `path`; returns
    the names of the modules /init loads, in order."""
    cpio = _Cpio()
    dirs = {"bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run", "data",
            "var", "root"}
    files = {}  # name -> (mode, data)
    with open(BUSYBOX, "rb") as f:
        files["bin/busybox"] = (0o755, f.read())
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    with open(QEMU_GA, "rb") as f:
        files["bin/qemu-ga"] = (0o755, f.read())
    for lib in _libraries(QEMU_GA):
        name = lib.lstrip("/")
        with open(lib, "rb") as f:
            files[name] = (0o755, f.read())
        d = os.path.dirname(name)
        while d:
            dirs.add(d)
            d = os.path.dirname(d)
    modules = _module_order(version, MODULES)
    for name, mpath in modules:
        files[f"lib/modules/{name}.ko"] = (0o644, _read_module(mpath))
    files["etc/pydr-modules"] = (0o644, "".join(n + "\n" for n, _ in modules).encode())
    files["init"] = (0o755, INIT.encode())
    files["bin/pydr-verify-records"] = (0o755, VERIFY.encode())
    files["etc/passwd"] = (0o644, b"root:x:0:0:root:/root:/bin/sh\n")
    files["etc/group"] = (0o644, b"root:x:0:\n")
    for d in sorted(dirs, key=lambda d: (d.count("/"), d)):
        cpio.add(d, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    cpio.add("sbin", stat.S_IFLNK | 0o777, b"bin")
    for name, (mode, data) in sorted(files.items()):
        cpio.add(name, stat.S_IFREG | mode, data)
    for applet in applets:
        if f"bin/{applet}" not in files:
            cpio.add(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
    with open(path, "wb") as f:
        f.write(gzip.compress(cpio.finish(), compresslevel=6))
    return [n for n, _ in modules]


def _is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"


def parse_records(data: bytes) -> int:
    """Checks `data` (a records file, format in the module docstring);
    returns the last record's number (0 for none). Raises AssertionError
    naming the first record that fails and its byte offset."""
    if b"\0" in data:
        raise AssertionError(f"NUL byte in the records at offset {data.index(bytes(1))}")
    complete = data[:data.rfind(b"\n") + 1]  # a torn last line is ignored
    offset, number = 0, 0
    for line in complete.split(b"\n")[:-1]:
        m = RECORD.fullmatch(line)
        if m is None or int(m.group(1)) != number + 1:
            raise AssertionError(f"record {number + 1} at offset {offset}: malformed or out "
                                 f"of order: {line[:80]!r}")
        payload = m.group(1) + b" " + m.group(2)
        if hashlib.md5(payload).hexdigest().encode() != m.group(3):
            raise AssertionError(f"record {number + 1} at offset {offset}: checksum mismatch")
        number += 1
        offset += len(line) + 1
    return number


def make_records(count: int, first: int = 1) -> bytes:
    """`count` valid records numbered from `first` (format in the module's
    docstring), as the guest writes them."""
    out = []
    for n in range(first, first + count):
        payload = b"%d %s" % (n, os.urandom(8).hex().encode())
        out.append(payload + b" " + hashlib.md5(payload).hexdigest().encode() + b"\n")
    return b"".join(out)


def verify_records(image: str | os.PathLike) -> int:
    """Verifies the records of a guest disk image (qcow2 or raw), as
    /bin/pydr-verify-records does in the guest, after replaying its journal
    on a private raw copy (the image itself is only read) and checking that
    copy with `e2fsck -fn`. Returns the last record's number. Raises
    AssertionError naming what failed (e2fsck's output, the bad record)."""
    image = os.fspath(image)
    with tempfile.TemporaryDirectory(prefix="pydr-verify-") as tmp:
        raw = os.path.join(tmp, "disk.raw")
        fmt = "qcow2" if _is_qcow2(image) else "raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, raw],
                       check=True, capture_output=True)
        # replay the journal, as mounting would; exit codes 0-2 mean done or fixed
        r = subprocess.run(["e2fsck", "-E", "journal_only", "-y", raw], capture_output=True,
                           text=True)
        if r.returncode > 2:
            raise AssertionError(f"e2fsck -E journal_only of {image}: {r.stdout}{r.stderr}")
        r = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"e2fsck -fn of {image} (its journal replayed): "
                                 f"{r.stdout}{r.stderr}")
        out = os.path.join(tmp, "records")
        r = subprocess.run(["debugfs", "-R", f"dump /records {out}", raw], capture_output=True,
                           text=True)
        if not os.path.exists(out):
            raise AssertionError(f"no /records in {image}: {r.stderr}")
        with open(out, "rb") as f:
            return parse_records(f.read())


def damage_record(raw_image: str | os.PathLike, number: int) -> int:
    """Damages record `number` in a raw disk image in place, as a disk that
    lies would: the last digit of its checksum changes wherever the record's
    line lies in the image (ext4 writes file data in place, the journal
    holds metadata only). Returns how many copies were changed (>= 1).
    Raises AssertionError when the image holds no such record."""
    path = os.fspath(raw_image)
    if _is_qcow2(path):
        raise ValueError(f"{path} is qcow2: damage_record changes raw images only")
    line = re.compile(rb"(?:^|\n)%d [0-9a-f]{16} [0-9a-f]{31}([0-9a-f])\n" % number)
    with open(path, "r+b") as f:
        data = f.read()
        spots = [m.start(1) for m in line.finditer(data)]
        if not spots:
            raise AssertionError(f"no record {number} in {path}")
        for at in spots:
            f.seek(at)
            f.write(b"1" if data[at:at + 1] == b"0" else b"0")
    return len(spots)


def console_text(path: str | os.PathLike, after: int = 0) -> str:
    """The serial log `path` from byte `after` on ('' while it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(after)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_console(path: str | os.PathLike, pattern: str, *, timeout: float, after: int = 0,
                     domain=None) -> re.Match:
    """Waits until a complete line of the serial log `path` (from byte
    `after` on) matches the regular expression `pattern`; returns the match.
    A guest booting is wall-clock time, so this polls up to `timeout`
    seconds (a generous bound, not a measurement). Raises AssertionError
    with the log's tail on timeout, or as soon as `domain` (a
    libvirt.virDomain, optional) is no longer running."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        alive = domain is None or domain.isActive()
        text = console_text(path, after)
        for line in text.splitlines(keepends=True):
            # the serial line ends in CR LF: the pattern sees the line without them
            m = regex.search(line.rstrip("\r\n")) if line.endswith("\n") else None
            if m:
                return m
        if not alive:
            raise AssertionError(f"the domain stopped before {pattern!r} on its console "
                                 f"{path}:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} within {timeout} s on the console {path}:\n"
                                 f"{text[-3000:]}")
        time.sleep(0.2)


def last_synced(path: str | os.PathLike, after: int = 0) -> int:
    """The highest N of the `PYDR-SYNCED N` lines of the serial log `path`
    so far (0 when none): every record up to N is on the disk."""
    numbers = [int(n) for n in re.findall(r"^PYDR-SYNCED (\d+)\r?$",
                                          console_text(path, after), re.M)]
    return max(numbers, default=0)


class GuestKit:
    """The kernel and initramfs of the test guest, and how to make its
    disks and domains."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        kernel, self.kernel_version = find_kernel()
        self.kernel = os.path.join(self.dir, "vmlinuz")
        shutil.copyfile(kernel, self.kernel)
        self.initrd = os.path.join(self.dir, "initrd.gz")
        start = time.monotonic()
        self.modules = build_initramfs(self.kernel_version, self.initrd)
        self.build_seconds = time.monotonic() - start

    def make_disk(self, path: str | os.PathLike, size: str = "64M", records: bytes = b"") -> str:
        """Makes a qcow2 image at `path` holding an ext4 file system whose
        /records holds `records` (empty by default; see the module's
        docstring, `make_records` makes valid ones); returns the path."""
        path = os.fspath(path)
        with tempfile.TemporaryDirectory(prefix="pydr-disk-",
                                         dir=os.path.dirname(path) or None) as tmp:
            root = os.path.join(tmp, "root")
            os.mkdir(root)
            with open(os.path.join(root, "records"), "wb") as f:
                f.write(records)
            raw = os.path.join(tmp, "disk.raw")
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pydr-guest", "-d", root, raw, size],
                           check=True, capture_output=True)
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
                           check=True, capture_output=True)
        return path

    def domain_xml(self, name: str, disk: str | os.PathLike, *,
                   console_log: str | os.PathLike, agent: bool = True, memory_mib: int = 256,
                   extra_disks: Sequence[str | os.PathLike] = (), network: Optional[str] = None,
                   cmdline_extra: str = "", tcp_forward: Optional[tuple] = None) -> str:
        """Libvirt domain XML of the test guest `name`: TCG (type 'qemu'),
        machine 'pc', direct kernel boot of this kit's kernel and initramfs,
        `disk` (qcow2) as virtio vda, `extra_disks` (qcow2 or raw) as vdb,
        vdc..., the serial console to the file `console_log` (each start
        truncates it), the guest agent's virtio-serial channel when `agent`
        (libvirt picks its socket), no graphics, and every stop (poweroff,
        reboot, crash: /init never returns, a panic reboots) ends the domain.
        `network` "user" adds a virtio NIC on QEMU's user network (the
        guest takes 10.0.2.15/24); any other string is inserted as the
        interface XML. `tcp_forward` (host_port, guest_port) adds, instead,
        a user-network NIC whose QEMU forwards 127.0.0.1:host_port on the
        host to guest_port, where the guest answers every connection with
        "PYDR-TCP-OK" (through <qemu:commandline>, its NIC at PCI slot 0x1f: libvirt 9.0 forwards
        ports of a user NIC only with passt). `cmdline_extra` is appended to
        the kernel command line. Returns the XML text."""
        disks = []
        for i, d in enumerate([disk, *extra_disks]):
            d = os.fspath(d)
            fmt = "qcow2" if _is_qcow2(d) else "raw"
            disks.append(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file={quoteattr(d)}/>
      <target dev='vd{chr(ord("a") + i)}' bus='virtio'/>
    </disk>""")
        channel = """
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>""" if agent else ""
        nic = ""
        if network == "user":
            nic = """
    <interface type='user'>
      <model type='virtio'/>
    </interface>"""
        elif network:
            nic = "\n    " + network
        qemu_args = ""
        if tcp_forward is not None:
            host_port, guest_port = (int(p) for p in tcp_forward)
            cmdline_extra = f"pydr.listen={guest_port} {cmdline_extra}"
            qemu_args = "".join(f"\n    <qemu:arg value={quoteattr(a)}/>" for a in (
                "-netdev", f"user,id=pydrnet,hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}",
                "-device", "virtio-net-pci,netdev=pydrnet,bus=pci.0,addr=0x1f"))
            qemu_args = f"\n  <qemu:commandline>{qemu_args}\n  </qemu:commandline>"
        cmdline = f"console=ttyS0 panic=-1 quiet {cmdline_extra}".strip()
        emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(self.kernel)}</kernel>
    <initrd>{escape(self.initrd)}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>{"".join(disks)}
    <serial type='file'>
      <source path={quoteattr(os.fspath(console_log))}/>
      <target port='0'/>
    </serial>{channel}{nic}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>{qemu_args}
</domain>
"""


# the module's helpers, reachable from the fixture's object as well
GuestKit.wait_for_console = staticmethod(wait_for_console)
GuestKit.last_synced = staticmethod(last_synced)
GuestKit.verify_records = staticmethod(verify_records)
GuestKit.make_records = staticmethod(make_records)
GuestKit.damage_record = staticmethod(damage_record)
GuestKit.console_text = staticmethod(console_text)


def missing_requirements() -> list:
    """What this machine lacks to build and boot the guest: [] when nothing."""
    missing = []
    try:
        find_kernel()
    except RuntimeError as e:
        missing.append(f"a kernel ({e})")
    for path in (BUSYBOX, QEMU_GA):
        if not os.access(path, os.X_OK):
            missing.append(path)
    for tool in ("qemu-img", "mkfs.ext4", "e2fsck", "debugfs", "ldd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


@pytest.fixture(scope="session")
def guest_kit(tmp_path_factory):
    """The guest's kernel and initramfs, built once per session (import
    this fixture); fails, never skips, when the machine lacks what it needs."""
    missing = missing_requirements()
    if missing:
        pytest.fail(f"the test guest needs {', '.join(missing)}: {INSTALL_HINT}")
    return GuestKit(tmp_path_factory.mktemp("guestkit"))
