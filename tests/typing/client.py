"""A small caller of pydr's public API, type-checked (never run) by
tests/test_typing.py with ``mypy --strict`` against the installed package:
the annotations must serve a caller, so each call's type is pinned with
assert_type (an Any where a type belongs fails the check)."""

from __future__ import annotations

import threading
from typing import Any, List

import numpy as np
import numpy.typing as npt
from typing_extensions import assert_type

import pydr
from pydr.endpoints.base import Endpoint
from pydr.endpoints.transfer import TransferStats
from pydr.engine.apply import ApplyStats
from pydr.engine.delta import DeltaStats
from pydr.engine.resync import ResyncStats

seen: List[float] = []


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


def vault() -> Any:
    with pydr.Vault("/srv/vault", writer=True) as v:
        assert_type(v, pydr.Vault)
        v.protect("web", [("/img/web.img", "/dr/web.img")])
        v.replicate(["web"])
        return v.status("web")
