"""RPO health (pydr.dr.health): every rule of the design with a fake now
(the clock is an argument, never waited on), on real vaults whose items
were protected, replicated, drilled and failed over by the real
workflow; and the transitions pydr run records: each change once, an
unchanged health nothing, a recovery to ok a transition, a pause none."""

import os

import pytest

from pydr.dr import health
from pydr.dr.health import HEALTHS, Transition, check_transitions, rpo_health
from pydr.dr.policy import Policy
from pydr.dr.rpo import RpoFacts, rpo_facts
from pydr.dr.vault import Vault, init_vault

MiB = 1 << 20
TEN = Policy(target_rpo=10.0)  # critical after 20 s


@pytest.fixture
def vault(tmp_path):
    """A writer Vault with item "web" protected (no point yet) from a 1 MiB file."""
    init_vault(tmp_path / "v")
    (tmp_path / "web.img").write_bytes(os.urandom(MiB))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("web", [(str(tmp_path / "web.img"), str(tmp_path / "web.replica"))])
        yield v


def replicated(v, name="web"):
    """Replicate `name` once; the data time of the point it made."""
    assert not v.replicate([name]).failed
    return v.store.points(name)[-1].data_time


def judge(v, policy, now, name="web"):
    return rpo_health(policy, rpo_facts(v, name, now=now), v.store.item(name), now)


def test_rules_with_a_point(vault):
    """ok up to the target (included), warning past it, critical past the
    critical threshold: rpo_critical, else twice the target."""
    cut = replicated(vault)
    assert judge(vault, TEN, cut) == "ok"
    assert judge(vault, TEN, cut + 10) == "ok"
    assert judge(vault, TEN, cut + 10.5) == "warning"
    assert judge(vault, TEN, cut + 20) == "warning"
    assert judge(vault, TEN, cut + 20.5) == "critical"
    custom = Policy(target_rpo=10.0, rpo_critical=60.0)
    assert judge(vault, custom, cut + 59) == "warning"
    assert judge(vault, custom, cut + 61) == "critical"


def test_no_target_is_unknown(vault):
    cut = replicated(vault)
    for policy in (Policy(), None):
        assert judge(vault, policy, cut + 1e6) == "unknown"


def test_no_point_yet_is_unknown_then_warning_then_critical(vault):
    """Before its first point an item is "unknown" for one target after it
    was protected (its first cycle may still run), then warning, then critical."""
    created = vault.store.item("web").created
    assert rpo_facts(vault, "web", now=created).rpo_seconds is None
    assert judge(vault, TEN, created + 5) == "unknown"
    assert judge(vault, TEN, created + 10) == "unknown"
    assert judge(vault, TEN, created + 11) == "warning"
    assert judge(vault, TEN, created + 21) == "critical"


def test_a_damaged_newest_point_does_not_count(vault):
    """The RPO is the newest undamaged point's: the older point judges."""
    first = replicated(vault)
    replicated(vault)
    newest = vault.store.points("web")[-1]
    with vault.store.transaction():
        vault.store.db.execute("UPDATE points SET damaged='test' WHERE id=?", (newest.id,))
    assert judge(vault, TEN, first + 15) == "warning"


def test_a_drill_and_a_failover_pause(vault, tmp_path):
    """An item failed over or committed is "paused" whatever its RPO (pydr
    run does not replicate it). In a drill that blocks replication it is
    "paused" only up to its critical RPO, then "critical" (a forgotten drill
    must not stop protection unnoticed: review 23, finding 6); in a drill
    that lets its replicas be written it is judged as any item. Back to
    protected it is judged again."""
    cut = replicated(vault)
    vault.test_failover("web", str(tmp_path / "drill"))
    assert judge(vault, TEN, cut + 15) == "paused"  # critical: 20 s
    assert judge(vault, TEN, cut + 1000) == "critical"
    row = vault.store.item("web")
    assert rpo_health(TEN, rpo_facts(vault, "web", now=cut + 15), row, cut + 15,
                      drill_replicated=True) == "warning"
    vault.cleanup_test_failover("web")
    assert judge(vault, TEN, cut + 1000) == "critical"
    vault.failover("web")
    assert judge(vault, TEN, cut + 1000) == "paused"
    vault.commit("web")
    assert judge(vault, TEN, cut + 1000) == "paused"
    vault.reprotect("web")  # its cycle makes the first point of the new direction
    again = vault.store.points("web")[-1].data_time
    assert judge(vault, TEN, again + 1) == "ok"


def test_rules_on_plain_facts():
    """rpo_health reads only the facts and the row (a Vault's dict works too)."""
    row = {"state": "protected", "test_dir": None, "created": 100.0}
    facts = RpoFacts(1, 100.0, 12.0, 101.0)
    assert rpo_health(TEN, facts, row, 112.0) == "warning"
    assert rpo_health(TEN, facts._replace(rpo_seconds=3.0), row, 103.0) == "ok"
    for state in ("failing-over", "failed-over", "committing", "failover-committed"):
        assert rpo_health(TEN, facts, dict(row, state=state), 112.0) == "paused"
    assert rpo_health(TEN, facts, dict(row, state="resync-required"), 112.0) == "warning"
    assert set(HEALTHS) == {"ok", "warning", "critical", "unknown", "paused"}


def alerts(v):
    return [(a.item, a.old, a.new) for a in v.store.alerts()]


