"""A small caller of pydr's public API, type-checked (never run) by
tests/test_typing.py with ``mypy --strict`` against the installed package:
the annotations must serve a caller, so each call's type is pinned with
assert_type (an Any where a type belongs fails the check)."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Dict, List, Tuple

import numpy as np
import numpy.typing as npt
from typing_extensions import assert_type

import pydr
from pydr.dr.policy import Policy
from pydr.dr.results import (AlertInfo, CycleResult, ItemOutcome, ItemStatus, JobInfo,
                             OperationResult, PointInfo)
from pydr.endpoints.base import Endpoint
from pydr.endpoints.transfer import TransferStats
from pydr.engine.apply import ApplyStats
from pydr.engine.delta import DeltaStats
from pydr.engine.resync import ResyncStats

seen: List[float] = []
seen_events: List[pydr.Event] = []


def on_progress(record: pydr.ProgressRecord) -> None:
    seen.append(record.fraction)
    assert_type(record.done_bytes, int)
    assert_type(record.path, str)


def engine(cancel: threading.Event) -> None:
    sig = pydr.signature("disk.img", block_size=65536, threads=2, progress=on_progress,
                         cancel=cancel)
    assert_type(sig, pydr.Signature)
    sig.save("disk.sig")
    old = pydr.Signature.load("disk.sig")
    assert_type(old, pydr.Signature)
    changed = old.diff(sig)
    assert_type(changed, npt.NDArray[np.uint64])
    assert_type(sig.stats, "pydr.SignStats | None")
    if sig.stats is not None:
        assert_type(sig.stats.seconds, float)
    assert_type(sig.block_count, int)

    stats = pydr.resync("disk.img", "backup@dr:/srv/disk.img", compress=True, cancel=cancel)
    assert_type(stats, "ResyncStats | TransferStats")
    assert_type(stats.bytes_written, int)
    if isinstance(stats, TransferStats):
        assert_type(stats.direction, str)

    made = pydr.make_delta("new.img", "update.delta", target="old.img")
    assert_type(made, DeltaStats)
    applied = pydr.apply_delta("update.delta", "copy.img", verify=True)
    assert_type(applied, ApplyStats)
    assert_type(applied.already_applied, bool)
    assert_type(pydr.rollback("copy.img"), int)
    assert_type(pydr.open_endpoint("backup@dr:/srv/disk.img"), Endpoint)


def errors() -> int:
    try:
        pydr.init_vault("/srv/vault")
    except pydr.VaultError as exc:
        assert_type(exc.exit_code, int)
        assert_type(exc.path, "str | None")
        return exc.exit_code
    except (pydr.UnknownName, pydr.InvalidState, pydr.HookFailed, pydr.PlanFailed) as exc:
        return exc.exit_code
    return 0


def on_event(event: pydr.Event) -> None:
    assert_type(event.kind, str)
    assert_type(event.item, "str | None")
    assert_type(event.bytes_done, "int | None")
    assert_type(event.at, datetime)
    assert_type(event.to_dict(), Dict[str, Any])


def vault(cancel: threading.Event) -> ItemStatus:
    with pydr.Vault("/srv/vault", writer=True) as v:
        assert_type(v, pydr.Vault)
        v.protect("web", [("/img/web.img", "/dr/web.img")])

        cycle = v.replicate(["web"], events=on_event, cancel=cancel)
        assert_type(cycle, CycleResult)
        assert_type(cycle.point_id, "int | None")
        assert_type(cycle.by_item, Dict[str, ItemOutcome])
        assert_type(cycle.failed, Tuple[ItemOutcome, ...])
        assert_type(v.replicate("web", resync=True, events=seen_events.append), CycleResult)
        try:
            v.replicate(["web", "db"])
        except pydr.CycleFailed as exc:
            assert_type(exc.exit_code, int)

        status = v.status("web")
        assert_type(status, ItemStatus)
        assert_type(status.rpo_seconds, "float | None")
        assert_type(status.point_count, int)
        assert_type(status.latest_point_at, "datetime | None")
        assert_type(status.target_rpo, "float | None")
        assert_type(status.rpo_health, "str | None")
        policy = v.set_policy("web", target_rpo="30s", keep={"hourly": 24}, priority=5)
        assert_type(policy, Policy)
        assert_type(v.policy("shop", group=True).critical_after(), "float | None")
        assert_type(v.policy("web").bwlimit_at(0.0), "int | None")
        assert_type(v.policy_sources("web")[1], Dict[str, str])
        alerts = v.alerts("web", since=0.0, limit=10)
        assert_type(alerts, List[AlertInfo])
        assert_type(alerts[0].at, datetime)
        assert_type(alerts[0].rpo_seconds, "float | None")

        points = v.points("web")
        assert_type(points, List[PointInfo])
        assert_type(points[0].cut_at, datetime)

        done = v.failover("web", point="latest", directory="/dr/web", events=on_event,
                          cancel=cancel)
        assert_type(done, OperationResult)
        assert_type(done.point, "int | None")
        assert_type(done.paths, Tuple[str, ...])
        assert_type(v.test_failover("web", "/srv/drill", point=3), OperationResult)
        assert_type(v.commit("web", events=on_event, cancel=cancel), OperationResult)

        jobs = v.jobs(item="web", limit=3)
        assert_type(jobs, List[JobInfo])
        assert_type(jobs[0].state, str)
        assert_type(jobs[0].started_at, "datetime | None")
        return status
