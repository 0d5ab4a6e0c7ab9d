"""pydr run after the review of issue 23 (findings of /tmp/rev23a): byte
metrics per item, alerts off the main loop, the vault's absolute path in
alerts. Waits are on events and FIFOs, never on the clock."""

import os
import urllib.request

import pytest

from pydr.dr.service import Service
from pydr.dr.vault import Vault, init_vault

MiB = 1 << 20


def scrape(port):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        text = r.read().decode()
    return {(s.name, s.labels.get("item"), s.labels.get("state")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture
def vault(tmp_path):
    """A vault with item a on a 4 MiB file disk, replicated once."""
    init_vault(tmp_path / "v")
    src = tmp_path / "a.img"
    src.write_bytes(os.urandom(4 * MiB))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("a", [(str(src), str(tmp_path / "ra.img"))])
        v.set_policy("a", target_rpo=3600)
        v.replicate(["a"])
    return tmp_path / "v"


def round_then_stop(service, scraped):
    def on_event(e):
        if e.operation == "run" and e.kind == "finished":
            scraped.update(scrape(service.metrics_port))
            service.stop()
    service.events = service._parts.events = on_event
    service.run()


def test_byte_metrics_count_what_the_cycle_read_and_wrote(vault, tmp_path):
    """64 KiB of a 4 MiB disk changed: the cycle reads the disk and writes
    64 KiB. Before the fix all three counters said one number (written)."""
    with open(tmp_path / "a.img", "r+b") as f:
        f.seek(5 * 65536)
        f.write(os.urandom(65536))
    with Vault(vault) as v:
        newest = v.store.points("a")[-1].data_time
    service = Service(vault, metrics="127.0.0.1:0", warm=False, clock=lambda: newest + 3000,
                      notify=lambda s: None)
    scraped = {}
    round_then_stop(service, scraped)
    with Vault(vault) as v:
        assert len(v.points("a")) == 2
    read = scraped[("pydr_bytes_read_total", "a", None)]
    written = scraped[("pydr_bytes_written_total", "a", None)]
    sent = scraped[("pydr_bytes_sent_total", "a", None)]
    assert written == 65536
    assert read >= 4 * MiB
    assert sent == written  # a local replica: what is sent to its place is what is written


def test_a_hanging_alert_never_holds_the_next_round_and_names_the_vault_absolutely(
        vault, tmp_path, monkeypatch):
    """The alert command reads its JSON, then blocks on a FIFO the test
    writes only once the round has ended: before the fix the round (its
    "finished" event) waited for the command (killed at its 30 s timeout),
    so nobody read the FIFO any more. The service is given the vault by a
    relative path: the alert names it absolutely. (Bounds only end a test
    that failed.)"""
    import json
    import threading

    fifo, got = tmp_path / "fifo", tmp_path / "alert.json"
    os.mkfifo(fifo)
    with Vault(vault, writer=True) as v:
        v.set_policy("a", alert_commands=[f"cat > {got}; cat {fifo} > /dev/null"])
        newest = v.store.points("a")[-1].data_time
    monkeypatch.chdir(tmp_path)
    rounds = threading.Event()

    def on_event(e):
        if e.operation == "run" and e.kind == "finished":
            rounds.set()

    service = Service("v", events=on_event, warm=False, clock=lambda: newest + 100000,
                      notify=lambda s: None)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        assert rounds.wait(120), "no round ended"
        writer = threading.Thread(target=lambda: (fifo.write_text("go\n")), daemon=True)
        writer.start()  # opening the FIFO waits for the alert command to read it
        writer.join(120)
        assert not writer.is_alive(), "the alert command no longer waits: the round waited for it"
    finally:
        service.stop()
        runner.join(300)
    assert not runner.is_alive()
    alert = json.loads(got.read_text())
    assert (alert["item"], alert["new"]) == ("a", "critical")
    assert alert["vault"] == str(vault) and os.path.isabs(alert["vault"])


def damage_keep(vault, item):
    import sqlite3

    db = sqlite3.connect(vault / "vault.db")
    with db:
        assert db.execute("UPDATE policies SET keep = '{not json' WHERE scope = 'item' AND "
                          "name = ?", (item,)).rowcount == 1
    db.close()


def test_a_damaged_policy_is_critical_alerted_once_and_fails_the_round(vault, tmp_path):
    """Before the fix the item was skipped, its RPO health unknown, no
    alert, and --once exited 0."""
    import json

    got = tmp_path / "alerts.jsonl"
    with Vault(vault, writer=True) as v:
        v.set_policy("a", keep={"daily": 3}, alert_commands=[f"cat >> {got}"])
        newest = v.store.points("a")[-1].data_time
    damage_keep(vault, "a")
    for _ in range(2):
        result = Service(vault, warm=False, clock=lambda: newest + 1,
                         notify=lambda s: None).run_once()
        assert "a" in result.failed and "a" not in result.skipped
        assert "keep" in result.failed["a"] and "pydr policy a --clear keep" in result.failed["a"]
        assert result.exit_code() == 14
    alerts = [json.loads(line) for line in got.read_text().splitlines()]
    assert [(a["item"], a["new"]) for a in alerts] == [("a", "critical")]  # once
    assert "pydr policy a --clear keep" in alerts[0]["message"]
    with Vault(vault) as v:
        assert v.store.item("a").rpo_health == "critical"


def test_replication_and_status_go_on_with_a_damaged_keep(vault, tmp_path):
    """apply_retention raised on the damaged keep (replicate, failover's last
    cycle and reprotect exited 14); now retention falls back to the item's
    count and age. `pydr status` shows every other item before exiting 14."""
    import subprocess
    import sys

    src = tmp_path / "b.img"
    src.write_bytes(os.urandom(MiB))
    with Vault(vault, writer=True) as v:
        v.protect("b", [(str(src), str(tmp_path / "rb.img"))])
        v.set_policy("a", keep={"daily": 3})
    damage_keep(vault, "a")
    with Vault(vault, writer=True) as v:
        assert not v.replicate(["a"]).failed
        assert len(v.points("a")) == 2
    exe = os.path.join(os.path.dirname(sys.executable), "pydr")
    r = subprocess.run([exe, "status", "--vault", str(vault)], capture_output=True, text=True,
                       timeout=300, cwd="/tmp")
    assert r.returncode == 14, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("b: ") for line in lines), r.stdout
    assert any(line.startswith("a: ") and "keep" in line for line in lines), r.stdout
    assert "pydr policy a --clear keep" in r.stderr + r.stdout


def test_a_scrape_during_a_held_round_shows_the_rpo_growing_and_the_watchdog_stops(
        vault, tmp_path):
    """Round 1 ends; in round 2 item a's cycle is held (its "started" event
    waits for the test). The service's clock is a fake one: scrapes at two
    instants show the RPO and the health of that instant, not the last
    round's (before the fix: "ok" and the round's RPO until the round
    ended). While the cycle gives no event, the watchdog stops pinging once
    the watchdog time is over (a fake monotonic clock too)."""
    import threading

    with Vault(vault) as v:
        newest = v.store.points("a")[-1].data_time
    now = [newest + 10]  # round 1: a is not due (half its target: 1800 s)
    mono = [1000.0]
    held, release, ended = threading.Event(), threading.Event(), threading.Event()

    def on_event(e):
        if e.operation == "run" and e.kind == "finished":
            ended.set()
        if e.operation == "replicate" and e.kind == "started" and e.item == "a":
            held.set()
            assert release.wait(120)

    service = Service(vault, metrics="127.0.0.1:0", events=on_event, warm=False,
                      clock=lambda: now[0], notify=lambda s: None)
    service._monotonic = lambda: mono[0]
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        assert ended.wait(120)
        first = scrape(service.metrics_port)
        assert first[("pydr_rpo_seconds", "a", None)] == 10
        assert first[("pydr_health", "a", "ok")] == 1
        assert first[("pydr_newest_point_timestamp_seconds", "a", None)] == newest
        assert first[("pydr_last_round_end_timestamp_seconds", None, None)] == newest + 10
        now[0] = newest + 2000  # due now
        service.reload()
        assert held.wait(120)
        assert service._progressing(stall=60)
        seen = scrape(service.metrics_port)
        assert seen[("pydr_rpo_seconds", "a", None)] == 2000
        now[0] = newest + 4000  # past the target (3600), the round still held
        seen = scrape(service.metrics_port)
        assert seen[("pydr_rpo_seconds", "a", None)] == 4000
        assert seen[("pydr_health", "a", "warning")] == 1
        assert seen[("pydr_health", "a", "ok")] == 0
        now[0] = newest + 8000  # past critical (2 x target)
        assert scrape(service.metrics_port)[("pydr_health", "a", "critical")] == 1
        assert seen[("pydr_last_round_end_timestamp_seconds", None, None)] == newest + 10
        mono[0] += 61  # no event of the held cycle for longer than the watchdog time
        assert not service._progressing(stall=60)
    finally:
        release.set()
        service.stop()
        runner.join(300)
    assert not runner.is_alive()
    assert service._progressing(stall=60)  # no cycle runs: idle is progress


def test_an_item_in_a_drill_is_replicated_unless_the_drill_blocks_it(vault, tmp_path,
                                                                      monkeypatch):
    """A drill made as a copy leaves the replicas alone: pydr run goes on
    replicating the item (before the fix: "paused", no alert, however old
    its data). A drill that blocks replication (its point store refuses
    writes under it: qcow2 overlays on the replicas) pauses the item up to
    its critical RPO, then it is "critical", alerted."""
    import json

    from pydr.dr.pointstores import base
    from pydr.errors import InvalidState

    got = tmp_path / "alerts.jsonl"
    with Vault(vault, writer=True) as v:
        v.set_policy("a", alert_commands=[f"cat >> {got}"])
        v.test_failover("a", str(tmp_path / "drill"), method="copy")
        newest = v.store.points("a")[-1].data_time
    result = Service(vault, warm=False, clock=lambda: newest + 2000,
                     notify=lambda s: None).run_once()
    assert result.succeeded == ["a"], result
    assert len(points_of(vault)) == 2
    assert not got.exists()

    def refuse(self, what):
        raise InvalidState(f"{what} would change the drill's disks under it")

    monkeypatch.setattr(base.PointStore, "refuse_writes_under_drill", refuse)
    with Vault(vault) as v:
        newest = v.store.points("a")[-1].data_time
    result = Service(vault, warm=False, clock=lambda: newest + 3000,
                     notify=lambda s: None).run_once()
    assert result.succeeded == [] and result.skipped["a"].startswith("paused")
    with Vault(vault) as v:
        assert v.store.item("a").rpo_health == "paused"
    result = Service(vault, warm=False, clock=lambda: newest + 8000,
                     notify=lambda s: None).run_once()
    assert result.succeeded == []
    [alert] = [json.loads(line) for line in got.read_text().splitlines()]
    assert (alert["new"], alert["item"]) == ("critical", "a")
    assert "drill" in alert["message"] and "blocks replication" in alert["message"]


def points_of(vault):
    with Vault(vault) as v:
        return v.points("a")
