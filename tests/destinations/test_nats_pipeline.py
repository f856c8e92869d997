"""Two chained groups in flight on a NATS lane (``Destination.pipelined``), never a gap.

A group published while the one before it awaits its PubAck is chained on that one's
predicted end, so JetStream stores it only if the one before was stored whole. Against
the machine's nats-server (or one the test starts) and a real PostgreSQL: many one-row
transactions overlap; a break of the first group in flight (another publisher's message
inside it) stores nothing of the second, which goes again after it; a connection cut
while two are in flight loses nothing, stores nothing twice and acknowledges nothing
before JetStream confirmed it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex.destinations import from_url
from walex.lsn import parse_lsn

from .brokers import check_stream, nats_delete, nats_stored
from .conftest import require
from .test_nats_chain import _foreign, nats_stored_raw
from .test_nats_pubacks import TABLES, _events
from .test_outage import confirmed
from .test_window import INSERT_KEYS, SETUP, check_keys, until_confirmed, write

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402


def test_a_lane_has_two_chained_groups_in_flight_and_stores_each_once_in_order(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """Many one-row transactions through a window: groups overlap (the next one started
    before the one before it was confirmed), and JetStream holds every change once, in
    commit order, with the ids walex gave them."""
    port = require("nats")
    admin.execute(SETUP)
    stream, updates = f"PL{unique}", 1500
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=pl{unique}.{{table}}"

    async def main() -> tuple[list[Any], Any]:
        async with collecting(dsn, destinations=[url], destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await asyncio.to_thread(write, dsn, updates)
            events = await rec.wait_for(10 + updates, 120)
            lane = app.pipeline.window.lanes[0]
            await rec._until(lambda: not lane.queued, 60, "every group confirmed")
            return events, lane

    try:
        events, lane = run(main(), timeout=240)
        stored = asyncio.run(nats_stored(stream, port))
    finally:
        asyncio.run(nats_delete(stream, port))
    overlapped = getattr(lane, "overlapped", 0)  # (none before pipelining)
    assert overlapped > 0, f"no group overlapped another ({lane.groups} publishes)"
    assert lane.destination.chains_failed == 0
    check_stream(stored, [e.id for e in events])
    check_keys(stored, updates)


def test_a_break_in_the_first_of_two_groups_in_flight_stores_nothing_of_the_second(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """Another publisher's message lands inside the first chain in flight: the first
    chain stops there and the second, chained on the first's predicted end, stores
    nothing (its publish fails) although it was sent before the first was answered. The
    first goes again message by message, the second after it: each once, in order."""
    port = require("nats")
    admin.execute(TABLES)
    stream = f"PB{unique}"
    subject = f"pb{unique}.a"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=pb{unique}.{{table}}"

    async def main() -> list[str]:
        batch = await _events(admin, dsn, 300)
        first, second = batch[100:200], batch[200:]
        destination = from_url(url)
        await destination.open()
        try:
            await destination.publish(batch[:10])  # a PubAck each: the stream's last known
            await destination.publish(batch[10:100])  # chained
            assert destination.pipelined()
            frames = destination._frames
            send = frames.send

            async def foreign_inside(chunks: list[bytes], messages: int, payload: int) -> None:
                data = b"".join(chunks)
                middle = data.index(b"HPUB ", len(data) // 2)
                foreign = b"PUB %b 2\r\n{}\r\n" % subject.encode()
                frames.send = send
                await send([data[:middle] + foreign + data[middle:]], messages, payload)

            frames.send = foreign_inside  # the first chain only (the other slot's frames
            # are another object)
            one = asyncio.create_task(destination.publish(first))
            await asyncio.sleep(0)  # its frames handed over
            assert destination._flying == 1 and destination.pipelined()
            two = asyncio.create_task(destination.publish(second))
            await asyncio.sleep(0)
            assert destination._flying == 2, "the second did not go while the first was in flight"
            results = await asyncio.gather(one, two, return_exceptions=True)
            assert results[0] is None  # broke, then published again with a PubAck per message
            assert isinstance(results[1], Exception) and "not stored" in str(results[1])
            assert (destination.chains, destination.chains_failed) == (3, 2)
            stored = await nats_stored_raw(stream, port)
            mine = [i for i in stored if i is not None]
            assert mine == [e.id for e in batch[:200]], "the second group stored after a gap"
            await destination.publish(second)  # again, once the first is done
        finally:
            await destination.close()
        return [e.id for e in batch]

    try:
        ids = run(main())
        stored = asyncio.run(nats_stored_raw(stream, port))
        assert [i for i in stored if i is not None] == ids
        assert stored.count(None) == 1
    finally:
        asyncio.run(nats_delete(stream, port))


def test_a_second_chain_waits_for_the_first_to_be_handed_over_whole(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """The client's write buffer full (a tiny pending_size): handing a large chain over
    suspends between its chunks. A second publish started meanwhile is handed over after
    the whole first one, on its end, so neither chain breaks."""
    port = require("nats")
    admin.execute(TABLES)
    stream = f"PH{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=ph{unique}.{{table}}"

    async def main() -> list[str]:
        batch = await _events(admin, dsn, 2100)
        destination = from_url(url)
        await destination.open()
        try:
            await destination.publish(batch[:100])  # a PubAck each: the stream's last known
            destination.nc._max_pending_size = 1000  # each chunk waits for the flusher
            one = asyncio.create_task(destination.publish(batch[100:1100]))
            await asyncio.sleep(0)
            assert destination._handover.locked(), "the first chain was handed over at once"
            two = asyncio.create_task(destination.publish(batch[1100:]))
            await asyncio.gather(one, two)
            assert (destination.chains, destination.chains_failed) == (2, 0)
        finally:
            await destination.close()
        return [e.id for e in batch]

    try:
        ids = run(main())
        check_stream(asyncio.run(nats_stored(stream, port)), ids)
    finally:
        asyncio.run(nats_delete(stream, port))


def test_other_publishers_breaking_pipelined_groups_leave_no_gap(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """A relay with groups in flight two at a time while another publisher keeps writing
    into the same stream: chains break, the groups in flight go again one at a time, and
    walex's messages are stored once each, in commit order (none after a missing one)."""
    port = require("nats")
    admin.execute(SETUP)
    stream, updates = f"PO{unique}", 1500
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=po{unique}.{{table}}"

    async def main() -> tuple[list[Any], Any]:
        async with collecting(dsn, destinations=[url], destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec.wait_for(10, 60)
            writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))
            n = 0
            while not writing.done():
                await _foreign(port, f"po{unique}.other", f"foreign-{n}")
                n += 1
                await asyncio.sleep(0.02)
            events = await rec.wait_for(10 + updates, 120)
            lane = app.pipeline.window.lanes[0]
            await rec._until(lambda: not lane.queued, 60, "every group confirmed")
            return events, lane

    try:
        events, lane = run(main(), timeout=240)
        stored = asyncio.run(nats_stored(stream, port))
    finally:
        asyncio.run(nats_delete(stream, port))
    mine = [s for s in stored if not s[0].startswith("foreign-")]
    destination = lane.destination
    assert lane.overlapped > 0 and destination.chains_failed > 0 and lane.fallbacks > 0, \
        (lane.overlapped, destination.chains_failed, lane.fallbacks)
    check_stream(mine, [e.id for e in events])