def test_transitions_are_recorded_once(vault):
    """ok -> warning -> critical -> ok: each change is returned, logged in
    the alerts table and kept in items.rpo_health once; judging again at
    the same health records nothing."""
    cut = replicated(vault)
    pol = {"web": TEN}
    assert check_transitions(vault.store, ["web"], cut + 1, pol) == []  # a first "ok": no news
    assert vault.store.item("web").rpo_health == "ok" and alerts(vault) == []
    assert check_transitions(vault.store, ["web"], cut + 2, pol) == []

    [t] = check_transitions(vault.store, ["web"], cut + 12, pol)
    assert isinstance(t, Transition)
    assert (t.item, t.old, t.new, t.target_rpo, t.at) == ("web", "ok", "warning", 10.0, cut + 12)
    assert t.rpo_seconds == pytest.approx(12.0)
    assert t.message == "ok -> warning: RPO 12 s > target 10 s"
    assert check_transitions(vault.store, ["web"], cut + 15, pol) == []  # still warning

    [t] = check_transitions(vault.store, ["web"], cut + 25, pol)
    assert (t.old, t.new, t.message) == ("warning", "critical",
                                         "warning -> critical: RPO 25 s > critical 20 s")
    assert check_transitions(vault.store, ["web"], cut + 30, pol) == []

    now_cut = replicated(vault)  # the replica is fresh again: a recovery
    [t] = check_transitions(vault.store, ["web"], now_cut + 3, pol)
    assert (t.old, t.new) == ("critical", "ok")
    assert t.message == "critical -> ok: RPO 3 s <= target 10 s"
    assert vault.store.item("web").rpo_health == "ok"
    assert alerts(vault) == [("web", "ok", "warning"), ("web", "warning", "critical"),
                             ("web", "critical", "ok")]
    recorded = vault.store.alerts()
    assert [a.message for a in recorded] == [
        "ok -> warning: RPO 12 s > target 10 s", "warning -> critical: RPO 25 s > critical 20 s",
        "critical -> ok: RPO 3 s <= target 10 s"]
    assert [a.target_rpo for a in recorded] == [10.0] * 3
    assert recorded[0].rpo_seconds == pytest.approx(12.0)
    d = t.to_dict()
    assert (d["item"], d["old"], d["new"]) == ("web", "critical", "ok")
    assert d["at"].endswith("Z")


def test_a_first_judgement_in_trouble_is_a_transition(vault):
    """A service that starts on an item already past its target alerts at once."""
    created = vault.store.item("web").created
    [t] = check_transitions(vault.store, ["web"], created + 11, {"web": TEN})
    assert (t.old, t.new) == (None, "warning")
    assert t.message == "none -> warning: no point 11 s after protect > target 10 s"
    assert t.rpo_seconds is None
    assert alerts(vault) == [("web", None, "warning")]


def test_pausing_is_silent_but_recorded(vault, tmp_path):
    """Into "paused" (a drill) from trouble: recorded in items.rpo_health,
    no alert; out of it into trouble: a transition again."""
    cut = replicated(vault)
    pol = {"web": TEN}
    assert len(check_transitions(vault, ["web"], cut + 12, pol)) == 1  # a Vault works too
    vault.test_failover("web", str(tmp_path / "drill"))
    assert check_transitions(vault.store, ["web"], cut + 13, pol) == []
    assert vault.store.item("web").rpo_health == "paused"
    vault.cleanup_test_failover("web")
    [t] = check_transitions(vault.store, ["web"], cut + 14, pol)
    assert (t.old, t.new) == ("paused", "warning")
    assert alerts(vault) == [("web", None, "warning"), ("web", "paused", "warning")]


def test_several_items_one_transaction_and_unknown_names(vault, tmp_path):
    """Several items are judged in the order given; a name no longer in the
    vault is skipped; an item without a policy is unknown (no alert)."""
    (tmp_path / "db.img").write_bytes(os.urandom(MiB))
    vault.protect("db", [(str(tmp_path / "db.img"), str(tmp_path / "db.replica"))])
    cut = max(replicated(vault, "web"), replicated(vault, "db"))
    got = check_transitions(vault.store, ["db", "gone", "web"], cut + 100,
                            {"web": TEN, "db": Policy(target_rpo=60.0)})
    assert [(t.item, t.new) for t in got] == [("db", "warning"), ("web", "critical")]
    # the targets cleared: leaving trouble is news (it ends the alert)
    got = check_transitions(vault.store, ["web", "db"], cut + 100, {})
    assert [(t.item, t.old, t.new, t.target_rpo, t.message) for t in got] == [
        ("web", "critical", "unknown", None, "critical -> unknown: no target RPO"),
        ("db", "warning", "unknown", None, "warning -> unknown: no target RPO")]
    assert vault.store.item("web").rpo_health == "unknown"
    assert vault.store.item("db").rpo_health == "unknown"
    assert check_transitions(vault.store, ["web", "db"], cut + 200, {}) == []


def test_a_failed_record_records_nothing(vault, monkeypatch):
    """The changes are written in one transaction: if one fails, none is kept."""
    cut = replicated(vault)
    real = vault.store.add_alert

    def broken(*args):
        real(*args)
        raise RuntimeError("disk full")

    monkeypatch.setattr(vault.store, "add_alert", broken)
    with pytest.raises(RuntimeError):
        check_transitions(vault.store, ["web"], cut + 12, {"web": TEN})
    monkeypatch.undo()
    assert vault.store.item("web").rpo_health is None and vault.store.alerts() == []


def test_the_module_exports():
    assert health.__all__ == ["HEALTHS", "rpo_health", "Transition", "check_transitions",
                              "RpoPolicy"]
