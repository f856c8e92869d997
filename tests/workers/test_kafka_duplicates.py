"""A transaction stored more than once in a partition reaches a Kafka worker's handler once.

A relay whose publish was stored by the broker, in part or whole, but not
confirmed to it (the connection lost before the answer, the timeout passed)
produces the whole batch again on a new producer: the partition then holds the
transaction's records more than once, copies one after the other, with the same
``ce_id`` (README: "a record may be stored twice"). A worker buffers the copies
together and hands a partition's consecutive records of one commit to one call:
the handler got each event two or three times in one call, which a handler that
drops duplicates by id (a unique key on it, the README's advice) cannot get past:
it fails the same way on every restart. A copy is left out of the call (counted
in the consumer's ``copies``), the transaction handed whole, once, and the
copies' offsets committed with the call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import collecting, run

from walex import Event, Events
from walex.destinations.base import DestinationURL
from walex.destinations.encoding import encode
from walex.destinations.kafka import KafkaDestination
from walex.workers import Worker

TABLE = "CREATE TABLE item (id int PRIMARY KEY, seq int); CREATE PUBLICATION pub FOR ALL TABLES"


def test_a_transaction_stored_twice_is_handled_once(admin: psycopg.Connection, dsn: str,
                                                    tmp_path: Path) -> None:
    admin.execute(TABLE)
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wd.item", 1)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wd.{{table}}"
        calls: list[list[str]] = []
        events = Events()

        @events.on_event("item")
        def handle(batch: list[Event]) -> None:
            ids = [e.id for e in batch]
            # a handler keeping ids in a table with a unique key on them
            assert len(set(ids)) == len(ids), f"one call holds an event twice: {ids}"
            calls.append(ids)

        async def main() -> tuple[list[Event], int]:
            async with collecting(dsn) as rec:
                with admin.transaction():
                    admin.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, 4) g")
                admin.execute("INSERT INTO item VALUES (5, 0)")
                published = await rec.wait_for(5, timeout=60)
            # what a relay produces when the broker stored the first transaction's batch
            # in part (its first request), then whole, without confirming either: the
            # batch again on a new producer each time, then the next transaction
            relay = KafkaDestination(DestinationURL(url))
            await relay.open()
            try:
                for batch in (published[:2], published[:4], published[:4]):
                    await relay.publish(encode(batch))
                    await relay.close()
                    await relay.open()
                await relay.publish(encode(published[4:]))
            finally:
                await relay.close()
            async with Worker(f"{url}&{GROUP}&group=dups", [events],
                              on_error="stop") as worker:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while sum(map(len, calls)) < 5:
                    assert worker._error is None, worker._error
                    assert loop.time() < deadline, calls
                    await asyncio.sleep(0.1)
                assert worker.consumer.copies == 6
                await asyncio.sleep(1.5)  # the offsets committed (every 0.5 s)
                committed = worker.consumer.committed.get(("wd.item", 0))
            return published, committed or 0

        published, committed = run(main(), timeout=150)
    # each transaction whole, in one call, once
    assert calls == [[e.id for e in published[:4]], [published[4].id]], calls
    assert committed == 11, committed  # past every copy and the second transaction
