"""Kafka workers (a consumer group) in the test's process, fed by a relay app, on tansu."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import psycopg
import pytest
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu, free_port
from support import collecting, run

from walex import Event, Events
from walex.errors import ConfigError
from walex.workers import Worker
from walex.workers.kafka import topic_pattern

TABLE = "CREATE TABLE item (id int PRIMARY KEY, seq int); CREATE PUBLICATION pub FOR ALL TABLES"


def test_a_group_handles_every_change_in_key_order_and_a_later_group_starts_at_the_beginning(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    admin.execute(TABLE)
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wk.item", 4)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wk.{{table}}&tombstones=true"
        source = f"{url}&{GROUP}"
        got: dict[str, list[Event]] = {"first": [], "later": [], "latest": []}

        def recorder(name: str) -> Events:
            events = Events()

            @events.on_event("item")
            def handle(batch: list[Event]) -> None:
                got[name].extend(batch)

            return events

        async def main() -> tuple[list[Event], Event]:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                admin.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, 8) g")
                for seq in range(1, 6):
                    admin.execute("UPDATE item SET seq = %s", (seq,))
                admin.execute("DELETE FROM item WHERE id = 8")  # a tombstone follows it
                events = await rec.wait_for(8 * 6 + 1, timeout=60)
                await rec._until(lambda: app.transactions_handled == 7, 60, "all published")
                async with Worker(f"{source}&group=g1", [recorder("first")]) as worker:
                    await rec._until(lambda: len(got["first"]) >= len(events), 90, "group g1")
                    assert worker.consumer.group == "g1"
                # a group started later reads from the beginning; start=latest from the end
                async with Worker(f"{source}&group=g2", [recorder("later")]), \
                        Worker(f"{source}&group=g3&start=latest", [recorder("latest")]) as w3:
                    await rec._until(lambda: len(got["later"]) >= len(events), 90, "group g2")
                    await rec._until(lambda: len(w3.consumer.assigned) == 4, 90, "g3 assigned")
                    await asyncio.sleep(1)
                    admin.execute("INSERT INTO item VALUES (100, 0)")
                    [new] = (await rec.wait_for(len(events) + 1))[-1:]
                    await rec._until(lambda: new in got["latest"], 60, "g3 to get the new row")
                    # tansu's high watermark is its last batch's first offset + 1 (Apache
                    # Kafka's is the end), so "latest" may start inside that batch there
                    # (when the relay published everything in one batch per partition, g3
                    # misses only each partition's first record): g3 did not start at the
                    # beginning, as g2 did
                    assert {e.id for e in events} - {e.id for e in got["latest"]}
                return events, new

        events, new = run(main(), timeout=240)
    for name, expected in (("first", events), ("later", [*events, new])):
        assert sorted(e.id for e in got[name]) == sorted(e.id for e in expected), name
        per_row: dict[int, list[int]] = {}
        for e in got[name]:
            if e.type.value != "delete":
                per_row.setdefault(e.record["id"], []).append(e.record["seq"])
        per_row.pop(100, None)
        assert all(seqs == list(range(6)) for seqs in per_row.values()), per_row


def test_worker_source_configuration() -> None:
    events = Events()
    events.on_event("item")(lambda batch: None)
    with pytest.raises(ConfigError, match="start must be earliest or latest"):
        Worker("kafka://h:9092?topic=t&start=middle", [events])
    with pytest.raises(ConfigError, match="group.id is set by walex"):
        Worker("kafka://h:9092?topic=t&group.id=x", [events])
    worker = Worker("kafka://u:pw1234@h:9092?topic=t&sasl.password=pw1234&group=ok", [events])
    assert "pw1234" not in repr(worker)
    assert topic_pattern("walex.{schema}.{table}") == "^walex\\..+\\..+$"
    assert topic_pattern("plain.topic") == "plain.topic"


def test_unreachable_broker_is_retried_with_a_clear_warning_and_a_refused_login_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    events = Events()
    events.on_event("item")(lambda batch: None)
    port = free_port()

    async def unreachable() -> None:
        worker = Worker(f"kafka://127.0.0.1:{port}?topic=t&timeout=1&sasl.password=pw5555",
                        [events])
        await asyncio.wait_for(worker.start(), 30)  # returns: the broker is retried
        assert not worker.connected
        await asyncio.wait_for(worker.stop(), 30)

    with caplog.at_level(logging.WARNING, logger="walex.workers"):
        run(unreachable(), timeout=60)
    assert f"no Kafka broker of 127.0.0.1:{port} answered" in caplog.text
    assert "pw5555" not in caplog.text

    server = OwnTansu(tmp_path)
    server.authentication = True
    with server as broker:
        async def refused() -> None:
            worker = Worker(f"kafka://walex:pw6666@127.0.0.1:{broker.port}?topic=t&timeout=5"
                            "&security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-256",
                            [events])
            with pytest.raises(ConfigError, match="refused the login") as info:
                await asyncio.wait_for(worker.start(), 60)
            assert "pw6666" not in str(info.value)

        run(refused(), timeout=90)
