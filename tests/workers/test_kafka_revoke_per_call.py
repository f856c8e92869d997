"""A Kafka worker that gives up a partition during a call cuts off that call alone, and goes on.

Worker A holds both partitions of a topic and is inside a call for one of them
that would take far longer than the group lets a rebalance wait. Worker B
joins: A cancels the call (nothing of it committed) and lets the partitions
go; it stays connected, in the group, and handles the partition it is given
next; the cut call's changes are handled again with the same event ids, never
while it ran. On main the cancelled call revoked A's one lane for every
partition: A disconnected and joined the group again as a new member (a
reconnect, two more rebalances for the whole group).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path

import psycopg
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import collecting, run

from walex import Event, Events
from walex.workers import Worker, current_lease

TABLE = "CREATE TABLE item (id int PRIMARY KEY, seq int); CREATE PUBLICATION pub FOR ALL TABLES"
POLL = "max.poll.interval.ms=8000"  # a call in hand during a rebalance: cut off after 8/3 s


def partition(row: int) -> int:
    """librdkafka's ``consistent`` partitioner: CRC-32 of the key, modulo the partitions."""
    return zlib.crc32(f"public.item/{row}".encode()) % 2


def test_a_call_cut_off_by_a_revoke_leaves_the_worker_connected_and_handling(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    admin.execute(TABLE)
    calls: list[tuple[str, int, str, float, float, str]] = []  # worker, part, id, start, end, how
    lost: list[str] = []
    rows = [n for n in range(1, 40) if partition(n) == 0][:4] + \
        [n for n in range(1, 40) if partition(n) == 1][:4]

    def module(me: str) -> Events:
        events = Events()

        async def handle(batch: list[Event]) -> None:
            lease = current_lease()
            assert lease is not None
            start, outcome = time.monotonic(), "returned"
            try:
                if me == "A" and batch[0].record["id"] == rows[0] and not calls:
                    await asyncio.sleep(40)  # far past the group's limit
            except asyncio.CancelledError:
                outcome = "cancelled"
                lost.append(lease.reason)
                raise
            finally:
                calls.append((me, lease.partition, batch[0].id, start, time.monotonic(), outcome))

        events.on_event("item")(handle)
        return events

    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wr.item", 2)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wr.{{table}}&partitioner=consistent"
        source = f"{url}&{GROUP}&{POLL}&group=percall"

        async def until(check: object, what: str, timeout: float = 40) -> None:
            deadline = time.monotonic() + timeout
            while not check():  # type: ignore[operator]
                assert time.monotonic() < deadline, f"{what}; calls: {calls}"
                await asyncio.sleep(0.05)

        async def main() -> tuple[int, bool]:
            async with collecting(dsn, destinations=[url]), \
                    Worker(source, [module("A")], name="A") as a:
                await until(lambda: len(a.consumer.assigned) == 2, "A assigned both partitions")
                session = a.consumer.session
                admin.execute("INSERT INTO item VALUES (%s, 0)", (rows[0],))
                await until(lambda: a.consumer.busy and any(a.consumer.busy.values()),
                            "A inside the slow call")
                async with Worker(source, [module("B")], name="B") as b:
                    await until(lambda: any(c[5] == "cancelled" for c in calls), "A's call cut off")
                    await until(lambda: len(a.consumer.assigned) == 1 and
                                len(b.consumer.assigned) == 1, "one partition each")
                    await until(lambda: any(c[2] == calls[0][2] and c[5] == "returned"
                                            for c in calls), "the cut call's change handled again")
                    for n in rows[1:]:
                        admin.execute("INSERT INTO item VALUES (%s, 0)", (n,))
                    await until(lambda: sum(c[5] == "returned" for c in calls) >= len(rows),
                                "every row handled")
                    await until(lambda: {c[0] for c in calls[1:]} == {"A", "B"},
                                "both workers handling")
                return a.reconnects, a.consumer.session is session

        reconnects, same_session = run(main(), timeout=90)
    cut = calls[0]
    assert cut[0] == "A" and cut[5] == "cancelled", calls
    assert lost and "revoked" in lost[0], lost
    # A stayed connected, in the group, as the same member; it handled its new partition
    assert reconnects == 0 and same_session, \
        f"A reconnected ({reconnects}) after one call was cut off: {calls}"
    # the cut call's change was handled again, with the same id, after the cut call ended;
    # no two calls of one partition at once
    again = [c for c in calls if c[2] == cut[2] and c[5] == "returned"]
    assert again and all(c[3] >= cut[4] for c in again), calls
    for part in (0, 1):
        windows = sorted((c[3], c[4]) for c in calls if c[1] == part)
        assert all(s2 >= e1 for (_, e1), (s2, _) in zip(windows, windows[1:])), \
            f"two calls of partition {part} at once: {calls}"
    handled = {c[2] for c in calls if c[5] == "returned"}
    assert len(handled) == len(rows), calls
