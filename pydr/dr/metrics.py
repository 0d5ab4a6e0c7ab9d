"""Prometheus metrics of ``pydr run`` (``--metrics HOST:PORT``), through
prometheus-client (the ``service`` extra: pip install 'pydr[service]').

The service updates a :class:`ServiceMetrics` as it works (after each
cycle, each round); a scrape reads only these values in memory, never the
vault, so it is cheap and never waits for the vault's lock. The RPO and
the RPO health are computed at each scrape (a collector) from what the
last round kept of each item -- its newest point's data time and the rules
of its health (:meth:`ServiceMetrics.track_item`) -- and the clock: a
service stuck in a round (a vault lock held elsewhere, a cycle hung on NFS)
shows its items' RPO growing and their health turning, never a stale "ok". Each
ServiceMetrics has its own CollectorRegistry: nothing of the process's
default registry (another library's metrics) is served, and two services
in one process (tests) do not mix.

The metrics (labels in brackets; docs/SERVICE.md has the list for users):

========================== ======= ============= ======================================
name                       type    labels        meaning
========================== ======= ============= ======================================
pydr_up                    gauge                 1 while the service runs
pydr_queue_length          gauge                 items due and not yet started
pydr_rpo_seconds           gauge   item          achieved RPO (absent: no point)
pydr_rpo_target_seconds    gauge   item          target RPO (absent: none set)
pydr_health                gauge   item, state   1 for the item's RPO health, else 0
pydr_newest_point_timestamp_seconds
                           gauge   item          its newest point's data time (epoch s)
pydr_last_round_end_timestamp_seconds
                           gauge                 when the last round ended (epoch s)
pydr_last_cycle_seconds    gauge   item          how long its last cycle took
pydr_cycles_total          counter item          cycles run (succeeded or not)
pydr_cycle_failures_total  counter item          cycles that failed
pydr_bytes_read_total      counter item          bytes its cycles read
pydr_bytes_written_total   counter item          bytes its cycles wrote to replicas
pydr_bytes_sent_total      counter item          bytes its cycles sent over the wire
========================== ======= ============= ======================================
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from ..errors import InvalidArgument
from .health import HEALTHS

__all__ = ["ServiceMetrics"]


class ServiceMetrics:
    """The metrics of one pydr run service, served over HTTP on request.

    Every method is thread-safe (cycles finish in several threads). Use
    :meth:`serve` to answer scrapes, :meth:`close` to stop answering.

    Raises InvalidArgument (exit 2) when prometheus-client is not installed.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge
        except ImportError:
            raise InvalidArgument("metrics need prometheus-client, which is not installed",
                                  hint="pip install 'pydr[service]' (or prometheus-client)"
                                  ) from None
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._up = Gauge("pydr_up", "1 while pydr run is running", registry=reg)
        self._queue = Gauge("pydr_queue_length", "Items due and not yet started", registry=reg)
        self.clock = clock
        # {item: (newest point's data time or None, fixed RPO or None, target or None,
        #         health at a time)}: what a scrape computes the items' series from
        self._items: Dict[str, Tuple[Optional[float], Optional[float], Optional[float],
                                     Callable[[float], str]]] = {}
        self._round_end = Gauge("pydr_last_round_end_timestamp_seconds",
                                "When pydr run's last round ended (epoch seconds)", registry=reg)
        self._last_cycle = Gauge("pydr_last_cycle_seconds", "Duration of the item's last cycle",
                                 ["item"], registry=reg)
        self._cycles = Counter("pydr_cycles_total", "Cycles run", ["item"], registry=reg)
        self._failures = Counter("pydr_cycle_failures_total", "Cycles that failed", ["item"],
                                 registry=reg)
        self._read = Counter("pydr_bytes_read_total", "Bytes read by cycles", ["item"],
                             registry=reg)
        self._written = Counter("pydr_bytes_written_total", "Bytes written to replicas",
                                ["item"], registry=reg)
        self._sent = Counter("pydr_bytes_sent_total", "Bytes sent over the wire by cycles",
                             ["item"], registry=reg)
        self._up.set(1)
        self._lock = threading.Lock()
        reg.register(_Items(self))
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    def observe_cycle(self, item: str, seconds: float, read: int, written: int, sent: int,
                      ok: bool) -> None:
        """Count a cycle of `item` that took `seconds`, read `read` bytes,
        wrote `written` to its replicas and sent `sent` over the wire (0
        where not known); `ok`: whether it succeeded (a failure counts in
        pydr_cycle_failures_total too). Negative byte counts are taken as 0."""
        self._cycles.labels(item).inc()
        if not ok:
            self._failures.labels(item).inc()
        self._last_cycle.labels(item).set(max(0.0, float(seconds)))
        for counter, value in ((self._read, read), (self._written, written), (self._sent, sent)):
            counter.labels(item).inc(max(0, int(value or 0)))

    def set_item(self, item: str, rpo_seconds: Optional[float], target: Optional[float],
                 health: str) -> None:
        """Set `item`'s achieved RPO (`rpo_seconds`; None: no point, the
        series is absent), its target (None: none set, absent) and its RPO
        `health` (one of pydr.dr.health.HEALTHS: that state's series is 1,
        the others 0), as they stay until changed (:meth:`track_item` has
        them follow the clock). Raises InvalidArgument for an unknown health."""
        _check_health(health)
        with self._lock:  # a scrape sees one health at 1, never two
            self._items[item] = (None, rpo_seconds, target, lambda now: health)

    def track_item(self, item: str, newest: Optional[float], target: Optional[float],
                   health_at: Callable[[float], str]) -> None:
        """Have `item`'s series follow the clock: at each scrape its RPO is
        the clock minus `newest` (its newest point's data time, epoch
        seconds; None: no point), its health ``health_at(now)`` (one of
        pydr.dr.health.HEALTHS; it must not read the vault), its target
        `target` (None: none set)."""
        with self._lock:
            self._items[item] = (newest, None, target, health_at)

    def set_round_end(self, when: float) -> None:
        """Note that a round ended at `when` (epoch seconds)."""
        self._round_end.set(float(when))

    def _item_series(self) -> Iterator[Tuple[str, Optional[float], Optional[float],
                                             Optional[float], str]]:
        """(item, newest, RPO, target, health) of each item, now."""
        now = self.clock()
        with self._lock:
            items = dict(self._items)
        for item, (newest, rpo, target, health_at) in sorted(items.items()):
            if newest is not None:
                rpo = max(0.0, now - newest)
            try:
                health = health_at(now)
                _check_health(health)
            except Exception:  # a scrape never fails for one item
                health = "unknown"
            yield item, newest, rpo, target, health

    def set_queue(self, n: int) -> None:
        """Set how many items are due and not yet started."""
        self._queue.set(max(0, int(n)))

    def forget_item(self, item: str) -> None:
        """Drop every series of `item` (it left the vault)."""
        with self._lock:
            self._items.pop(item, None)
            for metric in (self._last_cycle, self._cycles, self._failures, self._read,
                           self._written, self._sent):
                _remove(metric, item)

    def serve(self, host: str, port: int) -> int:
        """Answer scrapes (GET /metrics, and any path) on `host`:`port` in a
        daemon thread, until :meth:`close`.

        host: the address to listen on ("127.0.0.1", "::", "0.0.0.0").
        port: the TCP port; 0 picks a free one.

        Returns the bound port. Raises InvalidState if already serving,
        OSError (exit 5, or 4 for a privileged port) naming HOST:PORT if it
        cannot listen there (in use, no such address).
        """
        from prometheus_client import start_http_server

        from ..errors import InvalidState

        with self._lock:
            if self._server is not None:
                raise InvalidState("the metrics are already served on port "
                                   f"{self._server.server_port}")
            try:
                server, thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: "
                                         f"{exc.strerror or exc}") from exc
            self._server, self._thread = server, thread
            return int(server.server_port)

    @property
    def port(self) -> Optional[int]:
        """The port scrapes are answered on, or None when not serving."""
        server = self._server
        return None if server is None else int(server.server_port)

    def close(self) -> None:
        """Stop answering scrapes and free the port (pydr_up reads 0 to
        anyone still holding this object). Closing twice is fine."""
        self._up.set(0)
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()


