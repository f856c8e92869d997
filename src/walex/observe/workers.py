"""A worker's metrics and health: ``/metrics``, ``/healthz``, ``/livez`` on its ``metrics_port``.

:class:`~walex.workers.Worker` takes ``metrics_port`` and ``metrics_host``
as an app does (``walex worker ... --metrics-port``); the endpoint is the
app's (:mod:`.server`, ``prometheus-client`` from ``walex[metrics]``, a
:class:`~walex.errors.ConfigError` naming the extra without it). Every
metric carries the labels ``worker`` (its name) and ``group``.

| metric | type | what |
|---|---|---|
| ``walex_worker_events_total{table,type}`` | counter | events handled, ``table`` as ``schema.table`` (duplicates dropped not counted) |
| ``walex_worker_calls_total`` | counter | handler calls (one transaction's events of one partition each) |
| ``walex_worker_handler_errors_total``, ``_retries_total``, ``_failures_total`` | counter | as the app's ``walex_handler_*`` |
| ``walex_worker_undecodable_total`` | counter | messages that were not walex events |
| ``walex_worker_redeliveries_total`` | counter | messages the broker delivered again |
| ``walex_worker_duplicates_total`` | counter | events dropped as handled here already |
| ``walex_worker_reconnects_total`` | counter | broker connections lost and opened again |
| ``walex_worker_connected`` | gauge | 1 while consuming from the broker |
| ``walex_worker_handler_seconds`` | histogram | duration of each handler call |
| ``walex_worker_commit_to_handler_seconds`` | histogram | from commit (PostgreSQL's clock) to the handler call |
| ``walex_worker_last_handled_lsn{partition}`` | gauge | commit LSN of the last event handled here, per partition |
| ``walex_worker_last_commit_timestamp_seconds{partition}`` | gauge | its commit time (Unix seconds) |
| ``walex_worker_pending_messages{partition}`` | gauge | messages after the last one received here (JetStream only) |

``/healthz`` is 200 while the worker consumes (connected to the broker,
its partitions subscribed), 503 while it reconnects or once stopped;
``/livez`` 200 while it runs at all (reconnecting included). Both answer
JSON with ``status`` (``consuming``, ``reconnecting``, ``stalled``, ``stopped``) and a
``reason`` when not 200. Figures are counted per handler call, never per
event in Python code, and only when ``metrics_port`` is set.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter, _count_elements  # type: ignore[attr-defined]
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .stats import _TABLE_AND_TYPE, Buckets

if TYPE_CHECKING:
    from ..event import Event
    from ..workers import Worker

__all__ = ["WorkerObserver", "WorkerStats", "worker_health", "worker_liveness"]

log = logging.getLogger("walex.workers")

# seconds a handler call takes: from a millisecond to minutes
HANDLER_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0, 300.0)


class WorkerStats:
    """What a worker counts for its metrics, per handler call."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str, str]] = Counter()  # (schema, table, type) -> events
        self.calls = 0
        self.handler_seconds = Buckets(HANDLER_BOUNDS)
        self.commit_to_handler = Buckets()
        self.last_lsn: dict[int, int] = {}  # partition -> commit LSN of the last event handled
        self.last_commit: dict[int, float] = {}  # partition -> its commit time, Unix seconds
        self.pending: dict[int, int] = {}  # partition -> messages after the last received

    def handled(self, partition: int, events: list[Event], started: float, seconds: float) -> None:
        """A handler call over ``events`` began at ``started`` (Unix time), took ``seconds``."""
        self.calls += 1
        counts = self.handler_seconds.counts
        counts[bisect_left(self.handler_seconds.bounds, seconds)] += 1
        self.handler_seconds.sum += seconds
        last = events[-1]
        committed = last.timestamp.timestamp()
        self.commit_to_handler.observe(started - committed)
        self.last_lsn[partition] = int(last.id.partition("-")[0], 16)
        self.last_commit[partition] = committed
        if len(events) == 1:
            key = _TABLE_AND_TYPE(last)
            self.events[key] = self.events.get(key, 0) + 1
        else:
            _count_elements(self.events, map(_TABLE_AND_TYPE, events))


def _running(worker: Worker) -> bool:
    """Started (connecting included) and neither stopping nor stopped."""
    return not worker._closing and not worker._stopped.is_set()