def test_a_connection_cut_with_two_groups_in_flight_loses_nothing_and_acknowledges_nothing_early(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """The connection to nats-server cut (a TCP proxy) while groups are in flight two at a
    time: the slot's confirmed_flush_lsn, polled meanwhile, stays at what JetStream stored;
    once healed every change is stored exactly once, in order."""
    port = require("nats")
    admin.execute(SETUP)
    slot, updates, stream = f"pipe_{unique}", 1500, f"PC{unique}"
    proxy = Proxy("127.0.0.1", port).start()
    url = f"nats://127.0.0.1:{proxy.port}?stream={stream}&subject=pc{unique}.{{table}}&timeout=1"

    async def main() -> tuple[list[Any], Any]:
        async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                              status_interval=0.2, destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))

            def overlapping() -> bool:
                window = app.pipeline.window
                return window is not None and window.lanes[0].overlapped >= 3

            await rec._until(overlapping, 60, "groups overlapping")
            lane = app.pipeline.window.lanes[0]
            await asyncio.to_thread(proxy.partition)
            loop = asyncio.get_running_loop()
            highest, end = 0, loop.time() + 3
            while loop.time() < end:
                highest = max(highest, confirmed(admin, slot))
                await asyncio.sleep(0.05)
            at_nats = {i for i, _d, _x in await nats_stored(stream, port)}
            handled = list(rec.events)
            early = [e.id for e in handled if parse_lsn(e.lsn) < highest and e.id not in at_nats]
            assert not early, f"acknowledged before JetStream had them: {early[:5]}"
            await asyncio.to_thread(proxy.heal)
            await writing
            events = await rec.wait_for(10 + updates, 120)
            await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
            return events, lane

    try:
        events, lane = run(main(), timeout=300)
        stored = asyncio.run(nats_stored(stream, port))
    finally:
        proxy.stop()
        asyncio.run(nats_delete(stream, port))
    assert lane.fallbacks > 0, "the cut failed no group in flight"
    check_stream(stored, [e.id for e in events])
    check_keys(stored, updates)


@pytest.mark.parametrize("url", [
    "nats://127.0.0.1:4222?stream=S",
    "nats://127.0.0.1:4222?stream=S&chain=false",
])
def test_a_destination_not_opened_is_not_pipelined(url: str) -> None:
    assert from_url(url).pipelined() is False
    assert from_url("redis://127.0.0.1:6379/0?stream=s").pipelined() is False
