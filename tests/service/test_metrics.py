"""pydr run's metrics (pydr.dr.metrics.ServiceMetrics): served on
127.0.0.1 port 0, read back by a real HTTP GET parsed with
prometheus-client's own parser; close() frees the port."""

import errno
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pydr.dr.health import HEALTHS
from pydr.dr.metrics import ServiceMetrics
from pydr.errors import InvalidArgument, InvalidState


def scrape(port):
    """{(sample name, ((label, value), ...)): value} and {family: type} of one GET."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        assert r.status == 200
        text = r.read().decode()
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def item(name, **more):
    return tuple(sorted(dict(item=name, **more).items()))


@pytest.fixture
def metrics():
    m = ServiceMetrics()
    yield m
    m.close()


def test_values_set_are_served(metrics):
    port = metrics.serve("127.0.0.1", 0)
    assert port > 0 and metrics.port == port
    metrics.set_item("web", 12.5, 10.0, "warning")
    metrics.set_item("db", 3.0, 60.0, "ok")
    metrics.observe_cycle("web", 0.75, 4096, 1024, 0, ok=True)
    metrics.observe_cycle("web", 0.25, 100, 0, 50, ok=False)
    metrics.set_queue(3)
    samples, types = scrape(port)

    assert samples[("pydr_up", ())] == 1
    assert samples[("pydr_queue_length", ())] == 3
    assert samples[("pydr_rpo_seconds", item("web"))] == 12.5
    assert samples[("pydr_rpo_target_seconds", item("web"))] == 10.0
    assert samples[("pydr_rpo_seconds", item("db"))] == 3.0
    for state in HEALTHS:
        assert samples[("pydr_health", item("web", state=state))] == (state == "warning")
        assert samples[("pydr_health", item("db", state=state))] == (state == "ok")
    assert samples[("pydr_last_cycle_seconds", item("web"))] == 0.25
    assert samples[("pydr_cycles_total", item("web"))] == 2
    assert samples[("pydr_cycle_failures_total", item("web"))] == 1
    assert samples[("pydr_bytes_read_total", item("web"))] == 4196
    assert samples[("pydr_bytes_written_total", item("web"))] == 1024
    assert samples[("pydr_bytes_sent_total", item("web"))] == 50
    assert ("pydr_cycles_total", item("db")) not in samples  # no cycle of db yet
    assert {name: types[name] for name in (
        "pydr_up", "pydr_queue_length", "pydr_rpo_seconds", "pydr_rpo_target_seconds",
        "pydr_health", "pydr_last_cycle_seconds")} == dict.fromkeys(
        ("pydr_up", "pydr_queue_length", "pydr_rpo_seconds", "pydr_rpo_target_seconds",
         "pydr_health", "pydr_last_cycle_seconds"), "gauge")
    for counter in ("pydr_cycles", "pydr_cycle_failures", "pydr_bytes_read",
                    "pydr_bytes_written", "pydr_bytes_sent"):
        assert types[counter] == "counter"

    # a change of health moves the 1; no point and no target remove those series
    metrics.set_item("web", None, None, "unknown")
    samples, _ = scrape(port)
    assert ("pydr_rpo_seconds", item("web")) not in samples
    assert ("pydr_rpo_target_seconds", item("web")) not in samples
    assert [s for s in HEALTHS if samples[("pydr_health", item("web", state=s))]] == ["unknown"]

    metrics.forget_item("web")
    samples, _ = scrape(port)
    assert not [key for key in samples if ("item", "web") in key[1]]
    assert samples[("pydr_rpo_seconds", item("db"))] == 3.0


def test_close_frees_the_port(metrics):
    port = metrics.serve("127.0.0.1", 0)
    scrape(port)
    metrics.close()
    assert metrics.port is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=60)
    # nothing listens there any more: a listener can bind it (SO_REUSEADDR
    # only passes over the TIME_WAIT of the closed scrape, not a listener)
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()
    finally:
        probe.close()
    again = ServiceMetrics()
    try:
        assert again.serve("127.0.0.1", port) == port
        assert scrape(port)[0][("pydr_up", ())] == 1
    finally:
        again.close()
    metrics.close()  # twice is fine


def test_serving_errors(metrics):
    port = metrics.serve("127.0.0.1", 0)
    with pytest.raises(InvalidState):
        metrics.serve("127.0.0.1", 0)
    other = ServiceMetrics()
    with pytest.raises(OSError) as err:
        other.serve("127.0.0.1", port)
    assert err.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in str(err.value)
    assert other.port is None
    with pytest.raises(InvalidArgument):
        metrics.set_item("web", 1.0, 10.0, "fine")


def test_each_service_has_its_own_registry():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.set_queue(5)
    assert a.registry is not b.registry
    assert a.registry.get_sample_value("pydr_queue_length") == 5
    assert b.registry.get_sample_value("pydr_queue_length") == 0
