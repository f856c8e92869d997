"""One worker per partition at a time, even when the broker takes the partition back.

Worker A reaches the broker through a TCP proxy (tests/chaos/proxy.py), worker
B directly. A's handler is slow; while it runs, A loses the partition: on
JetStream its connection goes silent (so no progress report reaches the
server, which hands the message to B after ``ack_wait``), on RabbitMQ its
connection is reset (the broker hands the unacknowledged message to B at
once). Each handler writes its effect to PostgreSQL without any check of its
own (``applied``), and a journal records which worker started, applied or
was cut off on which event, and when. A's call must be cut off before its
effect, so the newer version B applied is never overwritten by the stale one;
on JetStream A is cut off before B starts the message.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import run, until
from workers.test_worker import Broker, made_up, relay, worker_running

from walex import Event, Events
from walex.workers import Worker

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402

STORE = "CREATE TABLE applied (pk int PRIMARY KEY, seq int NOT NULL, id text, worker text)"
SLOW = 8.0  # seconds A's handler takes: far beyond ack_wait and the cut


class Journal:
    def __init__(self) -> None:
        self.rows: list[tuple[float, str, str, str]] = []
        self.lock = threading.Lock()

    def add(self, worker: str, what: str, event_id: str) -> None:
        with self.lock:
            self.rows.append((time.monotonic(), worker, what, event_id))

    def first(self, worker: str, what: str, event_id: str) -> float | None:
        with self.lock:
            return next((t for t, w, x, e in self.rows if (w, x, e) == (worker, what, event_id)),
                        None)

    def has(self, worker: str, what: str, event_id: str | None = None) -> bool:
        with self.lock:
            return any(w == worker and x == what and event_id in (None, e)
                       for _, w, x, e in self.rows)


def write(dsn: str, event: Event, worker: str) -> None:
    """The handler's effect, unfenced: the last writer wins."""
    record: Any = event.record
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("INSERT INTO applied VALUES (%s, %s, %s, %s) ON CONFLICT (pk) DO UPDATE "
                     "SET seq = excluded.seq, id = excluded.id, worker = excluded.worker",
                     (record["id"], record["seq"], event.id, worker))


def handlers(name: str, journal: Journal, dsn: str, slow: bool, plain: bool = False) -> Events:
    events = Events()

    if plain:
        def handle_plain(batch: list[Event]) -> None:
            from walex.workers import current_lease

            for event in batch:
                journal.add(name, "start", event.id)
                if slow:
                    time.sleep(SLOW)  # a thread: cannot be cancelled
                lease = current_lease()
                assert lease is not None and lease.token == batch[-1].id
                if lease.lost:  # what a plain handler checks before its effect
                    journal.add(name, "fenced", event.id)
                    return
                write(dsn, event, name)
                journal.add(name, "applied", event.id)

        events.on_event("item")(handle_plain)
        return events

    async def handle(batch: list[Event]) -> None:
        for event in batch:
            journal.add(name, "start", event.id)
            try:
                if slow:
                    await asyncio.sleep(SLOW)
            except asyncio.CancelledError:
                journal.add(name, "cancelled", event.id)
                raise
            await asyncio.to_thread(write, dsn, event, name)
            journal.add(name, "applied", event.id)

    events.on_event("item")(handle)
    return events


async def declare_queue(b: Broker) -> None:
    """The group's queue of one partition, as a worker group needs it (raw client)."""
    import aio_pika

    connection = await aio_pika.connect(port=b.port)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(f"wk{b.unique}", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"wk{b.unique}.walex.0", durable=True,
                                            arguments={"x-single-active-consumer": True})
        await queue.bind(f"wk{b.unique}", routing_key="*.*.*")
    finally:
        await connection.close()