def worker_liveness(worker: Worker) -> tuple[int, dict[str, Any]]:
    if not _running(worker):
        return 503, {"status": "stopped", "reason": "the worker is not running"}
    return 200, {"status": "running"}


def worker_health(worker: Worker) -> tuple[int, dict[str, Any]]:
    consumer = worker.consumer
    body: dict[str, Any] = {"source": consumer.display, "partitions": consumer.partitions}
    if not _running(worker):
        return 503, {"status": "stopped", "reason": "the worker is not running", **body}
    if not worker.connected:
        return 503, {"status": "reconnecting",
                     "reason": f"not consuming: connecting to {consumer.display}", **body}
    trouble = consumer.trouble()
    if trouble is not None:
        return 503, {"status": "stalled", "reason": f"not consuming: {trouble}", **body}
    return 200, {"status": "consuming", **body}


class WorkerCollector:
    """Reads the worker's counters when scraped (a prometheus_client collector)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Any]:
        from .families import Families

        w, d, stats = self.worker, self.worker.dispatcher, self.worker.stats
        f = Families(["worker", "group"], [w.name, w.consumer.group])
        counter, histogram = f.counter, f.histogram

        def per_partition(name: str, doc: str, values: dict[int, Any]) -> Any:
            return f.labelled("gauge", name, doc, ["partition"],
                              [((partition,), value) for partition, value in sorted(values.items())])

        yield f.events("walex_worker_events", stats.events)
        yield counter("walex_worker_calls", "Handler calls.", stats.calls)
        yield counter("walex_worker_handler_errors",
                      "Handler and function calls that raised, each try counted.", d.errors)
        yield counter("walex_worker_handler_retries", "Retries of handler and function calls.",
                      d.retries)
        yield counter("walex_worker_handler_failures",
                      "Handler and function calls given up after their retries.",
                      d.errors - d.retries)
        yield counter("walex_worker_undecodable", "Messages that were not walex events.",
                      w.undecodable)
        yield counter("walex_worker_redeliveries", "Messages the broker delivered again.",
                      w.redeliveries)
        yield counter("walex_worker_duplicates", "Events dropped as handled here already.",
                      w.duplicates)
        yield counter("walex_worker_reconnects", "Broker connections lost and opened again.",
                      w.reconnects)
        yield f.gauge("walex_worker_connected", "1 while consuming from the broker.",
                      1 if w.connected and _running(w) else 0)
        yield histogram("walex_worker_handler_seconds", "Seconds each handler call took.",
                        stats.handler_seconds)
        yield histogram("walex_worker_commit_to_handler_seconds",
                        "Seconds from commit (server clock) to the handler call (this clock).",
                        stats.commit_to_handler)
        yield per_partition("walex_worker_last_handled_lsn",
                            "Commit LSN of the last event handled here, per partition.",
                            dict(stats.last_lsn))
        yield per_partition("walex_worker_last_commit_timestamp_seconds",
                            "Commit time of the last event handled here, per partition.",
                            dict(stats.last_commit))
        yield per_partition("walex_worker_pending_messages",
                            "Messages after the last one received here, per partition, as the "
                            "broker said (JetStream).", dict(stats.pending))


class WorkerObserver:
    """The worker's endpoint: started with it (before it connects), stopped with it."""

    def __init__(self, worker: Worker, port: int | None, host: str) -> None:
        self.worker = worker
        self.wanted = port
        self.host = host
        self.server: Any = None  # .server.HttpServer
        self.port: int | None = None  # the bound port, once started

    async def start(self) -> None:
        if self.wanted is None or self.server is not None:
            return
        from prometheus_client import CollectorRegistry, ProcessCollector

        from .server import HttpServer

        w = self.worker
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkerCollector(w))  # type: ignore[arg-type]
        ProcessCollector(registry=registry)
        server = HttpServer({"worker": w.name, "group": w.consumer.group}, registry,
                            lambda: worker_health(w), lambda: worker_liveness(w))
        self.port = await server.start(self.host, self.wanted)
        self.server = server
        log.info("worker %r serves /metrics, /healthz and /livez on %s:%d", w.name, self.host,
                 self.port)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop()
