"""The Kafka destination's records loop (walex.destinations.krecords): its two twins make the
same calls of the client's ``produce``, and a relay whose producer queue is always full
still publishes every record once, in order, with its headers and tombstones.

The loop stops at the first record the producer's queue has no room for and the
destination produces that one when there is room, then calls the loop again after
it: the relay test gives the producer a queue of 3 records, so that this happens
for records and for tombstones, many times per publish.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from support import collecting, run

from walex import Event
from walex.destinations import krecords
from walex.destinations.base import Template
from walex.destinations.encoding import Outgoing
from walex.destinations.kafka import _TYPE_HEADERS

from .kafka_support import create_topic, records
from .servers import OwnTansu


def _batch() -> list[Outgoing]:
    """Items of two tables and two sources, each type, with and without a subject."""
    out = []
    for i in range(40):
        schema, table = ("public", "a") if i % 7 < 4 else ("sales", "b")
        kind = ("insert", "update", "delete")[i % 3]
        subject = None if i % 11 == 5 else str(i)
        out.append(Outgoing(f"0/16B3748:{i}", schema, table, kind, i % 2, b'{"n":%d}' % i,
                            f"/db/{schema}/{table}", "2026-01-02T03:04:05Z" if i < 20
                            else "2026-01-02T03:04:06.5Z", f"{schema}.{table}/{subject}", subject))
    return out


class _Recorded:
    """A real producer (no broker: its queue only fills) whose produce calls are written down;
    ``refuse_at``: the call that raises the client's refusal instead."""

    def __init__(self, room: int, refuse_at: int = -1) -> None:
        self.producer = Producer({"bootstrap.servers": "127.0.0.1:1",
                                  "queue.buffering.max.messages": room, "log_level": 0})
        self.calls: list[tuple[Any, ...]] = []
        self.refuse_at = refuse_at

    def produce(self, *args: Any) -> None:
        if len(self.calls) == self.refuse_at:
            self.calls.append(("refused", *args[:3]))
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG))
        self.producer.produce(*args)
        self.calls.append(args[:4] + (args[4] is _FAILED, *args[5:7],
                                      None if args[7] is None else list(args[7])))

    def drain(self) -> None:
        self.producer.purge()
        self.producer.poll(0)


def _FAILED(err: Any, msg: Any) -> None:  # noqa: N802 - the delivery callback passed
    pass


def _loop(loop: Any, batch: list[Outgoing], topic: str | None, tombstones: bool,
          room: int, ce_headers: bool = True) -> tuple[list[Any], list[Any]]:
    """Every record of the batch through ``loop``, as KafkaDestination._produce_all drives it
    (the queue emptied where it was full, the record that met it produced by hand)."""
    rec = _Recorded(room)
    template = Template("walex.{schema}.{table}", "topic", "test")
    sources: dict[str, Any] = {}
    results = []
    start = 0
    while True:
        result = loop(rec.produce, batch, start, topic, template.render, _FAILED, sources,
                      _TYPE_HEADERS, tombstones, lambda where, exc: RuntimeError(where),
                      ce_headers)
        results.append(result)
        count, stop, where, headers, tombstone = result
        if stop >= len(batch):
            return rec.calls, results
        rec.drain()
        item = batch[stop]
        rec.calls.append(("again", where, headers, tombstone, item.id))
        if tombstones and not tombstone and item.type == "delete":  # its tombstone is owed too
            rec.calls.append(("again", where, None, True, item.id))
        start = stop + 1


@pytest.mark.skipif(krecords.compiled_records is None,
                    reason="walex.destinations._krecords not built (no Cython or C compiler)")
@pytest.mark.parametrize("topic", ["wk.all", None])
@pytest.mark.parametrize("tombstones", [False, True])
@pytest.mark.parametrize("room", [1000, 5, 6])
@pytest.mark.parametrize("ce_headers", [True, False])
def test_the_compiled_records_loop_is_the_pure_one(topic: str | None, tombstones: bool,
                                                   room: int, ce_headers: bool) -> None:
    """The same produce calls (topic, value, key, partition, callback, timestamp, headers),
    the same stops at a full queue (at a record or at a tombstone), the same counts."""
    batch = _batch()
    pure = _loop(krecords.py_records, batch, topic, tombstones, room, ce_headers)
    compiled = _loop(krecords.compiled_records, batch, topic, tombstones, room, ce_headers)
    assert compiled == pure
    calls, results = pure
    produced = [c for c in calls if c[0] not in ("again", "refused")]
    deletes = sum(1 for o in batch if o.type == "delete")
    again = sum(1 for c in calls if c[0] == "again")
    assert len(produced) + again == len(batch) + (deletes if tombstones else 0)
    assert sum(r[0] for r in results) == len(produced)
    if room < 1000:
        assert again > 3
        if tombstones:
            assert any(c[3] for c in calls if c[0] == "again"), "no tombstone met a full queue"
    first = produced[0]
    assert first[:6] == (topic or "walex.public.a", batch[0].body, batch[0].key, -1, True, None)
    if not ce_headers:  # content-type alone, for every record
        assert {tuple(c[7]) for c in produced if c[1] is not None} == {
            (("content-type", b"application/cloudevents+json; charset=UTF-8"),)}
        return
    assert first[6] == 0 and first[7] == [
        ("ce_specversion", b"1.0"), ("ce_id", batch[0].id), ("ce_source", b"/db/public/a"),
        ("ce_type", b"walex.insert"), ("ce_time", b"2026-01-02T03:04:05Z"),
        ("content-type", b"application/cloudevents+json; charset=UTF-8"), ("ce_subject", "0")]