def _remove(metric: Any, *labels: str) -> None:
    """Remove `metric`'s series of `labels` if it has one."""
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def _check_health(health: str) -> None:
    if health not in HEALTHS:
        raise InvalidArgument(f"unknown RPO health {health!r} (one of {', '.join(HEALTHS)})")


class _Items:
    """The collector of the items' RPO series, computed at each scrape."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        rpo = GaugeMetricFamily("pydr_rpo_seconds",
                                "Achieved RPO: the age of the newest point's data", labels=["item"])
        target = GaugeMetricFamily("pydr_rpo_target_seconds", "The policy's target RPO",
                                   labels=["item"])
        health = GaugeMetricFamily("pydr_health", "1 for the item's RPO health (state), else 0",
                                   labels=["item", "state"])
        newest = GaugeMetricFamily("pydr_newest_point_timestamp_seconds",
                                   "When the item's newest point's data was taken (epoch seconds)",
                                   labels=["item"])
        for item, at, seconds, goal, state in self.metrics._item_series():
            for family, value in ((rpo, seconds), (target, goal), (newest, at)):
                if value is not None:
                    family.add_metric([item], float(value))
            for name in HEALTHS:
                health.add_metric([item, name], 1.0 if name == state else 0.0)
        return iter((rpo, target, health, newest))
