"""What an app counts besides the pipeline's own counters (no dependencies).

Updated per batch, never per event in Python code: the per table and type
count is one ``Counter.update`` over the batch (a C loop), the commit-to-
handler time one bucket increment.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, _count_elements  # type: ignore[attr-defined]
from collections.abc import Awaitable, Callable
from operator import attrgetter
from typing import Any

from ..transactions import Transaction

__all__ = ["Buckets", "Stats"]

# seconds; Prometheus' defaults widened for CDC, where minutes of lag happen
LATENCY_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                  30.0, 60.0, 300.0)

# (schema, table, type) of an event: plain strs, hashed in C; public.items and audit.items
# are different tables, so the schema is part of the key (Families.events joins them)
_TABLE_AND_TYPE = attrgetter("source.schema", "name", "type._value_")


class Buckets:
    """A histogram's counts per upper bound (the last one is +Inf) and its sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ending with ``+Inf``."""
        total, pairs = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return pairs


class Stats:
    """Counters of one app that the pipeline does not keep itself."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str, str]] = Counter()  # (schema, table, type) -> events
        self.commit_to_handler = Buckets()
        self.standby = False  # waiting for the slot another instance holds
        self.standby_since = 0.0  # time.monotonic() when it began waiting
        self.takeovers = 0
        self.lag_releases = 0  # temporary slots dropped by the lag guard
        # what the monitor last saw (None: not polled yet, or the poll failed)
        self.server_wal_end = 0
        self.slot_wal_status: str | None = None
        self.slot_safe_wal_size: int | None = None
        self.monitor_error: str | None = None
        self.lagging = False  # over max_lag_bytes at the last check
        # destinations: name -> count, and publish durations
        self.published: Counter[str] = Counter()
        self.publish_errors: Counter[str] = Counter()
        self.publish_seconds: dict[str, Buckets] = {}
        self.tracer: Any = None  # .tracing.Tracer when tracing=True (for destinations' spans)

    def reached(self, txn: Transaction) -> None:
        """A batch reaches its handlers: its commit-to-handler latency."""
        if txn.events:
            latency = self.commit_to_handler
            seconds = time.time() - txn.commit_time.timestamp()
            latency.counts[bisect_left(latency.bounds, seconds)] += 1
            latency.sum += seconds

    def counted(self, txn: Transaction) -> None:
        """A batch was handled: its events, by table and type."""
        batch, events = txn.events, self.events
        if len(batch) == 1:
            key = _TABLE_AND_TYPE(batch[0])
            events[key] = events.get(key, 0) + 1
        elif batch:  # Counter.update's C loop, without its Python preamble
            _count_elements(events, map(_TABLE_AND_TYPE, batch))

    def observing(
        self, slot: str, tracer: Any = None
    ) -> Callable[[Callable[[Transaction], Awaitable[None]]], Callable[[Transaction], Awaitable[None]]]:
        """A wrapper for the dispatcher's ``dispatch`` that counts (and traces) each batch."""
        reached, counted = self.reached, self.counted

        def wrap(dispatch: Callable[[Transaction], Awaitable[None]]) -> Callable[[Transaction], Awaitable[None]]:
            async def observed(txn: Transaction) -> None:
                reached(txn)
                if tracer is None:
                    await dispatch(txn)
                else:
                    with tracer.batch(txn):
                        await dispatch(txn)
                counted(txn)

            return observed

        return wrap

    def record_publish(self, destination: str, count: int, seconds: float, ok: bool = True) -> None:
        """A destination published ``count`` events in ``seconds`` (or failed to)."""
        if ok:
            self.published[destination] += count
        else:
            self.publish_errors[destination] += 1
        buckets = self.publish_seconds.get(destination)
        if buckets is None:
            buckets = self.publish_seconds[destination] = Buckets()
        buckets.observe(seconds)
