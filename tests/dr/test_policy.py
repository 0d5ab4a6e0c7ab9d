"""Protection policies (schema 11, pydr.dr.policy): what `pydr run` keeps
an item at. Every value is checked before anything is recorded; an item's
effective policy takes each field from its own policy, else its group's,
else the default; a stored value someone damaged is reported, never used.
RPO health is measured at a given `now`, never by waiting."""

import datetime
import os
import sqlite3
import time

import pytest

from pydr.dr import policy as P
from pydr.dr import report, schema
from pydr.dr.results import AlertInfo, ItemStatus, utc
from pydr.dr.rpo import rpo_facts
from pydr.dr.store import redact_argv
from pydr.dr.tiers import Tiers
from pydr.dr.vault import Vault, init_vault
from pydr.errors import InvalidArgument, UnknownName, VaultError

KiB = 1 << 10
MiB = 1 << 20


def vault_with(tmp_path, items=(("web", "shop"), ("db", "shop"), ("solo", None))):
    """A vault protecting `items` ((name, group)), each with one small disk."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        for name, group in items:
            src = tmp_path / f"{name}.img"
            src.write_bytes(os.urandom(64 * KiB))
            v.protect(name, [(str(src), str(tmp_path / f"{name}-r.img"))], group=group)
    return tmp_path / "v"


def rows(v):
    return [tuple(getattr(r, c) for c in r.__slots__) for r in v.store.policy_rows()]


# -- parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0),
    ("1w", 604800.0), ("1.5h", 5400.0), (" 10S ", 10.0), ("0.5", 0.5)])
def test_durations(text, seconds):
    assert P.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5", "5x", "m", "1e3", "nan", "inf",
                                  "5 m s", "99999d", "1h30m"])
def test_bad_durations_are_refused(text):
    with pytest.raises(InvalidArgument):
        P.parse_duration(text)


@pytest.mark.parametrize("text, rate", [
    ("1", 1), ("512K", 512 * KiB), ("10M", 10 * MiB), ("1G", 1 << 30), ("1.5M", 3 * MiB // 2),
    ("10MiB/s", 10 * MiB), ("64kb", 64 * KiB)])
def test_rates(text, rate):
    assert P.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "0", "0M", "-1M", "ten", "10X", "0.0001"])
def test_bad_rates_are_refused(text):
    with pytest.raises(InvalidArgument):
        P.parse_rate(text)


def test_windows():
    assert P.parse_window("08:00-18:00=10M") == ("08:00", "18:00", 10 * MiB)
    assert P.parse_window("22:00-06:00=100M") == ("22:00", "06:00", 100 * MiB)  # wraps


@pytest.mark.parametrize("text", ["08:00-18:00", "08:00=10M", "8:00-18:00=10M",
                                  "08:00-24:00=10M", "08:60-18:00=1M", "08:00-08:00=1M",
                                  "08:00-18:00=0", "a-b=1M", "08:00-18:00=10M=1"])
def test_bad_windows_are_refused(text):
    with pytest.raises(InvalidArgument):
        P.parse_window(text)


def local(hour, minute):
    """Epoch seconds of today's `hour`:`minute` in local time (bwlimit_at
    reads windows in local time, whatever the machine's zone)."""
    today = datetime.date.today()
    return time.mktime((today.year, today.month, today.day, hour, minute, 0, 0, 0, -1))


def test_bwlimit_at_picks_the_window_the_time_falls_in():
    policy = P.Policy(bwlimit=50,
                      bwlimit_windows=(("08:00", "18:00", 10), ("22:00", "06:00", 99)))
    assert policy.bwlimit_at(local(8, 0)) == 10       # a window's start is in it
    assert policy.bwlimit_at(local(17, 59)) == 10
    assert policy.bwlimit_at(local(18, 0)) == 50      # its end is not
    assert policy.bwlimit_at(local(23, 30)) == 99     # wrapping midnight: both sides
    assert policy.bwlimit_at(local(5, 59)) == 99
    assert policy.bwlimit_at(local(6, 0)) == 50
    assert P.Policy().bwlimit_at(local(12, 0)) is None


