"""A Kafka worker asked to give up its partition while a handler call in hand does not return.

Worker A holds the topic's one partition and is inside a call that would take
far longer than the group lets a rebalance wait (``max.poll.interval.ms``, the
group's rebalance timeout). Worker B joins. A must not let the partition go
while the call runs: it cancels the call (as when a lease is lost), commits
nothing of it and only then gives the partition up; the same changes are
handled again (by B, or by A connected again), after A's call ended. On main
the call was never cancelled (A waited 60 s, longer than the group's limit,
then let the partition go with the call still running). A plain handler runs on a thread and cannot be cancelled: as with the
other sources, its lease says lost (``current_lease().check()`` raises) and the
worker commits nothing of it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import collecting, run

from walex import Event, Events
from walex.workers import Worker, current_lease

TABLE = "CREATE TABLE item (id int PRIMARY KEY, seq int); CREATE PUBLICATION pub FOR ALL TABLES"
POLL = "max.poll.interval.ms=8000"  # a call in hand during a rebalance: cancelled after 8/3 s


@pytest.mark.parametrize("plain", [False, True], ids=["async", "plain"])
def test_a_call_past_the_rebalance_limit_is_cancelled_before_the_partition_moves(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, plain: bool,
) -> None:
    admin.execute(TABLE)
    calls: list[tuple[str, str, float, float, str]] = []  # worker, first id, start, end, outcome
    lost: list[bool] = []

    def module(me: str, slow: bool) -> Events:
        events = Events()

        async def handle(batch: list[Event]) -> None:
            start, outcome = time.monotonic(), "returned"
            try:
                if slow and batch[0].record["id"] == 1 and not calls:
                    await asyncio.sleep(40)  # far past the group's limit
            except asyncio.CancelledError:
                outcome = "cancelled"
                lease = current_lease()
                lost.append(lease is not None and lease.lost)
                raise
            finally:
                calls.append((me, batch[0].id, start, time.monotonic(), outcome))

        def handle_plain(batch: list[Event]) -> None:
            # on a thread: it cannot be cancelled; it checks its lease before its effect
            start, outcome = time.monotonic(), "returned"
            lease = current_lease()
            assert lease is not None
            if slow and batch[0].record["id"] == 1 and not calls:
                while time.monotonic() < start + 40 and not lease.lost:
                    time.sleep(0.01)
                if lease.lost:
                    outcome = "cancelled"
                    lost.append(True)
            calls.append((me, batch[0].id, start, time.monotonic(), outcome))
            lease.check()

        events.on_event("item")(handle_plain if plain else handle)
        return events

    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "ws.item", 1)
        url = f"kafka://127.0.0.1:{broker.port}?topic=ws.{{table}}"
        source = f"{url}&{GROUP}&{POLL}&group=slow"

        async def until(check: object, what: str, timeout: float = 40) -> None:
            deadline = time.monotonic() + timeout
            while not check():  # type: ignore[operator]
                assert time.monotonic() < deadline, f"{what}; calls: {calls}"
                await asyncio.sleep(0.05)

        async def main() -> None:
            async with collecting(dsn, destinations=[url]), \
                    Worker(source, [module("A", True)], name="A") as a:
                admin.execute("INSERT INTO item VALUES (1, 0)")
                await until(lambda: a.consumer.busy and any(a.consumer.busy.values()),
                            "A inside the slow call")
                async with Worker(source, [module("B", False)], name="B"):
                    await until(lambda: sum(c[4] == "returned" for c in calls) >= 1,
                                "row 1 handled again")
                    admin.execute("INSERT INTO item VALUES (2, 0)")
                    await until(lambda: sum(c[4] == "returned" for c in calls) >= 2,
                                "row 2 handled")
                    await asyncio.sleep(0.5)

        run(main(), timeout=55)
    slow = next(c for c in calls if c[0] == "A")
    assert slow[4] == "cancelled", f"A's slow call was not cancelled: {calls}"
    assert lost == [True], "the cancelled call's lease did not say lost"
    # nothing of it was committed: row 1 was handled again (by B, or by A after it joined
    # again), and no call of the partition started while the slow one ran
    assert any(c[1] == slow[1] and c[4] == "returned" for c in calls), calls
    assert all(c[2] >= slow[3] for c in calls if c is not slow), f"two calls at once: {calls}"
