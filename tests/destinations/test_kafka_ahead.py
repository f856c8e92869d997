"""Kafka groups handed over ahead (``depth`` 2, ``send_ahead``): two groups in flight, no
guarantee weaker.

Against tansu (its clients routed through the test's TCP relay, :class:`Cuttable`): groups
overlap in a relay of many one-row transactions, and a cut of every connection while two
groups are in flight loses nothing, acknowledges nothing to PostgreSQL before the broker
had it, and keeps the first copies in commit order per partition; the same at the
destination's level, a cut shorter than the timeout (both groups confirmed, each record
once) and a longer one (both fail, a new producer publishes them again one at a time,
same ids, first copies in order); a record of the first group refused for good with the
second in flight (a topic that does not exist) fails the first group with the refusal.

A broker's refusal of a record (over the topic's ``max.message.bytes``) cannot be made
here: tansu keeps the topic setting but stores larger records (checked by hand with
tansu's build of this machine). ``enable.gapless.guarantee`` covers that case in
librdkafka (a fatal error, nothing past the gap stored).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex.destinations.base import DestinationURL, Unavailable
from walex.destinations.encoding import Outgoing
from walex.destinations.kafka import KafkaDestination
from walex.errors import DestinationError
from walex.lsn import parse_lsn

from .kafka_support import create_topic, stored
from .servers import OwnTansu
from .test_kafka_outage import Cuttable, RelayedTansu
from .test_outage import confirmed
from .test_window import INSERT_KEYS, KEYS, SETUP, until_confirmed, write


def _first_copies(records: list[Any]) -> tuple[dict[str, dict[str, Any]], dict[Any, list[str]]]:
    """The first copy of each id, and the ids of first copies per partition in stored order;
    a duplicate is the first copy again."""
    first: dict[str, dict[str, Any]] = {}
    per_partition: dict[Any, list[str]] = defaultdict(list)
    for message_id, doc, message in records:
        if message_id in first:
            assert first[message_id] == doc, f"{message_id}: a duplicate differs"
            continue
        first[message_id] = doc
        per_partition[(message.topic(), message.partition())].append(message_id)
    return first, per_partition


@pytest.mark.parametrize("outage", [3.5, 9.0])
def test_a_cut_with_two_groups_in_flight_loses_nothing_and_acknowledges_nothing_early(
        admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str, outage: float,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many one-row transactions through a window of 64, groups of 16 at most: groups go
    ahead while others await their reports. Every connection to tansu is cut while two
    groups are in flight, for less than the publish's deadline (the records wait in the
    producer) or for more (the groups fail and go again on a new producer): the slot's
    confirmed_flush_lsn, polled meanwhile, stays below the oldest transaction the lane had
    not confirmed once the cut was made, and at the end
    every change is stored, the first copies in commit order per partition and per key."""
    monkeypatch.setattr(KafkaDestination, "group_events", 16)
    admin.execute(SETUP)
    slot, updates = f"kahead_{unique}", 1500
    relay = Cuttable(0)
    with RelayedTansu(tmp_path, relay.port) as broker:
        relay.target = broker.port
        relay.mend()
        create_topic(broker.port, "wa.k", 3)
        create_topic(broker.port, "wa.other", 1)
        url = (f"kafka://127.0.0.1:{relay.port}?topic=wa.{{table}}&timeout=2"
               "&reconnect.backoff.ms=50&reconnect.backoff.max.ms=200")

        async def main() -> tuple[list[Any], Any, int]:
            async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                                  status_interval=0.2, destination_window=64) as rec:
                app = rec.app
                assert app is not None
                admin.execute(INSERT_KEYS)
                await rec._until(lambda: app.pipeline.window is not None, 60, "the window")
                lane = app.pipeline.window.lanes[0]
                destination = lane.destination
                writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))
                await rec._until(lambda: lane.overlapped >= 3 and len(destination._flights) >= 2,
                                 60, "two groups in flight")
                relay.cut()
                in_flight = len(destination._flights)
                loop = asyncio.get_running_loop()
                end = loop.time() + outage
                # the reports of what reached tansu before the cut are served by now; the
                # oldest transaction the lane has not confirmed then cannot be stored while
                # the cut lasts (tansu cannot be read meanwhile: it names the relay's port)
                await asyncio.sleep(0.5)
                await rec._until(lambda: bool(lane.queued), 30, "a transaction queued")
                oldest = parse_lsn(lane.queued[0].txn.events[0].lsn)
                highest = 0
                while loop.time() < end:
                    highest = max(highest, confirmed(admin, slot))
                    await asyncio.sleep(0.05)
                early = [e.id for e in rec.events
                         if parse_lsn(e.lsn) >= oldest and parse_lsn(e.lsn) < highest]
                assert not early, f"acknowledged while the broker was cut off: {early[:5]}"
                relay.mend()
                await writing
                events = await rec.wait_for(KEYS + updates, 120)
                await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
                return events, lane, in_flight

        try:
            events, lane, in_flight = run(main(), timeout=300)
            records = stored(broker.port, "wa.k")
        finally:
            relay.cut()
    assert lane.overlapped > 0 and in_flight >= 2, (lane.overlapped, in_flight)
    if outage > 7:  # past the deadline: the groups in flight failed and went again
        assert lane.fallbacks > 0, "the cut failed no group in flight"
    first, per_partition = _first_copies(records)
    assert set(first) == {e.id for e in events}, "a change is missing"
    order = {e.id: n for n, e in enumerate(events)}
    values: dict[int, list[int]] = defaultdict(list)
    for key, ids in per_partition.items():
        assert ids == sorted(ids, key=order.__getitem__), f"{key}: out of commit order"
        for i in ids:
            row = first[i]["data"]["new_record"]
            values[row["id"]].append(row["v"])
    for key in range(KEYS):
        count = updates // KEYS + (1 if key < updates % KEYS else 0)
        assert values[key] == list(range(count + 1)), f"key {key}: {values[key]}"


