"""Redis Streams destination, against the machine's redis-server (127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from support import collecting, run

from walex import ConfigError, Event, WalEx
from walex.destinations import from_url
from walex.lsn import parse_lsn

from .brokers import check_stream, redis_delete, redis_stored, wait_count
from .conftest import require
from .servers import OwnRedis
from .test_nats import TABLES, workload


def test_rows_arrive_once_in_order_per_table(admin: psycopg.Connection, dsn: str,
                                             unique: str) -> None:
    port = require("redis")
    admin.execute(TABLES)
    url = f"redis://127.0.0.1:{port}/0?stream=wt{unique}:{{schema}}.{{table}}&maxlen=1000"

    async def main() -> None:
        try:
            async with collecting(dsn, destinations=[url], batch_size=7) as rec:
                n = workload(admin)
                events = await rec.wait_for(n)
                stored = await wait_count(lambda: redis_stored(f"wt{unique}:*", port), n)
            tables = {e.id: e.table for e in events}
            check_stream(stored, [e.id for e in events], tables)
            streams = {key for _id, _doc, (key, _entry) in stored}
            assert streams == {f"wt{unique}:public.a", f"wt{unique}:public.b.c"}
            for message_id, doc, (key, _entry) in stored:
                assert key.endswith(tables[message_id])
                assert doc["source"].endswith("/" + tables[message_id].replace(".", "/", 1))
            a_events = [e.id for e in events if e.name == "a"]
            assert [i for i, _d, (k, _e) in stored if k.endswith(".a")] == a_events
        finally:
            await redis_delete(f"wt{unique}:*", port)

    run(main())


def test_wrong_key_type_stops_the_app(admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """A key that is not a stream cannot take entries: the app stops with the reason."""
    port = require("redis")
    admin.execute(TABLES)
    url = f"redis://127.0.0.1:{port}/0?stream=wt{unique}:{{table}}"

    events: list[Event] = []

    async def main() -> None:
        client = aioredis.Redis(port=port)
        await client.set(f"wt{unique}:a", "not a stream")
        try:
            with pytest.raises(Exception, match="holds another type"):
                async with collecting(dsn, destinations=[url]) as rec:
                    admin.execute("INSERT INTO a VALUES (1, 1)")
                    events.extend(await rec.wait_for(1))  # the handler got it, Redis did not
                    await rec._until(lambda: False, 15, "the app to stop")
            assert rec.app is not None and rec.app.transactions_handled == 0
            assert rec.app.ack.flushed < parse_lsn(events[0].lsn)  # not acknowledged
        finally:
            await client.delete(f"wt{unique}:a")
            await client.aclose()

    run(main())


def test_bad_urls() -> None:
    with pytest.raises(ConfigError, match="needs the parameter stream"):
        WalEx("postgresql://u@h/db", publication="p", destinations=["redis://localhost"])
    with pytest.raises(ConfigError, match="by its number"):
        WalEx("postgresql://u@h/db", publication="p", destinations=["redis://h/x?stream=s"])
    shown = from_url("redis://:hunter2@localhost:6379/0?stream=s").display
    assert "hunter2" not in shown


def test_publishes_are_counted_in_the_metrics(admin: psycopg.Connection, dsn: str,
                                              unique: str) -> None:
    """walex_destination_published_total and the publish histogram count what Redis stored."""
    from walex.embedded import free_port

    from test_observe import get, samples

    port = require("redis")
    admin.execute(TABLES)
    url = f"redis://127.0.0.1:{port}/0?stream=wt{unique}:{{table}}"
    metrics = free_port()

    async def main() -> None:
        try:
            async with collecting(dsn, destinations=[url], metrics_port=metrics) as rec:
                n = workload(admin)
                await rec.wait_for(n)
                await wait_count(lambda: redis_stored(f"wt{unique}:*", port), n)
                status, text = await asyncio.to_thread(get, f"http://127.0.0.1:{metrics}/metrics")
            assert status == 200
            found = {k: v for k, v in samples(text).items() if "destination" in k}
            published = [v for k, v in found.items() if k.startswith("walex_destination_published")]
            assert published == [n], found
            counts = [v for k, v in found.items()
                      if k.startswith("walex_destination_publish_seconds_count")]
            assert len(counts) == 1 and counts[0] >= 1, found
            assert all("secret" not in k for k in found)
        finally:
            await redis_delete(f"wt{unique}:*", port)

    run(main())


def test_a_stalled_redis_fails_the_batch_within_the_timeout(tmp_path: Path) -> None:
    """The timeout bounds the whole batch (redis-py reads without its per-reply timer): a
    Redis that stops answering (SIGSTOP) fails the batch after ``timeout``; once it answers
    again, the batch published again on a new connection is stored, ids and order kept."""
    from walex.destinations.base import Unavailable
    from walex.destinations.encoding import Outgoing

    batch = [Outgoing(f"id-{i}", "public", "a", "insert", 0, b'{"n":%d}' % i,
                      "/db/public/a", "2026-12-06T00:00:00Z", f"public.a/{i}", str(i))
             for i in range(500)]

    async def main(server: OwnRedis) -> None:
        destination = from_url(f"redis://127.0.0.1:{server.port}/0?stream=st:{{table}}&timeout=1")
        await destination.open()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable, match="no reply from Redis to the batch within 1s"):
                await destination.publish(batch)
            assert time.monotonic() - started < 4
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await destination.publish(batch)  # the dropped connection is made again
        await destination.close()
        client = aioredis.Redis(port=server.port)
        try:
            entries = await client.xrange("st:a")
        finally:
            await client.aclose()
        assert [fields[b"id"] for _entry, fields in entries][-500:] == \
            [item.id.encode() for item in batch]

    with OwnRedis(tmp_path) as server:
        run(main(server))
