"""A Kafka worker whose brokers go away while it consumes, then come back.

librdkafka reconnects by itself and tells only its error callback, so a worker
that left it at that went on reporting itself consuming (``/healthz`` 200,
``walex_worker_connected`` 1) with nothing in its log above debug, for as long as
the brokers were gone. A worker must say what the other sources say: no broker
answered for ``timeout`` seconds, a warning, ``reconnecting`` (503) while it
connects again with backoff, and consuming once they are back.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import psycopg
import pytest
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import collecting, run

from walex import Event, Events
from walex.observe.workers import worker_health
from walex.workers import Worker

TABLE = "CREATE TABLE item (id int PRIMARY KEY, seq int); CREATE PUBLICATION pub FOR ALL TABLES"


def test_brokers_gone_the_worker_says_so_reconnects_and_resumes(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    admin.execute(TABLE)
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wg.item", 1)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wg.{{table}}&timeout=2"
        got: list[Event] = []
        events = Events()
        events.on_event("item")(got.extend)

        async def until(check: object, what: str, timeout: float = 60) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not check():  # type: ignore[operator]
                assert loop.time() < deadline, what
                await asyncio.sleep(0.1)

        async def main() -> None:
            async with collecting(dsn, destinations=[url]) as rec, \
                    Worker(f"{url}&{GROUP}&group=gone&sasl.password=pw7777", [events]) as worker:
                admin.execute("INSERT INTO item VALUES (1, 0)")
                await until(lambda: len(got) == 1, "the first row")
                assert worker_health(worker)[0] == 200
                await asyncio.to_thread(broker.stop)  # SIGKILL
                gone = asyncio.get_running_loop().time()
                await until(lambda: not worker.connected, "the worker never noticed", 20)
                noticed = asyncio.get_running_loop().time() - gone
                assert noticed < 2 + 5, noticed  # timeout=2, a probe a second
                status, body = worker_health(worker)
                assert (status, body["status"]) == (503, "reconnecting"), body
                await asyncio.sleep(3)  # still gone: it goes on trying
                assert not worker.connected
                await asyncio.to_thread(broker.start)  # the same port, empty
                create_topic(broker.port, "wg.item", 1)
                admin.execute("INSERT INTO item VALUES (2, 0)")
                await until(lambda: any(e.record["id"] == 2 for e in got), "the row after", 90)
                assert worker.connected and worker_health(worker)[0] == 200
                assert rec.app is not None

        with caplog.at_level(logging.WARNING, logger="walex.workers"):
            run(main(), timeout=150)
    lost = [r.getMessage() for r in caplog.records if "lost kafka://" in r.getMessage()]
    assert lost and f"no Kafka broker of 127.0.0.1:{broker.port} answered for 2s" in lost[0], lost
    assert "pw7777" not in caplog.text
