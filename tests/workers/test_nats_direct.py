"""The two ways a NATS worker's messages reach its lanes (walex.workers.natsdirect): straight
from nats-py's parser (direct) and through the pull subscriptions' queues and ``fetch``
(the fallback, for a nats-py walex did not check), against the machine's nats-server. Both
hand every event once, in order per partition, one per call, with the same stream sequences
and delivery counts; both give back what they hold when the worker stops, and both deliver
a message again to the next worker after a failed call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support import run, until
from workers.test_worker import Broker, Calls, made_up, relay, worker_running

from walex import Event
from walex.workers import Worker, current_lease
from walex.workers import natsdirect as natsdirect_module
from walex.workers.natsdirect import Inboxes

WAYS = ["direct", "subscription"]
PARTITIONS = 3
COUNT = 60


def _way(way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if way == "subscription":  # a client the direct way was not checked for
        monkeypatch.setattr(natsdirect_module, "usable", lambda nc, sids: False)


@pytest.mark.parametrize("way", WAYS)
def test_both_ways_hand_every_event_once_in_order(unique: str, way: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _way(way, monkeypatch)
    b = Broker("nats", unique)
    calls = Calls()
    seen: list[tuple[int, str, int | None, int | None]] = []  # partition, id, sequence, attempt

    async def record(batch: list[Event]) -> None:
        lease = current_lease()
        assert lease is not None
        seen.extend((lease.partition, e.id, lease.sequence, lease.attempt) for e in batch)
        await calls.handler("item")(batch)

    calls.events.on_event("item")(record)
    # transactions of 1 to 4 rows over the partitions
    batches = [[made_up(i + k) for k in range(1 + i % 4)] for i in range(0, COUNT, 4)]
    events = [e for batch in batches for e in batch]

    async def main() -> tuple[Worker, Any, Any]:
        await relay(b, batches, partitions=PARTITIONS)
        worker = Worker(b.source(partitions=PARTITIONS), [calls.events])
        async with worker_running(worker):
            await until(lambda: len(calls.flat("item")) >= len(events), "every event handled", 60)
            inboxes = worker.consumer.inboxes  # type: ignore[attr-defined]
            nc = worker.consumer.destination.nc
            queued = sum(lane.psub.delivered for lane in worker.consumer.lanes)  # type: ignore[attr-defined]
        assert queued >= len(events)  # the subscriptions' counts see both ways' messages
        return worker, inboxes, nc

    try:
        worker, inboxes, nc = run(main(), timeout=120)
    finally:
        asyncio.run(b.cleanup())
    if way == "direct":
        assert isinstance(inboxes, Inboxes)
        # given back before the connection closed
        assert vars(nc).get("_process_msg") != inboxes._take
    else:
        assert inboxes is None
    handled = calls.flat("item")
    assert sorted(e.id for e in handled) == sorted(e.id for e in events)  # each once
    assert all(len(batch) == 1 for batch in calls.of("item"))  # one message per call
    for p in range(PARTITIONS):  # stream order per partition, first deliveries
        mine = [(seq, event_id, attempt) for part, event_id, seq, attempt in seen if part == p]
        assert mine, f"partition {p} got nothing"
        assert [s for s, _, _ in mine] == sorted(s for s, _, _ in mine)
        assert [i for _, i, _ in mine] == sorted(i for _, i, _ in mine)
        assert all(attempt == 1 for _, _, attempt in mine)
    assert worker.redeliveries == 0 and worker.duplicates == 0


@pytest.mark.parametrize("way", WAYS)
def test_both_ways_give_back_and_redeliver(unique: str, way: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing call stops the first worker (its message given back, nak'ed at once); the
    next worker gets that message again, as its second delivery, then the rest in order."""
    _way(way, monkeypatch)
    b = Broker("nats", unique)
    first, second = Calls(), Calls()
    first.events.on_event("item")(first.handler("item", fail=lambda batch: batch[0].id ==
                                                 made_up(2).id))
    attempts: list[tuple[str, int | None]] = []

    async def note(batch: list[Event]) -> None:
        lease = current_lease()
        assert lease is not None
        attempts.append((batch[0].id, lease.attempt))

    second.events.on_event("item")(second.handler("item"))
    second.events.on_event("item")(note)

    async def main() -> Worker:
        await relay(b, [[made_up(i)] for i in range(5)], partitions=1)
        worker = Worker(b.source(partitions=1, ack_wait=60), [first.events], max_retries=0)
        async with worker_running(worker):
            await asyncio.wait_for(worker._stopped.wait(), 30)  # the failure stopped it
        assert isinstance(worker._error, Exception)
        other = Worker(b.source(partitions=1, ack_wait=60), [second.events])
        async with worker_running(other):
            # at once, not after ack_wait: the message was given back
            await until(lambda: len(second.flat("item")) >= 3, "the rest handed over", 20)
        return other

    try:
        other = run(main(), timeout=90)
    finally:
        asyncio.run(b.cleanup())
    assert [e.id for e in first.flat("item")] == [made_up(i).id for i in range(2)]
    assert [e.id for e in second.flat("item")] == [made_up(i).id for i in range(2, 5)]
    assert attempts[0] == (made_up(2).id, 2) and other.redeliveries == 1
