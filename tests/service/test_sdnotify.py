"""pydr.dr.sdnotify against a real AF_UNIX datagram socket the test binds
(a path, and an abstract name as systemd may give one)."""

import os
import socket
import uuid

import pytest

from pydr.dr import sdnotify


@pytest.fixture
def listener(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    s.bind(path)
    s.settimeout(30)  # a datagram sent before recv() is queued: this only bounds a failure
    yield s, path
    s.close()


def test_a_state_reaches_the_socket_of_notify_socket(listener):
    s, path = listener
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path}) is True
    assert s.recv(4096) == b"READY=1"
    assert sdnotify.notify("STATUS=2 items, worst ok\nWATCHDOG=1", {"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"STATUS=2 items, worst ok\nWATCHDOG=1"


def test_an_abstract_socket_name_starts_with_at():
    name = f"pydr-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(30)
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"STOPPING=1"


def test_without_notify_socket_nothing_is_sent():
    assert sdnotify.notify("READY=1", {}) is False


def test_a_socket_that_is_gone_is_no_failure(tmp_path):
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")}) is False


def test_the_watchdog_interval_is_half_of_watchdog_usec():
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000",
                                       "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000",
                                       "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_the_service_sends_ready_status_watchdog_and_stopping(listener, tmp_path, monkeypatch):
    """Service.run with the default notify: one round, then a stop() from
    the notify hook itself (no waiting): the datagrams in order."""
    from pydr.dr.service import Service
    from pydr.dr.vault import init_vault

    s, path = listener
    init_vault(tmp_path / "v")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    service = Service(tmp_path / "v", warm=False)
    sent = []

    def notify(state):
        sent.append(state)
        sdnotify.notify(state)
        if state == "WATCHDOG=1":
            service.stop()

    service.notify = notify
    service.run()
    got = [s.recv(4096).decode() for _ in sent]
    assert got == sent
    assert [g.split("=")[0] for g in got] == ["READY", "STATUS", "WATCHDOG", "STOPPING"]
