"""`pydr policy`, `pydr alerts`, `pydr protect --rpo ...` and the RPO in
`pydr status`, through the installed command: a bad value exits 2 and
records nothing, an unknown item or group exits 3, --json prints the
documented shapes (docs/JSON.md)."""

import json
import os
import re

import pytest

from conftest import run_cli
from pydr.dr.vault import Vault

KiB = 1 << 10


@pytest.fixture
def vault(tmp_path):
    """A vault with items web and db in group shop, and solo alone."""
    directory = tmp_path / "v"
    assert run_cli("vault", "init", directory).returncode == 0
    for name, group in (("web", "shop"), ("db", "shop"), ("solo", None)):
        src = tmp_path / f"{name}.img"
        src.write_bytes(os.urandom(64 * KiB))
        extra = ["--group", group] if group else []
        r = run_cli("protect", name, "--disk", f"{src}={tmp_path / (name + '-r.img')}",
                    "--vault", directory, *extra)
        assert r.returncode == 0, r.stderr
    return directory


def cli(vault, *args):
    return run_cli(*args, "--vault", vault)


def policy_json(vault, *args):
    r = cli(vault, "policy", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stored(vault):
    with Vault(vault) as v:
        return [tuple(getattr(r, c) for c in r.__slots__) for r in v.store.policy_rows()]


def test_set_and_show_a_policy_with_its_sources(vault):
    r = cli(vault, "policy", "shop", "--group", "--rpo", "5m", "--keep-within", "1h",
            "--keep-daily", "30", "--priority", "7", "--bwlimit", "10M",
            "--bwlimit-window", "08:00-18:00=1M", "--bwlimit-window", "22:00-06:00=100M",
            "--alert-command", "logger -t pydr")
    assert r.returncode == 0, r.stderr
    assert "group shop" in r.stdout.decode()
    assert cli(vault, "policy", "web", "--rpo", "30s", "--keep-hourly", "24").returncode == 0
    d = policy_json(vault, "web")
    assert (d["type"], d["version"], d["name"], d["scope"]) == ("policy", 1, "web", "item")
    p = d["policy"]
    assert (p["target_rpo"], p["rpo_critical"], p["rpo_critical_effective"]) == (30.0, None, 60.0)
    # --keep-hourly set the item's own tiers; the group's keep is not merged into them
    assert p["keep"] == {"within": None, "hourly": 24, "daily": 0, "weekly": 0, "monthly": 0}
    assert (p["priority"], p["bwlimit"]) == (7, 10 << 20)
    assert p["bwlimit_windows"] == [["08:00", "18:00", 1 << 20], ["22:00", "06:00", 100 << 20]]
    assert p["alert_commands"] == ["logger -t pydr"]
    assert d["sources"] == {"target_rpo": "item", "rpo_critical": "default",
                            "app_consistent_every": "default", "keep": "item",
                            "bwlimit": "group", "bwlimit_windows": "group",
                            "priority": "group", "alert_commands": "group",
                            "lock_days": "default", "lock_mode": "default"}
    text = cli(vault, "policy", "web").stdout.decode()
    assert re.search(r"target RPO\s+30 s\s+\(item\)", text)
    assert re.search(r"critical RPO\s+60 s\s+\(default: twice the target\)", text)
    assert re.search(r"priority\s+7\s+\(group\)", text)
    # the other member has the group's own; --keep-daily added to the group's tiers
    assert cli(vault, "policy", "shop", "--group", "--keep-daily", "7").returncode == 0
    db = policy_json(vault, "db")["policy"]
    assert db["target_rpo"] == 300.0 and db["keep"]["within"] == 3600.0 and db["keep"]["daily"] == 7
    assert policy_json(vault, "solo")["sources"] == dict.fromkeys(d["sources"], "default")


@pytest.mark.parametrize("args", [
    ["--rpo", "0"], ["--rpo", "soon"], ["--rpo=-5m"], ["--rpo-critical", "1s", "--rpo", "1m"],
    ["--priority", "1001"], ["--priority", "high"], ["--keep-hourly", "-1"],
    ["--keep-daily", "two"], ["--keep-within", "0s"], ["--bwlimit", "0"], ["--bwlimit", "fast"],
    ["--bwlimit-window", "8-18=1M"], ["--bwlimit-window", "08:00-08:00=1M"],
    ["--alert-command", ""], ["--app-consistent-every", "never"], ["--clear", "colour"]])
def test_a_bad_value_exits_2_and_changes_nothing(vault, args):
    assert cli(vault, "policy", "web", "--rpo", "10m", "--priority", "3").returncode == 0
    before = stored(vault)
    for target in (["web"], ["shop", "--group"]):
        r = cli(vault, "policy", *target, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.decode().startswith("pydr: ") and "Traceback" not in r.stderr.decode()
        assert args[0].split("=")[0] in r.stderr.decode()  # the message names the option
    assert stored(vault) == before


def test_a_critical_rpo_below_a_members_target_exits_2(vault):
    assert cli(vault, "policy", "web", "--rpo-critical", "90s").returncode == 0
    before = stored(vault)
    r = cli(vault, "policy", "shop", "--group", "--rpo", "2m")
    assert r.returncode == 2 and b"'web'" in r.stderr
    assert stored(vault) == before


def test_unknown_names_exit_3(vault):
    for args in (["policy", "nobody"], ["policy", "nobody", "--rpo", "1m"],
                 ["policy", "nogroup", "--group"], ["policy", "web", "--group", "--rpo", "1m"],
                 ["alerts", "nobody"]):
        r = cli(vault, *args)
        assert r.returncode == 3, (args, r.stderr)
        assert b"nobody" in r.stderr or b"nogroup" in r.stderr or b"web" in r.stderr
    assert stored(vault) == []


def test_clear_fields_and_all(vault):
    assert cli(vault, "policy", "shop", "--group", "--rpo", "10m").returncode == 0
    assert cli(vault, "policy", "web", "--rpo", "1m", "--priority", "4",
               "--alert-command", "true").returncode == 0
    d = policy_json(vault, "web", "--clear", "rpo", "--clear", "alert-commands")
    assert d["policy"]["target_rpo"] == 600.0 and d["sources"]["target_rpo"] == "group"
    assert d["policy"]["alert_commands"] == [] and d["policy"]["priority"] == 4
    # clearing and setting in one command: one change
    d = policy_json(vault, "web", "--clear", "priority", "--rpo", "2m")
    assert (d["policy"]["priority"], d["policy"]["target_rpo"]) == (0, 120.0)
    d = policy_json(vault, "web", "--clear", "all")
    assert set(d["sources"].values()) == {"group", "default"}
    with Vault(vault) as v:
        assert v.store.policy_row("item", "web") is None


def test_protect_takes_the_policy_options(vault, tmp_path):
    src = tmp_path / "new.img"
    src.write_bytes(os.urandom(64 * KiB))
    disk = f"{src}={tmp_path / 'new-r.img'}"
    for bad in (["--rpo", "0"], ["--rpo", "1m", "--rpo-critical", "30s"], ["--priority", "x"],
                ["--keep-weekly", "-3"]):
        r = cli(vault, "protect", "new", "--disk", disk, *bad)
        assert r.returncode == 2, (bad, r.stderr)
        with Vault(vault) as v:
            assert "new" not in v.items()  # refused before the item was recorded
    r = cli(vault, "protect", "new", "--disk", disk, "--rpo", "1h", "--rpo-critical", "3h",
            "--priority", "-5", "--keep-within", "30m", "--keep-monthly", "12")
    assert r.returncode == 0, r.stderr
    p = policy_json(vault, "new")["policy"]
    assert (p["target_rpo"], p["rpo_critical"], p["priority"]) == (3600.0, 10800.0, -5)
    assert p["keep"] == {"within": 1800.0, "hourly": 0, "daily": 0, "weekly": 0, "monthly": 12}


def test_status_shows_the_target_and_the_rpo_health(vault):
    assert cli(vault, "policy", "solo", "--rpo", "1h").returncode == 0
    st = json.loads(cli(vault, "status", "solo", "--json").stdout)
    # no point yet, protected less than one target ago: still initial
    assert (st["target_rpo"], st["rpo_health"]) == (3600.0, "unknown")
    text = cli(vault, "status", "solo").stdout.decode()
    assert "no point yet (target 1 h 0 min, unknown)" in text
    assert cli(vault, "replicate", "solo").returncode == 0
    text = cli(vault, "status").stdout.decode()
    assert re.search(r"^solo: .*, RPO \d+ s \(target 1 h 0 min, ok\)$", text, re.M), text
    web = next(line for line in text.splitlines() if line.startswith("web:"))
    assert "target" not in web  # no target: no RPO health
    statuses = json.loads(cli(vault, "status", "--json").stdout)
    by_name = {s["item"]: s for s in statuses}
    assert (by_name["solo"]["target_rpo"], by_name["solo"]["rpo_health"]) == (3600.0, "ok")
    assert (by_name["web"]["target_rpo"], by_name["web"]["rpo_health"]) == (None, "unknown")


def test_alerts_lists_the_log(vault):
    with Vault(vault, writer=True) as v:
        with v.store.transaction():
            v.store.add_alert(1000.0, "web", None, "ok", 2.0, 10.0, "first")
            v.store.add_alert(2000.0, "db", "ok", "warning", 12.0, 10.0,
                              "ok -> warning: RPO 12 s > target 10 s")
            v.store.add_alert(3000.0, "web", "ok", "critical", None, 10.0, "no point")
    r = cli(vault, "alerts", "--json")
    assert r.returncode == 0, r.stderr
    every = json.loads(r.stdout)
    assert [a["id"] for a in every] == [1, 2, 3]
    assert every[1] == {"type": "alert", "version": 1, "id": 2,
                        "at": "1970-01-01T00:33:20.000000Z", "item": "db", "old": "ok",
                        "new": "warning", "rpo_seconds": 12.0, "target_rpo": 10.0,
                        "message": "ok -> warning: RPO 12 s > target 10 s"}
    assert [a["id"] for a in json.loads(cli(vault, "alerts", "web", "--json").stdout)] == [1, 3]
    assert [a["id"] for a in json.loads(
        cli(vault, "alerts", "--since", "2000", "--json").stdout)] == [2, 3]
    assert [a["id"] for a in json.loads(
        cli(vault, "alerts", "--since", "1970-01-01T00:40:00Z", "--json").stdout)] == [3]
    assert [a["id"] for a in json.loads(
        cli(vault, "alerts", "--limit", "1", "--json").stdout)] == [3]
    assert json.loads(cli(vault, "alerts", "--since", "1h", "--json").stdout) == []
    text = cli(vault, "alerts").stdout.decode().splitlines()
    assert len(text) == 3 and "db" in text[1]
    assert text[1].endswith("ok -> warning  RPO 12 s, target 10 s")  # the message says no more
    assert text[2].endswith("ok -> critical  no point, target 10 s: no point")
    for bad in (["--since", "yesterday"], ["--since", "0s"], ["--limit", "-1"],
                ["--limit", "many"]):
        r = cli(vault, "alerts", *bad)
        assert r.returncode == 2, (bad, r.stderr)


def test_alerts_text_is_one_line_that_does_not_round(vault):
    with Vault(vault, writer=True) as v:
        with v.store.transaction():
            v.store.add_alert(1000.0, "vm", "ok", "warning", 5.24, 5.0,
                              "ok -> warning: RPO 5.2 s > target 5 s")
            v.store.add_alert(2000.0, "vm", "warning", "critical", 15.5, 5.0,
                              "warning -> critical: RPO 15.5 s > critical 15 s")
            v.store.add_alert(3000.0, "vm", "critical", "ok", 0.4, 2.5,
                              "critical -> ok: RPO 0.4 s <= target 2.5 s")
    text = cli(vault, "alerts").stdout.decode().splitlines()
    assert text[0].endswith("  vm               ok -> warning  RPO 5.2 s, target 5 s"), text
    assert text[1].endswith("warning -> critical  RPO 16 s, target 5 s: "
                            "RPO 15.5 s > critical 15 s"), text  # it says more: the threshold
    assert text[2].endswith("critical -> ok  RPO 0.4 s, target 2.5 s"), text
    assert all(line.count("->") == 1 for line in text)


def test_alerts_offers_no_lock_wait():
    """A reader never waits for the writer's lock: --lock-wait is not its option."""
    r = run_cli("alerts", "--help")
    assert b"--lock-wait" not in r.stdout
    text = " ".join(r.stdout.decode().split())
    assert "between warning and critical" in text and "unknown, paused" not in text
    assert run_cli("alerts", "--lock-wait", "5", "--vault", "/nonexistent").returncode == 2


@pytest.mark.parametrize("cmd", [["policy"], ["alerts"], ["protect"], ["status"]])
def test_help_reads_like_a_man_page(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0
    text = r.stdout.decode()
    assert "usage: pydr" in text and "examples:" in text and "exit status" in text
    if cmd == ["protect"]:
        assert "--rpo" in text and "--keep-hourly" in text


def test_a_damaged_policy_is_reported_and_cleared_from_the_command_line(vault):
    import sqlite3

    assert cli(vault, "policy", "web", "--rpo", "1m", "--keep-daily", "7").returncode == 0
    db = sqlite3.connect(vault / "vault.db")
    db.execute("UPDATE policies SET keep='{broken' WHERE name='web'")
    db.commit()
    db.close()
    for args in (["policy", "web"], ["status", "web"], ["policy", "web", "--keep-daily", "3"]):
        r = cli(vault, *args)
        assert r.returncode == 14, (args, r.stderr)  # the vault's damage, never a bug (1)
        assert b"keep" in r.stderr and b"'pydr policy web --clear keep' removes it" in r.stderr
    r = cli(vault, "policy", "web", "--clear", "keep")
    assert r.returncode == 0, r.stderr
    assert policy_json(vault, "web")["policy"]["keep"] is None
    assert policy_json(vault, "web")["policy"]["target_rpo"] == 60.0


def test_status_text_shows_the_next_retry_and_its_attempt(vault):
    """docs/SERVICE.md: attempts and next_retry are shown by pydr status."""
    import time as _time
    when = 1_900_000_000.0
    with Vault(vault, writer=True) as v:
        v.set_item("solo", attempts=2, next_retry=when, health="warning", last_error="boom")
    line = next(s for s in cli(vault, "status").stdout.decode().splitlines()
                if s.startswith("solo:"))
    assert f"retry at {_time.strftime('%H:%M:%S', _time.localtime(when))} (attempt 3)" in line
    other = next(s for s in cli(vault, "status").stdout.decode().splitlines()
                 if s.startswith("web:"))
    assert "retry" not in other