def test_critical_after_and_to_dict():
    assert P.Policy().critical_after() is None
    assert P.Policy(target_rpo=10.0).critical_after() == 20.0
    assert P.Policy(target_rpo=10.0, rpo_critical=15.0).critical_after() == 15.0
    d = P.Policy(target_rpo=10.0, keep=Tiers(within=60.0, hourly=3),
                 bwlimit_windows=(("08:00", "18:00", 5),), alert_commands=("a",)).to_dict()
    assert d["target_rpo"] == 10.0 and d["rpo_critical"] is None
    assert d["rpo_critical_effective"] == 20.0
    assert d["keep"] == {"within": 60.0, "hourly": 3, "daily": 0, "weekly": 0, "monthly": 0}
    assert d["bwlimit_windows"] == [["08:00", "18:00", 5]] and d["alert_commands"] == ["a"]


@pytest.mark.parametrize("field, value", [
    ("target_rpo", 0), ("target_rpo", -1.0), ("target_rpo", float("nan")), ("target_rpo", True),
    ("target_rpo", "soon"), ("rpo_critical", "0s"), ("app_consistent_every", [1]),
    ("keep", {"hourly": -1}), ("keep", {"yearly": 1}), ("keep", {"within": 0}), ("keep", 5),
    ("bwlimit", 0), ("bwlimit", 1.5), ("bwlimit", "fast"), ("bwlimit_windows", ["08-18=1M"]),
    ("bwlimit_windows", [("08:00", "18:00", 0)]), ("priority", 1001), ("priority", -1001),
    ("priority", 1.0), ("priority", "high"), ("priority", True), ("alert_commands", [""]),
    ("alert_commands", ["  "]), ("alert_commands", ["echo\0rm -rf /"]),
    ("alert_commands", [3]), ("colour", "blue")])
def test_every_bad_value_is_refused_and_nothing_is_recorded(tmp_path, field, value):
    with Vault(vault_with(tmp_path), writer=True) as v:
        v.set_policy("web", target_rpo=60)
        before = rows(v)
        with pytest.raises(InvalidArgument):
            v.set_policy("web", **{field: value})
        with pytest.raises(InvalidArgument):
            v.set_policy("shop", group=True, **{field: value})
        assert rows(v) == before


# -- resolution ------------------------------------------------------------------------

def test_item_fields_override_the_group_field_by_field(tmp_path):
    with Vault(vault_with(tmp_path), writer=True) as v:
        v.set_policy("shop", group=True, target_rpo="5m", priority=7,
                     keep={"within": 3600, "daily": 30}, bwlimit="10M",
                     alert_commands=["logger shop"])
        v.set_policy("web", target_rpo="30s", bwlimit_windows=["08:00-18:00=1M"])
        web, sources = v.policy_sources("web")
        assert web == P.Policy(target_rpo=30.0, priority=7, keep=Tiers(within=3600.0, daily=30),
                               bwlimit=10 * MiB, bwlimit_windows=(("08:00", "18:00", MiB),),
                               alert_commands=("logger shop",))
        assert sources == {"target_rpo": "item", "rpo_critical": "default",
                           "app_consistent_every": "default", "keep": "group",
                           "bwlimit": "group", "bwlimit_windows": "item", "priority": "group",
                           "alert_commands": "group", "lock_days": "default",
                           "lock_mode": "default"}
        # the other member has the group's; an item outside any group, the defaults
        assert v.policy("db").target_rpo == 300.0 and v.policy("db").bwlimit_windows == ()
        assert v.policy("solo") == P.Policy() and P.effective_policy(v.store, "solo") == P.Policy()
        assert v.policy("shop", group=True).target_rpo == 300.0
        assert P.effective_policies(v.store) == {n: v.policy(n) for n in ("db", "solo", "web")}


def test_fields_not_given_stay_and_none_clears_one(tmp_path):
    with Vault(vault_with(tmp_path), writer=True) as v:
        v.set_policy("web", target_rpo=60, priority=3)
        v.set_policy("web", bwlimit=1000)
        assert (v.policy("web").target_rpo, v.policy("web").priority,
                v.policy("web").bwlimit) == (60.0, 3, 1000)
        v.set_policy("web", priority=None)
        assert v.policy_sources("web")[1]["priority"] == "default"
        assert v.policy("web").priority == 0