def _batch(start: int, stop: int, table: str = "t") -> list[Outgoing]:
    """Changes of seven rows (keys), in order."""
    return [Outgoing(f"0/1000:{i:05d}", "public", table, "update", 0,
                     b'{"id":"0/1000:%05d"}' % i, f"/db/public/{table}", "2026-12-07T08:00:00Z",
                     f"public.{table}/{i % 7}", "1") for i in range(start, stop)]


@pytest.mark.parametrize("outage", [3.5, 9.0])
def test_two_groups_handed_over_ahead_through_a_cut(tmp_path: Path, outage: float) -> None:
    """Two groups handed over ahead while every connection is cut: within the deadline
    (7 s) both are confirmed, each record stored once, in order; past it both fail (the
    first's outcome is a failure, nothing goes ahead), and publishing them again one at a
    time on a new producer, with the same ids, stores every first copy in order."""
    relay = Cuttable(0)
    with RelayedTansu(tmp_path, relay.port) as broker:
        relay.target = broker.port
        relay.mend()
        try:
            create_topic(broker.port, "wt.t", 3)
            url = (f"kafka://127.0.0.1:{relay.port}?topic=wt.{{table}}&timeout=2"
                   "&reconnect.backoff.ms=50&reconnect.backoff.max.ms=200")
            warm, first, second = _batch(0, 1), _batch(1, 2001), _batch(2001, 4001)

            async def main() -> tuple[list[Exception | None], int]:
                dest = KafkaDestination(DestinationURL(url))
                await dest.open()
                try:
                    assert not dest.pipelined()  # nothing confirmed on this producer yet
                    await dest.publish(warm)
                    assert dest.pipelined()
                    relay.cut()
                    asyncio.get_running_loop().call_later(outage, relay.mend)
                    one = await dest.send_ahead(first)
                    two = await dest.send_ahead(second)
                    assert one is not None and two is not None
                    assert not one.answer.done() and not two.answer.done()
                    # the client holds one reference to a group's callback per record
                    assert one.outstanding() == one.count == len(first)
                    assert two.outstanding() == two.count == len(second)
                    await one.answer
                    landed = [dest.landed(one)]
                    await two.answer
                    if landed[0] is None:
                        landed.append(dest.landed(two))
                        return landed, 1
                    assert not dest.pipelined()
                    attempts = 1
                    for batch in (first, second):  # as a lane does: one group at a time
                        while True:
                            attempts += 1
                            try:
                                await dest.publish(batch)
                                break
                            except Unavailable:
                                await dest.close()
                                while True:
                                    try:
                                        await dest.open()
                                        break
                                    except Unavailable:
                                        await asyncio.sleep(0.2)
                    return landed, attempts
                finally:
                    await dest.close()

            landed, attempts = run(main(), timeout=120)
            records = stored(broker.port, "wt.t")
        finally:
            relay.cut()
    expected = [o.id for o in (*warm, *first, *second)]
    ids, per_partition = _first_copies(records)
    assert set(ids) == set(expected), "a record is missing"
    for key, got in per_partition.items():
        assert got == sorted(got), f"{key}: first copies out of order"
    if outage < 7:
        assert landed == [None, None] and attempts == 1, (landed, attempts)
        assert len(records) == len(expected), "a record stored twice"
    else:
        assert isinstance(landed[0], Unavailable), landed


def test_a_refusal_in_the_first_group_with_the_second_in_flight(tmp_path: Path) -> None:
    """The first group holds a record for a topic that does not exist (and may not be
    created): its outcome is that refusal, with the second group handed over before it
    was known; nothing goes ahead after it, and the first group published again alone is
    refused again, for the error policy to settle."""
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wr.a", 1)
        url = (f"kafka://127.0.0.1:{broker.port}?topic=wr.{{table}}"
               "&allow.auto.create.topics=false&topic.metadata.propagation.max.ms=1000")
        warm = _batch(0, 1, "a")
        first = _batch(1, 300, "a") + _batch(300, 301, "b") + _batch(301, 600, "a")
        second = _batch(600, 900, "a")

        async def main() -> None:
            dest = KafkaDestination(DestinationURL(url))
            await dest.open()
            try:
                await dest.publish(warm)
                one = await dest.send_ahead(first)
                two = await dest.send_ahead(second)
                assert one is not None and two is not None
                assert not one.answer.done()
                await one.answer
                failure = dest.landed(one)
                assert isinstance(failure, DestinationError), repr(failure)
                assert "topic 'wr.b' refused a record for good" in str(failure), failure
                assert not dest.pipelined()
                await two.answer
                with pytest.raises(DestinationError):
                    await dest.publish(first)
            finally:
                await dest.close()

        run(main(), timeout=60)
        records = stored(broker.port, "wr.a")
    first_copies, per_partition = _first_copies(records)
    assert set(first_copies) == {o.id for o in warm + first + second if o.table == "a"}
    for key, got in per_partition.items():
        assert got == sorted(got), f"{key}: first copies out of order"