def stored(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT seq, worker FROM applied WHERE pk = 1").fetchone()
    assert row is not None
    return row[0], row[1]


def test_jetstream_handler_past_ack_wait_is_cut_off_before_another_starts(
    admin: psycopg.Connection, dsn: str, unique: str,
) -> None:
    b = Broker("nats", unique)
    admin.execute(STORE)
    journal = Journal()
    proxy = Proxy("127.0.0.1", b.port).start()
    source = b.source(partitions=1, ack_wait=3)
    v1, v2 = made_up(1, 1, pk=1), made_up(2, 2, pk=1)

    async def main() -> tuple[Worker, Worker]:
        await relay(b, [[v1]], partitions=1)  # the relay creates the stream
        a = Worker(source.replace(f":{b.port}", f":{proxy.port}"),
                   [handlers("A", journal, dsn, slow=True)], name="A", shutdown_grace=5)
        second = Worker(source, [handlers("B", journal, dsn, slow=False)], name="B")
        await a.start()
        try:
            await until(lambda: journal.has("A", "start", v1.id), "A's call", 60)
            proxy.partition()  # A's connection goes silent: its progress reports are lost
            async with worker_running(second):
                await relay(b, [[v2]], partitions=1)
                await until(lambda: journal.has("B", "applied", v2.id), "B applies v2", 60)
                await until(lambda: journal.has("A", "cancelled") or journal.has("A", "applied"),
                            "the end of A's call", SLOW + 30)
                await asyncio.sleep(1)
        finally:
            proxy.heal()
            await asyncio.wait_for(a.stop(), 60)
        return a, second

    try:
        a, second = run(main(), timeout=240)
    finally:
        proxy.stop()
        asyncio.run(b.cleanup())
    assert not journal.has("A", "applied"), journal.rows
    cancelled, b_started = journal.first("A", "cancelled", v1.id), journal.first("B", "start", v1.id)
    assert cancelled is not None and b_started is not None, journal.rows
    assert cancelled < b_started, "A still ran v1 when B started it"
    assert stored(dsn) == (2, "B")
    assert a.fenced == 1 and second.redeliveries >= 1


@pytest.mark.parametrize("plain", [False, True], ids=["async", "plain"])
def test_rabbitmq_connection_reset_mid_handler_cuts_the_call_off(
    admin: psycopg.Connection, dsn: str, unique: str, plain: bool,
) -> None:
    b = Broker("rabbitmq", unique)
    admin.execute(STORE)
    journal = Journal()
    proxy = Proxy("127.0.0.1", b.port).start()
    source = b.source(partitions=1)
    v1, v2 = made_up(1, 1, pk=1), made_up(2, 2, pk=1)

    async def main() -> Worker:
        await declare_queue(b)
        a = Worker(source.replace(f":{b.port}", f":{proxy.port}"),
                   [handlers("A", journal, dsn, slow=True, plain=plain)], name="A",
                   shutdown_grace=SLOW + 5)
        second = Worker(source, [handlers("B", journal, dsn, slow=False)], name="B")
        await a.start()
        try:
            await until(lambda: a.connected, "A to subscribe first (the active consumer)", 60)
            async with worker_running(second):
                await relay(b, [[v1]], partitions=1)
                await until(lambda: journal.has("A", "start", v1.id), "A's call", 60)
                proxy.partition()
                await relay(b, [[v2]], partitions=1)  # the broker sends it to A: lost bytes
                await until(lambda: proxy.dropped_bytes > 0, "bytes to A lost", 30)
                proxy.heal()  # A's connection is reset: the broker gives v1 and v2 to B
                await until(lambda: journal.has("B", "applied", v2.id), "B applies v2", 60)
                ended = ("fenced", "applied") if plain else ("cancelled", "applied")
                await until(lambda: any(journal.has("A", x) for x in ended),
                            "the end of A's call", SLOW + 30)
                await asyncio.sleep(1)
        finally:
            await asyncio.wait_for(a.stop(), 60)
        return a

    try:
        a = run(main(), timeout=240)
    finally:
        proxy.stop()
        asyncio.run(b.cleanup())
    assert not journal.has("A", "applied"), journal.rows
    assert journal.has("A", "fenced" if plain else "cancelled", v1.id), journal.rows
    assert journal.has("B", "applied", v1.id) and journal.has("B", "applied", v2.id)
    assert stored(dsn) == (2, "B")
    assert a.fenced == 1