def test_clear_policy(tmp_path):
    with Vault(vault_with(tmp_path), writer=True) as v:
        v.set_policy("shop", group=True, target_rpo=600)
        v.set_policy("web", target_rpo=60, priority=5)
        assert v.clear_policy("web", ["target_rpo"]).target_rpo == 600.0  # the group's again
        assert v.policy("web").priority == 5
        v.clear_policy("web")  # all: the row goes
        assert v.store.policy_row("item", "web") is None
        with pytest.raises(InvalidArgument, match="colour"):
            v.clear_policy("web", ["colour"])


def test_unknown_names(tmp_path):
    with Vault(vault_with(tmp_path), writer=True) as v:
        with pytest.raises(UnknownName):
            v.set_policy("nobody", target_rpo=60)
        with pytest.raises(UnknownName):
            v.set_policy("nogroup", group=True, target_rpo=60)  # a group with no members
        with pytest.raises(UnknownName):
            v.set_policy("web", group=True, target_rpo=60)  # an item is not a group
        with pytest.raises(UnknownName):
            v.policy("nobody")
        with pytest.raises(UnknownName):
            v.policy("nogroup", group=True)
        with pytest.raises(UnknownName):
            v.clear_policy("nobody")
        assert v.store.policy_rows() == []


def test_rpo_critical_is_checked_against_the_effective_target(tmp_path):
    """Of the policy itself and of every item it applies to: a group's new
    target above a member's own critical RPO is refused, and nothing changes."""
    with Vault(vault_with(tmp_path), writer=True) as v:
        with pytest.raises(InvalidArgument, match="rpo-critical"):
            v.set_policy("web", target_rpo=60, rpo_critical=30)
        v.set_policy("shop", group=True, target_rpo=60)
        with pytest.raises(InvalidArgument, match="'web'"):
            v.set_policy("web", rpo_critical=30)  # below the group's target
        v.set_policy("web", rpo_critical=90)
        before = rows(v)
        with pytest.raises(InvalidArgument, match="'web'"):
            v.set_policy("shop", group=True, target_rpo=120)  # web would be critical < target
        assert rows(v) == before
        v.set_policy("shop", group=True, target_rpo=90)  # equal is fine
        assert v.policy("web").critical_after() == 90.0 and v.policy("db").critical_after() == 180.0


def test_a_reader_cannot_set_a_policy(tmp_path):
    directory = vault_with(tmp_path)
    with Vault(directory) as v:
        with pytest.raises(VaultError, match="reader"):
            v.set_policy("web", target_rpo=60)
        with pytest.raises(VaultError, match="reader"):
            v.clear_policy("web")
        assert v.store.policy_rows() == []


@pytest.mark.parametrize("column, stored", [
    ("target_rpo", -5.0), ("keep", "{not json"), ("keep", '{"hourly": -2}'),
    ("bwlimit_windows", '[["25:00", "06:00", 1]]'), ("alert_commands", '"echo"'),
    ("alert_commands", '[""]'), ("priority", 5000)])
def test_a_damaged_stored_policy_is_reported_not_used(tmp_path, column, stored):
    directory = vault_with(tmp_path)
    with Vault(directory, writer=True) as v:
        v.set_policy("web", target_rpo=60)
    db = sqlite3.connect(directory / "vault.db")
    db.execute(f"UPDATE policies SET {column}=? WHERE name='web'", (stored,))
    db.commit()
    db.close()
    with Vault(directory) as v:
        with pytest.raises(VaultError, match=f"{column}") as err:
            v.policy("web")
        assert "'web'" in str(err.value) and str(directory) in str(err.value)
        with pytest.raises(VaultError):
            v.status("web")
        assert v.policy("db") == P.Policy()  # another item's policy is read as it is
        assert err.value.hint is not None and "pydr policy web --clear" in err.value.hint
    with Vault(directory, writer=True) as v:  # the way out: clear (or set) the damaged field
        if column == "target_rpo":
            v.set_policy("web", target_rpo=30)
            assert v.policy("web") == P.Policy(target_rpo=30.0)
        else:
            v.clear_policy("web", [column])
            assert v.policy("web") == P.Policy(target_rpo=60.0)


