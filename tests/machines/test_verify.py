"""Verification of recovered machines (pydr.dr.probes): the probe options,
a plan's test-failover that verifies each group's machines before the next
group, a failed verification stopping the plan (exit 17), the TCP probe, and
networks remapped (--network-map) and isolated (--drill-network) in a real
libvirtd."""

import json
import socket
import threading
import uuid

import pytest

from guestkit import guest_kit, wait_for_console  # noqa: F401 (fixtures)
from libvirtd import libvirtd  # noqa: F401
from test_bringup import BOOT, VERIFY, Site, cli, golden  # noqa: F401

from pydr.dr.probes import Probes, split_hostport
from pydr.errors import InvalidArgument


def test_probe_options_are_checked():
    assert Probes.make().timeout == 600
    assert Probes.make(timeout="90s").timeout == 90
    assert Probes.make(tcp="[::1]:22").tcp == "[::1]:22"
    assert split_hostport("[::1]:22") == ("::1", 22)
    assert split_hostport("db.example:5432") == ("db.example", 5432)
    for bad in ({"timeout": "soon"}, {"timeout": 0}, {"tcp": "host"}, {"tcp": "h:0"},
                {"tcp": "h:99999"}, {"console": " "}, {"script": ""}):
        with pytest.raises(InvalidArgument):
            Probes.make(**bad)


@pytest.fixture
def sites(tmp_path, golden, guest_kit, libvirtd):  # noqa: F811
    made = []

    def make(sub, **kw):
        (tmp_path / sub).mkdir()
        s = Site(tmp_path / sub, golden, guest_kit, libvirtd, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _plan_vault(sites):
    """Two machines in one vault, in a plan of two groups."""
    a = sites("a")
    b = sites("b")
    # b's item moves into a's vault: protect it there too
    cli("protect", b.item, "--disk", f"{b.disk}={b.replica}.2", "--vault", a.vault, check=0)
    cli("replicate", b.item, "--vault", a.vault, check=0)
    from pydr import Vault
    with Vault(str(a.vault), writer=True) as v:
        v.attach_machine(b.item, b.dom.XMLDesc(0), uri=b.libvirtd.uri)
    cli("plan", "create", "p", "--group", a.item, "--group", b.item, "--vault", a.vault,
        check=0)
    return a, b


def test_a_plan_verifies_each_group_before_the_next(sites):
    a, b = _plan_vault(sites)
    r = a.pydr("plan", "test-failover", "p", "--to", a.tmp / "drills", *VERIFY, "--json",
               check=0)
    report = json.loads(r.stdout)
    outcomes = [o for step in report["steps"] for o in step["outcomes"].values()]
    assert [o["verification"]["passed"] for o in outcomes] == [True, True], report
    ended = [json.loads(a.pydr("points", i, "--json", check=0).stdout)[-1]["verification"]
             ["ended"] for i in (a.item, b.item)]
    started_b = [o for o in outcomes if o["item"] == b.item][0]
    assert ended[0] < ended[1] and started_b["verification"]["rto"] > 0
    a.pydr("plan", "cleanup-test-failover", "p", check=0)
    assert not [d for d in a.domains() if d.startswith("pydr-drill-")
                and (a.item in d or b.item in d)]


def test_a_failed_verification_stops_the_plan(sites):
    a, b = _plan_vault(sites)
    r = a.pydr("plan", "test-failover", "p", "--to", a.tmp / "drills", "--verify",
               "--verify-script", "exit 4", "--verify-timeout", f"{BOOT}s")
    assert r.returncode == 17, r.stdout + r.stderr
    assert a.item in r.stdout and "failed" in r.stdout and "script" in r.stdout
    assert "not run" in r.stdout  # the second group never started
    assert f"pydr-drill-{b.item}" not in a.domains()
    a.pydr("plan", "cleanup-test-failover", "p", check=0)


def test_tcp_probe(site_with_listener):
    s, port = site_with_listener
    r = s.pydr("test-failover", s.item, "--to", s.tmp / "drill", "--verify",
               "--verify-console", "PYDR-READY", "--verify-tcp", f"127.0.0.1:{port}",
               "--verify-timeout", f"{BOOT}s", "--json", check=0)
    probes = json.loads(r.stdout)["verification"]["probes"]
    assert [(p["probe"], p["passed"]) for p in probes] == [("userspace", True), ("tcp", True)]


@pytest.fixture
def site_with_listener(sites):
    """A site, and a TCP port that accepts (the probe's other end: the test
    guest runs no network service)."""
    s = sites("t")
    srv = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: [srv.accept()[0].close() for _ in iter(int, 1)],
                     daemon=True).start()
    yield s, srv.getsockname()[1]
    srv.close()


@pytest.fixture
def network(libvirtd):  # noqa: F811
    """A libvirt network on a bridge of its own (no addresses, no DHCP, no
    firewall rules: forward mode 'bridge'), removed afterwards."""
    import subprocess
    import tempfile

    name = f"pydrnet{uuid.uuid4().hex[:5]}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
            f.write(f"<network><name>{name}</name><forward mode='bridge'/>"
                    f"<bridge name='{name}'/></network>")
            f.flush()
            libvirtd.virsh("net-define", f.name)
        libvirtd.virsh("net-start", name)
        yield name
    finally:
        libvirtd.virsh("net-destroy", name, check=False)
        libvirtd.virsh("net-undefine", name, check=False)
        subprocess.run(["ip", "link", "del", name], check=False)


def test_network_map_and_drill_network(sites, network, guest_kit, libvirtd):  # noqa: F811
    nic = "<interface type='network'><source network='prod'/><model type='virtio'/></interface>"
    orig = guest_kit.domain_xml
    guest_kit.domain_xml = lambda *a, **kw: orig(*a, **dict(kw, network=nic))
    try:
        s = sites("n")
    finally:
        guest_kit.domain_xml = orig
    r = s.pydr("test-failover", s.item, "--to", s.tmp / "drill", "--drill-network", network,
               "--json", check=0)
    xml = libvirtd.conn().lookupByName(f"pydr-drill-{s.item}").XMLDesc(0)
    assert f"network='{network}'" in xml and "network='prod'" not in xml
    s.pydr("cleanup-test-failover", s.item, check=0)
    # a failover without a map: 'prod' is not there, libvirt says so (exit 22)
    r = s.pydr("failover", s.item, "--point", "latest-processed")
    assert r.returncode == 22 and "prod" in r.stderr, r.stderr
    r = s.pydr("failover", s.item, "--network-map", f"prod={network}", "--json", check=0)
    dom = libvirtd.conn().lookupByName(json.loads(r.stdout)["machine"]["domain"])
    assert dom.isActive() and f"network='{network}'" in dom.XMLDesc(0)
