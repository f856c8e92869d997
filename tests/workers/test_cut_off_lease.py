"""A plain handler call a worker cut off as it let its partitions go: its lease says lost.

A plain handler runs on a thread and cannot be cancelled; the worker's word to
it is its lease (``current_lease().check()`` before its effect). Worker A's
call outlives ``shutdown_grace``: ``stop()`` cuts it off and gives the
partition back, worker B handles the same change, and only then does A's call
reach its check. It must raise :class:`~walex.workers.LeaseLost`. On main the
lease said lost only when the broker's side told the worker (a revoked lane),
not when the worker itself let the partition go (stopping, or reconnecting
after another partition's loss): the stale call applied its effect after B's.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from support import run, until
from workers.test_worker import Broker, Calls, broker, made_up, relay, worker_running  # noqa: F401

from walex import Event, Events
from walex.workers import LeaseLost, Worker, current_lease


def test_a_call_cut_off_by_stop_finds_its_lease_lost(broker: Broker) -> None:
    gate = threading.Event()
    started = threading.Event()
    outcome: list[str] = []
    a_events = Events()

    def slow(batch: list[Event]) -> None:  # on the handler thread: cannot be cancelled
        lease = current_lease()
        assert lease is not None
        started.set()
        gate.wait(30)
        try:
            lease.check()
        except LeaseLost:
            outcome.append("lost")
        else:
            outcome.append("applied")  # the effect, after another worker handled the change

    a_events.on_event("item")(slow)
    b = Calls()
    b.events.on_event("item")(b.handler("item"))
    extra: dict[str, Any] = {"ack_wait": 2} if broker.kind == "nats" else {}
    event = made_up(1)

    async def main() -> None:
        a = Worker(broker.source(**extra), [a_events], name="A", shutdown_grace=0.2)
        await a.consumer.declare()
        await a.start()
        try:
            await relay(broker, [[event]])
            await until(started.is_set, "A inside its call", 30)
        finally:
            await asyncio.wait_for(a.stop(), 30)  # cuts the call off, gives the partition back
        async with worker_running(Worker(broker.source(**extra), [b.events], name="B")):
            await until(lambda: bool(b.calls), "B handling the change A was cut off in", 30)
        gate.set()
        await until(lambda: bool(outcome), "A's call to reach its check", 30)

    try:
        run(main(), timeout=120)
    finally:
        gate.set()
    assert [e.id for e in b.flat("item")] == [event.id]
    assert outcome == ["lost"], "the cut-off call's lease did not say lost"