# -- protect(policy=) ----------------------------------------------------------------------

def test_protect_records_the_policy_and_refuses_a_bad_one_before_the_item(tmp_path):
    init_vault(tmp_path / "v")
    src = tmp_path / "a.img"
    src.write_bytes(os.urandom(64 * KiB))
    with Vault(tmp_path / "v", writer=True) as v:
        for bad in ({"target_rpo": "0s"}, {"target_rpo": 60, "rpo_critical": 10},
                    {"priority": 5000}, {"colour": 1}, {"keep": {"daily": -1}}):
            with pytest.raises(InvalidArgument):
                v.protect("vm", [(str(src), str(tmp_path / "r.img"))], policy=bad)
            assert v.items() == [] and v.store.policy_rows() == []
        st = v.protect("vm", [(str(src), str(tmp_path / "r.img"))], group="g",
                       policy={"target_rpo": "1h", "keep": {"hourly": 24}, "priority": 3})
        assert isinstance(st, ItemStatus) and st.target_rpo == 3600.0
        assert v.policy("vm") == P.Policy(target_rpo=3600.0, keep=Tiers(hourly=24), priority=3)
        # a new member is checked with its group's policy
        v.set_policy("g", group=True, target_rpo=600)
        with pytest.raises(InvalidArgument):
            v.protect("vm2", [(str(src), str(tmp_path / "r2.img"))], group="g",
                      policy={"rpo_critical": 60})
        assert v.items() == ["vm"]


def test_protect_records_the_item_and_its_policy_in_one_transaction(tmp_path, monkeypatch):
    """A failure while the policy is written (here: injected) leaves neither
    the item nor its policy: running protect again is the way out."""
    from pydr.dr.store import Store

    init_vault(tmp_path / "v")
    src = tmp_path / "a.img"
    src.write_bytes(os.urandom(64 * KiB))
    real = Store.put_policy

    def failing(self, *args, **kwargs):
        real(self, *args, **kwargs)  # written, then the transaction fails
        raise OSError(5, "injected I/O error")

    with Vault(tmp_path / "v", writer=True) as v:
        monkeypatch.setattr(Store, "put_policy", failing)
        with pytest.raises(OSError, match="injected"):
            v.protect("vm", [(str(src), str(tmp_path / "r.img"))], policy={"target_rpo": 60})
        assert v.items() == [] and v.store.policy_rows() == []
        monkeypatch.setattr(Store, "put_policy", real)
        v.protect("vm", [(str(src), str(tmp_path / "r.img"))], policy={"target_rpo": 60})
        assert v.policy("vm").target_rpo == 60.0


# -- RPO health in the status --------------------------------------------------------------

def health_at(v, name, now):
    st = report.item_status(v.store, name, now=now)
    return st.target_rpo, st.rpo_health


def test_rpo_health_by_the_achieved_rpo(tmp_path):
    with Vault(vault_with(tmp_path, [("vm", None)]), writer=True) as v:
        created = v.item("vm").created
        assert health_at(v, "vm", created + 5) == (None, "unknown")  # no target
        v.set_policy("vm", target_rpo=10)
        # no point yet: initial for one target, then overdue
        assert health_at(v, "vm", created + 10) == (10.0, "unknown")
        assert health_at(v, "vm", created + 11) == (10.0, "warning")
        assert health_at(v, "vm", created + 21) == (10.0, "critical")
        v.replicate("vm")
        at = rpo_facts(v.store, "vm").latest_point_at
        assert health_at(v, "vm", at + 3) == (10.0, "ok")
        assert health_at(v, "vm", at + 10) == (10.0, "ok")
        assert health_at(v, "vm", at + 10.5) == (10.0, "warning")
        assert health_at(v, "vm", at + 20.5) == (10.0, "critical")
        v.set_policy("vm", rpo_critical=60)
        assert health_at(v, "vm", at + 30) == (10.0, "warning")
        assert health_at(v, "vm", at + 61) == (10.0, "critical")
        st = v.status("vm")
        assert st.to_dict()["target_rpo"] == 10.0 and st.to_dict()["rpo_health"] in ("ok", "warning", "critical")


