"""Prometheus metrics of one app, read from its counters when scraped (needs walex[metrics]).

Every metric carries the labels ``app`` (the app's name) and ``slot``.

| metric | type | what |
|---|---|---|
| ``walex_events_total{table,type}`` | counter | events handled (``table``: ``schema.table``; ``(other)`` past 1000 tables) |
| ``walex_transactions_total`` | counter | transactions handled (all their batches) |
| ``walex_handler_errors_total`` | counter | handler and function calls that raised (each try) |
| ``walex_handler_retries_total`` | counter | retries of those calls |
| ``walex_handler_failures_total`` | counter | calls given up after their retries (skipped, dead-lettered or stopping the app) |
| ``walex_received_lsn`` | gauge | latest server WAL position received |
| ``walex_acknowledged_lsn`` | gauge | flush position last sent to the server |
| ``walex_lag_bytes`` | gauge | WAL sent to walex (or held back by it) a poll ago and not confirmed |
| ``walex_commit_to_handler_seconds`` | histogram | from commit (server clock) to the handler call (this clock) |
| ``walex_pending_bytes`` | gauge | bytes of received changes not yet handled |
| ``walex_streaming`` | gauge | 1 while streaming |
| ``walex_standby`` | gauge | 1 while waiting as a standby |
| ``walex_reconnects_total``, ``walex_takeovers_total`` | counter | sessions after the first; standby takeovers |
| ``walex_replays_dropped_total`` | counter | replayed transactions dropped by LSN |
| ``walex_lag_releases_total`` | counter | temporary slots dropped by the lag guard |
| ``walex_slot_safe_wal_size_bytes`` | gauge | WAL that can still be written before the slot is lost |
| ``walex_destination_published_total{destination}`` | counter | events a destination confirmed |
| ``walex_destination_errors_total{destination}`` | counter | failed publishes |
| ``walex_destination_publish_seconds{destination}`` | histogram | publish durations |
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .families import Families
from .health import acknowledged, lag_bytes

if TYPE_CHECKING:
    from ..app import WalEx

__all__ = ["WalExCollector", "registry"]


class WalExCollector(Collector):
    def __init__(self, app: WalEx) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        app = self.app
        p, d, stats = app.pipeline, app.dispatcher, app.pipeline.stats
        names, base = ["app", "slot"], [app.settings.name, app.slot_name]
        f = Families(names, base)
        counter, gauge = f.counter, f.gauge
        yield f.events("walex_events", stats.events)
        yield counter("walex_transactions", "Transactions handled.", p.transactions_handled)
        yield counter("walex_handler_errors",
                      "Handler and function calls that raised, each try counted.",
                      d.errors)
        yield counter("walex_handler_retries", "Retries of handler and function calls.", d.retries)
        yield counter("walex_handler_failures",
                      "Handler and function calls given up after their retries.",
                      d.errors - d.retries)
        yield gauge("walex_received_lsn", "Latest server WAL position received.", p.ack.received)
        yield gauge("walex_acknowledged_lsn", "Flush position last sent to the server.",
                    acknowledged(app))
        lag = lag_bytes(app)
        if lag is not None:
            yield gauge("walex_lag_bytes", "WAL sent to walex (or held back by it) and not confirmed.", lag)
        yield f.histogram("walex_commit_to_handler_seconds",
                          "Seconds from commit (server clock) to the handler call.",
                          stats.commit_to_handler)
        yield gauge("walex_pending_bytes", "Bytes of received changes not yet handled.",
                    p.pending_bytes)
        repl = p.repl
        yield gauge("walex_streaming", "1 while streaming from the slot.",
                    1 if repl is not None and repl.streaming else 0)
        yield gauge("walex_standby", "1 while waiting as a standby for the slot.",
                    1 if stats.standby else 0)
        yield counter("walex_reconnects", "Sessions opened after the first.",
                      max(0, p.sessions - 1 - stats.takeovers))
        yield counter("walex_takeovers", "Times this instance took the slot over as a standby.",
                      stats.takeovers)
        yield counter("walex_replays_dropped", "Replayed transactions dropped by LSN.",
                      p.replays_dropped)
        yield counter("walex_lag_releases", "Temporary slots dropped for lagging too far.",
                      stats.lag_releases)
        if stats.slot_safe_wal_size is not None:
            yield gauge("walex_slot_safe_wal_size_bytes",
                        "WAL that can still be written before the slot is invalidated.",
                        stats.slot_safe_wal_size)
        labels = [*names, "destination"]
        published = CounterMetricFamily("walex_destination_published",
                                        "Events a destination confirmed.", labels=labels)
        errors = CounterMetricFamily("walex_destination_errors",
                                     "Publishes a destination failed.", labels=labels)
        seconds = HistogramMetricFamily("walex_destination_publish_seconds",
                                        "Seconds a destination took to publish a batch.",
                                        labels=labels)
        for destination, buckets in list(stats.publish_seconds.items()):
            published.add_metric([*base, destination], stats.published[destination])
            errors.add_metric([*base, destination], stats.publish_errors[destination])
            seconds.add_metric([*base, destination], buckets.cumulative(), buckets.sum)
        yield published
        yield errors
        yield seconds


def registry(app: WalEx) -> CollectorRegistry:
    """A registry of the app's metrics and the process' (CPU, memory, open files)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(WalExCollector(app))
    ProcessCollector(registry=reg)
    return reg