@pytest.mark.skipif(krecords.compiled_records is None,
                    reason="walex.destinations._krecords not built (no Cython or C compiler)")
def test_a_refusal_names_its_topic_in_both_twins() -> None:
    batch = _batch()
    for loop in (krecords.py_records, krecords.compiled_records):
        rec = _Recorded(1000, refuse_at=5)
        with pytest.raises(RuntimeError, match=r"^walex\.sales\.b$"):
            loop(rec.produce, batch, 0, None, Template("walex.{schema}.{table}", "topic",
                                                       "test").render, _FAILED, {},
                 _TYPE_HEADERS, False, lambda where, exc: RuntimeError(where))
        assert len(rec.calls) == 6


@pytest.mark.skipif(krecords.compiled_records is None,
                    reason="walex.destinations._krecords not built (no Cython or C compiler)")
@pytest.mark.parametrize("keep", ["list", "pairs"])
def test_arguments_a_producer_kept_are_never_changed(keep: str) -> None:
    """The compiled loop reuses its argument tuple, header lists and ``ce_id`` /
    ``ce_subject`` pairs from one record to the next; a producer that kept one of them
    (here the header list itself, or only its pairs) still holds what it was given."""
    batch = _batch()
    expected = _Recorded(1000)
    krecords.py_records(expected.produce, batch, 0, None, Template(
        "walex.{schema}.{table}", "topic", "test").render, _FAILED, {}, _TYPE_HEADERS, True,
        lambda where, exc: RuntimeError(where))

    class Keeper(_Recorded):
        held: list[Any] = []

        def produce(self, *args: Any) -> None:
            self.producer.produce(*args)
            headers = args[7]
            self.held.append((args[:7], headers if keep == "list" or headers is None
                              else list(headers)))

    keeper = Keeper(1000)
    krecords.compiled_records(keeper.produce, batch, 0, None, Template(
        "walex.{schema}.{table}", "topic", "test").render, _FAILED, {}, _TYPE_HEADERS, True,
        lambda where, exc: RuntimeError(where))
    got = [(*a[:4], a[4] is _FAILED, *a[5:7], None if h is None else [tuple(p) for p in h])
           for a, h in keeper.held]
    assert got == expected.calls


TABLES = ("CREATE TABLE a (id int PRIMARY KEY, v text); "
          "CREATE TABLE b (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR ALL TABLES")


@pytest.mark.parametrize("pure", [False, True])
def test_a_full_producer_queue_loses_nothing_and_keeps_the_order(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, pure: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if pure:
        monkeypatch.setenv("WALEX_PURE_PYTHON", "1")
    admin.execute(TABLES)
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wk.a", 2)
        create_topic(broker.port, "wk.b", 2)
        url = (f"kafka://127.0.0.1:{broker.port}?topic=wk.{{table}}&tombstones=true&linger.ms=1"
               "&queue.buffering.max.messages=3")

        async def main() -> list[Event]:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                with admin.transaction():
                    for i in range(1, 61):
                        admin.execute(f"INSERT INTO {'ab'[i % 2]} VALUES (%s, 'x')", (i,))
                    admin.execute("DELETE FROM a WHERE id % 4 = 0")
                    admin.execute("DELETE FROM b WHERE id % 3 = 0")
                    admin.execute("INSERT INTO a VALUES (4, 'again')")
                admin.execute("DELETE FROM b WHERE id < 10")
                events = await rec.wait_for(60 + 15 + 10 + 1 + 3, timeout=60)
                await rec._until(lambda: app.transactions_handled == 2, 60, "all published")
                return events

        events = run(main(), timeout=120)
        got = records(broker.port, "wk.a") + records(broker.port, "wk.b")
    values = [m for m in got if m.value() is not None]
    assert sorted(json.loads(m.value())["id"] for m in values) == sorted(e.id for e in events)
    per_partition: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for m in sorted(got, key=lambda m: (m.topic(), m.partition(), m.offset())):
        per_partition[(m.topic(), m.partition())].append(m)
    tombstones = 0
    for stream in per_partition.values():
        ids = [json.loads(m.value())["id"] for m in stream if m.value() is not None]
        assert ids == sorted(ids), "out of commit order in a partition"
        for before, m in zip(stream, stream[1:]):
            if m.value() is None:  # a tombstone right after its delete
                tombstones += 1
                doc = json.loads(before.value())
                assert doc["type"] == "walex.delete" and m.key() == before.key()
                assert m.headers() is None
        for m in stream:
            if m.value() is not None:
                doc = json.loads(m.value())
                headers = dict(m.headers())
                assert m.topic() == f"wk.{doc['source'].rsplit('/', 1)[1]}"
                assert m.key() == doc["partitionkey"].encode()
                assert headers["ce_id"] == doc["id"].encode()
                assert headers["ce_type"] == doc["type"].encode()
                assert headers["ce_source"] == doc["source"].encode()
                assert headers["ce_time"] == doc["time"].encode()
                assert headers["ce_subject"] == doc["subject"].encode()
    assert tombstones == sum(1 for e in events if e.type.value == "delete") == 15 + 10 + 3