@pytest.mark.parametrize("state", ["failing-over", "failed-over", "committing",
                                   "failover-committed"])
def test_a_failed_over_item_is_paused_and_keeps_its_policy(tmp_path, state):
    with Vault(vault_with(tmp_path, [("vm", None)]), writer=True) as v:
        v.set_policy("vm", target_rpo=10)
        with v.store.transaction():
            v.store.set_item("vm", state=state)
        assert health_at(v, "vm", v.item("vm").created + 1000) == (10.0, "paused")
        assert v.policy("vm").target_rpo == 10.0


def test_an_item_in_a_drill_is_judged_as_pydr_run_replicates_it(tmp_path, monkeypatch):
    """A drill that leaves the replicas alone: pydr run replicates the item,
    its health follows the RPO. A drill that blocks replication (its point
    store refuses writes under it): paused up to the critical RPO, then
    critical (review 23, finding 6; before: paused whatever the RPO)."""
    from pydr.dr.pointstores import base
    from pydr.errors import InvalidState

    with Vault(vault_with(tmp_path, [("vm", None)]), writer=True) as v:
        v.set_policy("vm", target_rpo=10)
        v.replicate("vm")
        v.test_failover("vm", str(tmp_path / "drill"))
        cut = v.store.points("vm")[-1].data_time
        assert health_at(v, "vm", cut + 15) == (10.0, "warning")
        assert health_at(v, "vm", cut + 1000) == (10.0, "critical")

        def refuse(self, what):
            raise InvalidState(f"{what} would change the drill's disks")

        monkeypatch.setattr(base.PointStore, "refuse_writes_under_drill", refuse)
        assert health_at(v, "vm", cut + 15) == (10.0, "paused")
        assert health_at(v, "vm", cut + 1000) == (10.0, "critical")
        monkeypatch.undo()
        v.cleanup_test_failover("vm")
        assert health_at(v, "vm", cut + 1000) == (10.0, "critical")


# -- alerts --------------------------------------------------------------------------------

def test_alerts_oldest_first_by_item_since_and_limit(tmp_path):
    with Vault(vault_with(tmp_path), writer=True) as v:
        with v.store.transaction():
            v.store.add_alert(100.0, "web", None, "ok", 1.0, 10.0, "first")
            v.store.add_alert(200.0, "db", "ok", "warning", 12.0, 10.0, "ok -> warning")
            v.store.add_alert(300.0, "web", "ok", "critical", None, 10.0, "no point")
        every = v.alerts()
        assert [a.message for a in every] == ["first", "ok -> warning", "no point"]
        assert [a.id for a in v.alerts("web")] == [1, 3]
        assert [a.id for a in v.alerts(since=200.0)] == [2, 3]
        assert [a.id for a in v.alerts(since=utc(250.0))] == [3]
        assert [a.id for a in v.alerts(limit=2)] == [2, 3]
        assert v.alerts("solo") == [] and v.alerts(limit=0) == []
        a = every[1]
        assert isinstance(a, AlertInfo) and a.at == utc(200.0)
        assert (a.item, a.old, a.new, a.rpo_seconds, a.target_rpo) == \
            ("db", "ok", "warning", 12.0, 10.0)
        d = a.to_dict()
        assert (d["type"], d["version"], d["at"]) == ("alert", 1, "1970-01-01T00:03:20.000000Z")
        assert AlertInfo.from_dict(d) == a
        with pytest.raises(UnknownName):
            v.alerts("nobody")
        for bad in ({"limit": -1}, {"limit": 1.5}, {"since": "yesterday"},
                    {"since": datetime.datetime(2026, 1, 1)}):
            with pytest.raises(InvalidArgument):
                v.alerts(**bad)


def test_the_lock_line_hides_alert_commands():
    assert redact_argv(["pydr", "policy", "vm", "--alert-command", "curl -u me:S3CRET x",
                        "--alert-command=page S3CRET", "--rpo", "30s"]) == \
        ["pydr", "policy", "vm", "--alert-command", "<hook set>",
         "--alert-command=<hook set>", "--rpo", "30s"]


