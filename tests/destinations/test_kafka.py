"""Kafka destination against a real Kafka-protocol broker: tansu, started per test on a free port.

tansu keeps its log in memory: a killed broker comes back empty. What it had
confirmed before the kill is the broker's loss; what these tests check is that
walex acknowledged to PostgreSQL nothing the broker had not confirmed, and
that it resumes by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex import Event, WalEx
from walex.destinations import from_url
from walex.destinations.base import Unavailable
from walex.errors import ConfigError, DestinationError
from walex.lsn import parse_lsn

from .brokers import VALIDATOR
from .kafka_support import create_topic, records, stored
from .servers import OwnTansu, free_port

TABLES = "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR ALL TABLES"


def confirmed(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                        "WHERE slot_name = %s", (slot,)).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


def test_every_event_once_with_its_key_headers_and_a_tombstone(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    admin.execute(TABLES)
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wk.a", 4)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wk.{{table}}&tombstones=true&linger.ms=1"

        async def main() -> list[Event]:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                admin.execute("INSERT INTO a SELECT g, 'x' FROM generate_series(1, 40) g")
                for i in range(1, 41, 3):
                    admin.execute("UPDATE a SET v = 'y' WHERE id = %s", (i,))
                admin.execute("DELETE FROM a WHERE id = 2")
                events = await rec.wait_for(40 + 14 + 1, timeout=60)
                await rec._until(lambda: app.transactions_handled == 16, 60, "all published")
                return events

        events = run(main(), timeout=120)
        got = records(broker.port, "wk.a")
    values = [m for m in got if m.value() is not None]
    by_id = {json.loads(m.value())["id"]: m for m in values}
    assert sorted(by_id) == sorted(e.id for e in events) and len(values) == len(events), \
        "not every event exactly once"
    partition_of_key: dict[bytes, set[int]] = defaultdict(set)
    per_partition: dict[int, list[str]] = defaultdict(list)
    for m in values:
        doc = json.loads(m.value())
        assert not list(VALIDATOR.iter_errors(doc))
        assert m.key() == doc["partitionkey"].encode() == f"public.a/{doc['subject']}".encode()
        headers = dict(m.headers())
        assert headers["ce_id"] == doc["id"].encode()
        assert headers["ce_specversion"] == b"1.0"
        assert headers["ce_source"] == doc["source"].encode()
        assert headers["ce_type"] == doc["type"].encode()
        assert headers["ce_time"] == doc["time"].encode()
        assert headers["ce_subject"] == doc["subject"].encode()
        assert headers["content-type"].startswith(b"application/cloudevents+json")
        partition_of_key[m.key()].add(m.partition())
        per_partition[m.partition()].append(doc["id"])
    assert all(len(parts) == 1 for parts in partition_of_key.values()), "a key in two partitions"
    assert len({p for parts in partition_of_key.values() for p in parts}) > 1, "one partition only"
    for ids in per_partition.values():  # commit order within each partition
        assert ids == sorted(ids)
    [tombstone] = [m for m in got if m.value() is None]
    assert tombstone.key() == b"public.a/2"
    delete = by_id[events[-1].id]
    assert tombstone.partition() == delete.partition() and tombstone.offset() > delete.offset()


@pytest.mark.parametrize("outage, window", [("kill", 1), ("kill", 64), ("pause", 64)])
def test_broker_down_nothing_acknowledged_early_and_the_relay_resumes(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str, outage: str, window: int,
) -> None:
    """``kill``: SIGKILL, restarted empty on the same port; ``pause``: SIGSTOP, then SIGCONT
    (the broker keeps its log and answers the requests it held: every event is there)."""
    admin.execute(TABLES)
    slot = f"kafka_{unique}"
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wk.a", 2)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wk.{{table}}&timeout=2"

        async def main() -> list[Event]:
            async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                                  status_interval=0.5, destination_window=window) as rec:
                app = rec.app
                admin.execute("INSERT INTO a VALUES (1, 'x'), (2, 'x')")
                await rec._until(lambda: app.transactions_handled == 1, 60, "the first one")
                first = (await rec.wait_for(2))[1]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while confirmed(admin, slot) < parse_lsn(first.lsn):
                    assert loop.time() < deadline, "the confirmed transaction was never acknowledged"
                    await asyncio.sleep(0.1)
                assert broker.proc is not None
                if outage == "kill":
                    await asyncio.to_thread(broker.stop)  # SIGKILL: tansu forgets everything
                else:
                    broker.proc.send_signal(signal.SIGSTOP)
                admin.execute("INSERT INTO a VALUES (3, 'y'), (4, 'y')")
                admin.execute("UPDATE a SET v = 'z' WHERE id = 1")
                # the handlers have the second transaction (with a window, the third too)
                cut = (await rec.wait_for(4 if window == 1 else 5))[2]
                await rec._until(lambda: app.destinations.retries >= 2, 90, "two failed attempts")
                await asyncio.sleep(2)  # four status intervals
                assert app.transactions_handled == 1
                assert app.ack.flushed < parse_lsn(cut.lsn)
                assert confirmed(admin, slot) < parse_lsn(cut.lsn), "acknowledged unconfirmed"
                if outage == "kill":  # same port, empty: the topic is created again
                    await asyncio.to_thread(broker.start)
                else:
                    broker.proc.send_signal(signal.SIGCONT)
                await rec._until(lambda: app.transactions_handled == 3, 120, "the broker back")
                events = await rec.wait_for(5)
                deadline = loop.time() + 30
                while confirmed(admin, slot) < parse_lsn(events[-1].lsn):
                    assert loop.time() < deadline, "never acknowledged after the restart"
                    await asyncio.sleep(0.1)
                return events

        events = run(main(), timeout=300)
        after = stored(broker.port, "wk.a")
    ids = sorted({i for i, _doc, _m in after})
    kept = events if outage == "pause" else events[2:]  # a killed tansu lost the first one
    assert ids == sorted(e.id for e in kept), "the transactions of the outage are not all there"


def test_unreachable_broker_at_start_is_a_clear_error_not_a_hang() -> None:
    port = free_port()
    destination = from_url(f"kafka://127.0.0.1:{port}?topic=t&timeout=2&sasl.password=hunter22")

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await destination.open()
        assert time.monotonic() - started < 30
        text = str(info.value)
        assert f"127.0.0.1:{port}" in text and "answered" in text
        assert "hunter22" not in text and "hunter22" not in destination.display
        assert not destination.opened

    run(main(), timeout=60)


def test_a_refused_login_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = OwnTansu(tmp_path)
    server.authentication = True
    with server as broker:
        destination = from_url(
            f"kafka://walex:s3cr3tpw@127.0.0.1:{broker.port}?topic=t&timeout=5"
            "&security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-256"
        )

        async def main() -> None:
            with pytest.raises(ConfigError, match="refused the login") as info:
                await destination.open()
            assert "sasl.password" in str(info.value) and "s3cr3tpw" not in str(info.value)

        with caplog.at_level(logging.DEBUG):
            run(main(), timeout=60)
    assert "s3cr3tpw" not in caplog.text


def test_without_ce_headers_a_record_carries_its_content_type_alone(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """``ce_headers=false``: the value, key and topic as always, the ``content-type``
    header and no ``ce_*`` one (a tombstone none at all)."""
    admin.execute(TABLES)
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wh.a", 2)
        url = (f"kafka://127.0.0.1:{broker.port}?topic=wh.{{table}}&tombstones=true"
               "&linger.ms=1&ce_headers=false")

        async def main() -> list[Event]:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                admin.execute("INSERT INTO a SELECT g, 'x' FROM generate_series(1, 10) g")
                admin.execute("DELETE FROM a WHERE id = 3")
                events = await rec.wait_for(11, timeout=60)
                await rec._until(lambda: app.transactions_handled == 2, 60, "all published")
                return events

        events = run(main(), timeout=120)
        got = records(broker.port, "wh.a")
    values = [m for m in got if m.value() is not None]
    assert sorted(json.loads(m.value())["id"] for m in values) == sorted(e.id for e in events)
    for m in values:
        doc = json.loads(m.value())
        assert m.key() == doc["partitionkey"].encode()
        assert m.headers() == [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    assert [m.headers() for m in got if m.value() is None] == [None]


def test_settings_walex_owns_and_unknown_settings_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="acks is set by walex"):
        from_url("kafka://127.0.0.1:9092?acks=1")
    with pytest.raises(ConfigError, match="delivery.report.only.error is set by walex"):
        from_url("kafka://127.0.0.1:9092?delivery.report.only.error=false")
    for name in ("message.timeout.ms", "delivery.timeout.ms"):  # timeout= is walex's
        with pytest.raises(ConfigError, match=f"{name} is set by walex .*timeout="):
            from_url(f"kafka://127.0.0.1:9092?{name}=5000")
    for name in ("retries", "message.send.max.retries"):  # order per key: walex's timeout=
        with pytest.raises(ConfigError, match=f"{name} is set by walex .*timeout="):
            from_url(f"kafka://127.0.0.1:9092?{name}=2")
    with pytest.raises(ConfigError, match="No such configuration property: \"no.such.setting\""):
        from_url("kafka://127.0.0.1:1?no.such.setting=1")
    with pytest.raises(ConfigError, match="refused its settings: Invalid value") as info:
        from_url("kafka://127.0.0.1:1?linger.ms=soon&sasl.password=pw9876")
    assert "pw9876" not in str(info.value)
    multi = from_url("kafka://u:pw@h1:9092,h2:9093?topic=t&sasl.password=x%40y%21&timeout=1")
    assert multi.display.startswith("kafka://***@h1:9092,h2:9093?topic=t&sasl.password=***")
    assert "x%40y%21" not in multi.display and "pw" not in multi.display
    assert multi.settings["bootstrap.servers"] == "h1:9092,h2:9093"  # type: ignore[attr-defined]
    assert multi.settings["sasl.password"] == "x@y!"  # type: ignore[attr-defined]
    app = WalEx("postgresql://u@h/db", publication="p",
                destinations=["kafka://h:9092?sasl.password=topsecret1"])
    assert "topsecret1" not in repr(app.destinations)


@pytest.mark.parametrize("policy", ["stop", "dead_letter"])
def test_a_record_too_large_follows_on_error(admin: psycopg.Connection, dsn: str, tmp_path: Path,
                                             policy: str) -> None:
    admin.execute(TABLES)
    dead: list[Any] = []
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wk.a", 1)
        # the producer's limit: a record above it is refused for good (not retried)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wk.{{table}}&message.max.bytes=3000"

        async def main() -> None:
            if policy == "stop":
                with pytest.raises(DestinationError, match="MSG_SIZE_TOO_LARGE") as info:
                    async with collecting(dsn, destinations=[url]) as rec:
                        admin.execute("INSERT INTO a VALUES (1, repeat('x', 5000))")
                        [event] = await rec.wait_for(1)
                        await rec._until(lambda: False, 30, "the app to stop")
                message = str(info.value)  # the topic and the fix
                assert "topic 'wk.a' refused a record for good" in message, message
                assert "Fix: the record is over the producer's message.max.bytes" in message
                assert "--entity-name wk.a --add-config max.message.bytes=" in message
                assert rec.app is not None and rec.app.ack.flushed < parse_lsn(event.lsn)
                return

            def dead_letter(events: list[Event], exc: BaseException) -> None:
                dead.append(([e.id for e in events], exc))

            async with collecting(dsn, destinations=[url], on_error=dead_letter) as rec:
                app = rec.app
                admin.execute("INSERT INTO a VALUES (1, repeat('x', 5000))")
                admin.execute("INSERT INTO a VALUES (2, 'small')")
                events = await rec.wait_for(2, timeout=30)
                await rec._until(lambda: app.transactions_handled == 2, 30, "both transactions")
                assert app.destinations.refusals == 1 and app.destinations.retries == 0
            [(ids, exc)] = dead
            assert ids == [events[0].id] and isinstance(exc, DestinationError)
            assert [i for i, _d, _m in stored(broker.port, "wk.a")] == [events[1].id]

        run(main(), timeout=120)


def test_a_topic_that_does_not_exist_follows_on_error_with_the_fix(
        admin: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    """tansu creates a topic when a producer's metadata request lets it; with
    allow.auto.create.topics=false it answers UNKNOWN_TOPIC_OR_PART: the broker's refusal
    (auto-creation off) is a DestinationError naming the topic and the fix, never retried."""
    admin.execute(TABLES)
    with OwnTansu(tmp_path) as broker:
        url = (f"kafka://127.0.0.1:{broker.port}?topic=missing.{{table}}"
               "&allow.auto.create.topics=false&topic.metadata.propagation.max.ms=1000")

        async def main() -> None:
            with pytest.raises(DestinationError) as info:
                async with collecting(dsn, destinations=[url]) as rec:
                    admin.execute("INSERT INTO a VALUES (1, 1)")
                    [event] = await rec.wait_for(1)
                    await rec._until(lambda: False, 60, "the app to stop")
            message = str(info.value)
            assert "topic 'missing.a' refused a record for good" in message, message
            assert "UNKNOWN_TOPIC" in message
            assert ("Fix: create topic 'missing.a' on the broker (kafka-topics.sh --create "
                    "--topic missing.a), or turn the broker's auto.create.topics.enable on"
                    ) in message, message
            app = rec.app
            assert app is not None and app.destinations.retries == 0
            assert app.ack.flushed < parse_lsn(event.lsn)

        run(main(), timeout=120)


@pytest.mark.parametrize("cut", ["/", "#", "?"])
@pytest.mark.parametrize("head", ["abc", "1234"])
def test_a_password_with_an_unencoded_reserved_character_is_never_shown(cut: str,
                                                                        head: str) -> None:
    """``kafka://user:abc/def@host`` (a base64 password's ``/``, a ``#`` or ``?``): the URL
    parser reads ``user`` as the host and the password's start as the port. Neither the
    error (the port the parser refused) nor a display (a numeric start taken for a port:
    the password shown as host, port and path, and connected to) may show any of it."""
    from walex.workers import consumer_from_url
    password = f"{head}{cut}Zq9xW7vK"
    url = f"kafka://walex:{password}@broker.example:9092?topic=t&sasl.mechanism=PLAIN"
    for make, what in ((from_url, "destination"), (consumer_from_url, "worker source")):
        with pytest.raises(ConfigError) as info:
            make(url)
        text = str(info.value)
        assert "percent-encoded" in text, text
        for part in (head, "Zq9xW7vK", password):
            assert part not in text, (what, text)