# -- older vaults ------------------------------------------------------------------------

def test_a_schema_10_vault_is_migrated_and_keeps_working(tmp_path):
    """A vault set back to schema 10 (the policy tables and items.rpo_health
    dropped) opens; its items have no policy, and one can be set."""
    directory = vault_with(tmp_path, [("vm", None)])
    with Vault(directory, writer=True) as v:
        v.replicate("vm")
    db = sqlite3.connect(directory / "vault.db")
    db.execute("ALTER TABLE items DROP COLUMN rpo_health")
    for table in ("policies", "alerts", "doomed_files", "object_stores"):  # 11's and 12's
        db.execute(f"DROP TABLE {table}")
    for column in ("version", "retain_until"):  # 12's
        db.execute(f"ALTER TABLE object_indexes DROP COLUMN {column}")
    db.execute("PRAGMA user_version=10")
    db.commit()
    db.close()
    with Vault(directory, writer=True) as v:
        assert v.db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 13
        assert v.item("vm").rpo_health is None and v.alerts() == []
        assert v.policy("vm") == P.Policy()
        st = v.status("vm")
        assert (st.target_rpo, st.rpo_health, st.point_count) == (None, "unknown", 1)
        v.set_policy("vm", target_rpo="1h")
        v.replicate("vm")
        assert v.status("vm").rpo_health == "ok" and v.status("vm").point_count == 2
        assert v.store.object_store("s3://b/p") is None  # 12's table is there, empty
        columns = {r[1] for r in v.db.execute("PRAGMA table_info(object_indexes)")}
        assert {"version", "retain_until"} <= columns
        columns = {r[1] for r in v.db.execute("PRAGMA table_info(policies)")}
        assert {"lock_days", "lock_mode"} <= columns


# -- pydr vault check ----------------------------------------------------------------------

def test_vault_check_knows_the_schema_11_tables(tmp_path):
    from pydr.dr.check import check_vault

    directory = vault_with(tmp_path)
    with Vault(directory, writer=True) as v:
        v.replicate("solo")
        (tmp_path / "solo.img").write_bytes(os.urandom(64 * KiB))
        v.replicate("solo")
        step = v.store.all_steps()[0].path
        v.set_policy("web", target_rpo=60, alert_commands=["true"])
        v.set_policy("shop", group=True, priority=2)
        with v.store.transaction():
            v.store.add_alert(1.0, "web", None, "ok", 1.0, 60.0, "fine")
            v.store.set_rpo_health("web", "ok")
        assert os.path.dirname(os.path.dirname(step)) == os.path.join(directory, "undo")
        doomed = os.path.join(os.path.dirname(step), "99-0.undo")
        with open(doomed, "wb") as f:
            f.write(b"an old step a merge let go")
        with v.store.transaction():
            v.store.add_doomed("solo", doomed)
    assert check_vault(directory).problems == []  # a doomed file is not an unknown one
    db = sqlite3.connect(directory / "vault.db")
    db.execute("INSERT INTO policies(scope, name, target_rpo) VALUES ('item', 'ghost', 5)")
    db.execute("INSERT INTO policies(scope, name, priority) VALUES ('group', 'gone', 1)")
    db.execute("UPDATE policies SET bwlimit_windows='[[\"08:00\"]]' WHERE name='web'")
    db.execute("INSERT INTO alerts(at, item, new, message) VALUES (2, 'ghost', 'ok', 'x')")
    db.execute("INSERT INTO doomed_files VALUES ('ghost', '/nowhere')")
    db.execute("UPDATE items SET rpo_health='splendid' WHERE name='db'")
    db.commit()
    db.close()
    found = {(p.kind, p.where) for p in check_vault(directory).problems}
    assert found == {("rows", "item policy ghost"), ("rows", "group policy gone"),
                     ("policy", "item policy web"), ("rows", "item ghost"),
                     ("rows", "item db")}
    report = check_vault(directory)
    assert sum(p.where == "item ghost" for p in report.problems) == 2  # its alerts, its files
    assert any("bwlimit_windows" in p.message for p in report.problems)
