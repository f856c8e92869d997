"""Chained groups handed over ahead on a NATS lane (``Destination.send_ahead``), never a gap.

A group handed over while the one before it awaits its PubAck is chained on that one's
predicted end, so JetStream stores it only if the one before was stored whole. Against
the machine's nats-server and a real PostgreSQL: many one-row transactions overlap; a
break of the first group in flight (another publisher's message inside it) stores
nothing of the second; after any failure nothing unchained is published until every
group in flight has its outcome, and then one group at a time; a connection cut while
groups are in flight loses nothing, stores nothing twice and acknowledges nothing
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
from walex.destinations.nats import NatsDestination
from walex.destinations.window import Lane
from walex.lsn import parse_lsn

from .brokers import check_stream, nats_delete, nats_stored
from .conftest import require
from .test_nats_chain import _foreign, nats_stored_raw
from .test_nats_pubacks import TABLES, _events
from .test_outage import confirmed
from .test_window import INSERT_KEYS, SETUP, check_keys, until_confirmed, write

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402


def watch(destination: Any) -> list[str]:
    """Check the lane's invariant on ``destination`` as it publishes: an unchained publish
    (``_each``, a PubAck per message: the only kind that can be stored after a later
    message) starts only when no other is running and every group handed over ahead has
    its outcome, and nothing is handed over ahead while one runs. Returns the list the
    violations are appended to."""
    violations: list[str] = []
    flights: list[Any] = []
    unchained = [0]
    each, send_ahead = destination._each, destination.send_ahead

    async def watched_each(batch: list[Any]) -> None:
        pending = [f for f in flights if not f.answer.done()]
        if unchained[0] or pending:
            violations.append(f"unchained batch from {batch[0].id} while {unchained[0]} "
                              f"unchained and {len(pending)} chains without an outcome")
        flights.clear()
        unchained[0] += 1
        try:
            await each(batch)
        finally:
            unchained[0] -= 1

    async def watched_send_ahead(batch: list[Any]) -> Any:
        if unchained[0]:
            violations.append(f"a chain from {batch[0].id} while an unchained batch runs")
        flight = await send_ahead(batch)
        if flight is not None:
            flights.append(flight)
        return flight

    destination._each, destination.send_ahead = watched_each, watched_send_ahead
    return violations


def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups of 16 events at most: one-row transactions in a window of 64 then make
    groups worth going ahead (a lane hands one over while another is in flight only when
    a quarter of a group's bound is queued: 4 one-row transactions here, not 1,024)."""
    monkeypatch.setattr(NatsDestination, "group_events", 16)


async def _lane(rec: Any) -> Any:
    """The app's one lane, once its window exists (with the first transaction)."""
    app = rec.app
    await rec._until(lambda: app.pipeline.window is not None, 60, "the window")
    return app.pipeline.window.lanes[0]


def test_a_lane_has_two_chained_groups_in_flight_and_stores_each_once_in_order(
        admin: psycopg.Connection, dsn: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many one-row transactions through a window: groups overlap (the next one handed
    over before the one before it was confirmed), and JetStream holds every change once,
    in commit order, with the ids walex gave them."""
    small_groups(monkeypatch)
    port = require("nats")
    admin.execute(SETUP)
    stream, updates = f"PL{unique}", 1500
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=pl{unique}.{{table}}"

    async def main() -> tuple[list[Any], Any, list[str]]:
        async with collecting(dsn, destinations=[url], destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            lane = await _lane(rec)
            violations = watch(lane.destination)
            await asyncio.to_thread(write, dsn, updates)
            events = await rec.wait_for(10 + updates, 120)
            await rec._until(lambda: not lane.queued, 60, "every group confirmed")
            return events, lane, violations

    try:
        events, lane, violations = run(main(), timeout=240)
        stored = asyncio.run(nats_stored(stream, port))
    finally:
        asyncio.run(nats_delete(stream, port))
    assert getattr(lane, "overlapped", 0) > 0, f"no group overlapped another ({lane.groups})"
    assert lane.destination.chains_failed == 0
    assert not violations, violations
    check_stream(stored, [e.id for e in events])
    check_keys(stored, updates)


def test_a_break_in_the_first_of_two_groups_in_flight_stores_nothing_of_the_second(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """Another publisher's message lands inside the first chain in flight: the first
    chain stops there and the second, chained on the first's predicted end, stores
    nothing although it was handed over before the first was answered. Both outcomes are
    failures (the second's is never taken as stored), the chain state is void (nothing
    goes ahead), and publishing again one group at a time stores each once, in order."""
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
            assert not destination.pipelined()  # (not after an unchained batch)
            await destination.publish(batch[10:100])  # chained, and held
            assert destination.pipelined()
            frames = destination._frames
            send = frames.send

            async def foreign_inside(chunks: list[bytes], messages: int, payload: int) -> None:
                data = b"".join(chunks)
                middle = data.index(b"HPUB ", len(data) // 2)
                foreign = b"PUB %b 2\r\n{}\r\n" % subject.encode()
                frames.send = send
                await send([data[:middle] + foreign + data[middle:]], messages, payload)

            frames.send = foreign_inside  # the first chain only
            one = await destination.send_ahead(first)
            assert one is not None and destination.pipelined()
            two = await destination.send_ahead(second)
            assert two is not None
            await asyncio.wait_for(asyncio.gather(one.answer, two.answer), 10)
            assert destination.landed(one) is not None
            assert not destination.pipelined(), "the chain state outlived a break"
            assert destination.landed(two) is not None
            assert (destination.chains, destination.chains_failed) == (3, 1)
            stored = await nats_stored_raw(stream, port)
            mine = [i for i in stored if i is not None]
            assert mine == [e.id for e in batch[:len(mine)]] and 110 <= len(mine) < 200, \
                "the first chain did not stop at the other publisher's message"
            await destination.publish(first)  # again, one group at a time
            await destination.publish(second)
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


def test_a_chain_handed_over_in_pieces_and_one_ahead_of_it_both_hold(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """The client's write buffer full (a tiny pending_size): handing a large chain over
    suspends between its chunks. The next one, handed over after it on its predicted
    end, and a third on that one's: none breaks, each is stored once, in order."""
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
            await destination.publish(batch[100:200])  # a chain: groups may go ahead
            destination.nc._max_pending_size = 1000  # each chunk waits for the flusher
            flights = [await destination.send_ahead(batch[200:1100]),
                       await destination.send_ahead(batch[1100:2000]),
                       await destination.send_ahead(batch[2000:])]
            await asyncio.wait_for(asyncio.gather(*(f.answer for f in flights)), 10)
            assert [destination.landed(f) for f in flights] == [None, None, None]
            assert (destination.chains, destination.chains_failed) == (4, 0)
        finally:
            await destination.close()
        return [e.id for e in batch]

    try:
        ids = run(main())
        check_stream(asyncio.run(nats_stored(stream, port)), ids)
    finally:
        asyncio.run(nats_delete(stream, port))


def test_a_chain_without_its_puback_within_the_timeout_fails_and_voids_the_chain(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """A chain whose PubAck does not come within the timeout (its frames held back in the
    client) fails by its timer, as does the one handed over after it, and nothing goes
    ahead until a chain holds again; both groups published again one at a time are
    stored once each, in order."""
    port = require("nats")
    admin.execute(TABLES)
    stream = f"PT{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=pt{unique}.{{table}}&timeout=0.3"

    async def main() -> list[str]:
        batch = await _events(admin, dsn, 400)
        destination = from_url(url)
        await destination.open()
        try:
            await destination.publish(batch[:100])
            await destination.publish(batch[100:200])
            assert destination.pipelined()
            frames = destination._frames
            held: list[list[bytes]] = []
            send = frames.send

            async def hold(chunks: list[bytes], messages: int, payload: int) -> None:
                held.append(chunks)  # not written: no PubAck comes

            frames.send = hold
            one = await destination.send_ahead(batch[200:300])
            two = await destination.send_ahead(batch[300:])
            frames.send = send
            await asyncio.wait_for(asyncio.gather(one.answer, two.answer), 5)
            failure = destination.landed(one)
            assert failure is not None and "no PubAck within 0.3s" in str(failure)
            assert destination.landed(two) is not None and not destination.pipelined()
            for chunks in held:  # the stale chains reach the stream late: they store
                await send(chunks, 0, 0)  # only where they still fit, in order
            await destination.publish(batch[200:300])
            await destination.publish(batch[300:])
        finally:
            await destination.close()
        return [e.id for e in batch]

    try:
        ids = run(main())
        check_stream(asyncio.run(nats_stored(stream, port)), ids)
    finally:
        asyncio.run(nats_delete(stream, port))


def test_other_publishers_breaking_pipelined_groups_leave_no_gap(
        admin: psycopg.Connection, dsn: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay with groups in flight two at a time while another publisher keeps writing
    into the same stream: chains break, the groups in flight go again one at a time (none
    unchained while another is, or while a chain has no outcome), and walex's messages
    are stored once each, in commit order (none after a missing one)."""
    small_groups(monkeypatch)
    port = require("nats")
    admin.execute(SETUP)
    stream, updates = f"PO{unique}", 1500  # at least
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=po{unique}.{{table}}"

    async def main() -> tuple[list[Any], Any, list[str]]:
        async with collecting(dsn, destinations=[url], destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec.wait_for(10, 60)
            lane = await _lane(rec)
            violations = watch(lane.destination)
            written = n = 0
            # rounds of 500 until groups went ahead and some failed (a loaded machine may
            # take more than one), 10 at most
            while written < updates or not (lane.overlapped and lane.fallbacks):
                if written >= 10 * 500:
                    break
                writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, 500))
                while not writing.done():
                    await _foreign(port, f"po{unique}.other", f"foreign-{n}")
                    n += 1
                    await asyncio.sleep(0.02)
                await writing
                written += 500
            events = await rec.wait_for(10 + written, 120)
            await rec._until(lambda: not lane.queued, 60, "every group confirmed")
            return events, lane, violations

    try:
        events, lane, violations = run(main(), timeout=240)
        stored = asyncio.run(nats_stored(stream, port))
    finally:
        asyncio.run(nats_delete(stream, port))
    mine = [s for s in stored if not s[0].startswith("foreign-")]
    assert not violations, violations
    check_stream(mine, [e.id for e in events])
    destination = lane.destination  # and the case this is about happened:
    assert lane.overlapped > 0 and destination.chains_failed > 0 and lane.fallbacks > 0, \
        (lane.overlapped, destination.chains_failed, lane.fallbacks)


def test_a_connection_cut_with_two_groups_in_flight_loses_nothing_and_acknowledges_nothing_early(
        admin: psycopg.Connection, dsn: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection to nats-server cut (a TCP proxy) while groups are in flight two at a
    time: the slot's confirmed_flush_lsn, polled meanwhile, stays at what JetStream stored;
    once healed every change is stored exactly once, in order."""
    small_groups(monkeypatch)
    port = require("nats")
    admin.execute(SETUP)
    slot, updates, stream = f"pipe_{unique}", 1500, f"PC{unique}"
    proxy = Proxy("127.0.0.1", port).start()
    url = f"nats://127.0.0.1:{proxy.port}?stream={stream}&subject=pc{unique}.{{table}}&timeout=1"

    async def main() -> tuple[list[Any], Any, list[str]]:
        async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                              status_interval=0.2, destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            lane = await _lane(rec)
            violations = watch(lane.destination)
            writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))
            await rec._until(lambda: lane.overlapped >= 3, 60, "groups overlapping")
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
            return events, lane, violations

    try:
        events, lane, violations = run(main(), timeout=300)
        stored = asyncio.run(nats_stored(stream, port))
    finally:
        proxy.stop()
        asyncio.run(nats_delete(stream, port))
    assert lane.fallbacks > 0, "the cut failed no group in flight"
    assert not violations, violations
    check_stream(stored, [e.id for e in events])
    check_keys(stored, updates)


def test_the_broker_killed_with_groups_in_flight_loses_nothing(
        admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """test_window's broker-kill test (nats-server SIGKILLed mid-stream and started again)
    with groups going ahead: every change is there once, in order, and groups did go
    ahead."""
    from . import test_window

    small_groups(monkeypatch)
    lanes: list[Lane] = []
    init = Lane.__init__

    def keep(self: Lane, *args: Any) -> None:
        init(self, *args)
        lanes.append(self)

    monkeypatch.setattr(Lane, "__init__", keep)
    test_window.test_broker_killed_mid_stream_with_a_window_loses_nothing(
        "nats", admin, dsn, tmp_path, unique)
    assert any(lane.overlapped for lane in lanes), "no group went ahead"


@pytest.mark.parametrize("url", [
    "nats://127.0.0.1:4222?stream=S",
    "nats://127.0.0.1:4222?stream=S&chain=false",
])
def test_a_destination_not_opened_is_not_pipelined(url: str) -> None:
    assert from_url(url).pipelined() is False
    assert from_url("redis://127.0.0.1:6379/0?stream=s").pipelined() is False
    assert from_url(url).depth == 2
    assert from_url("redis://127.0.0.1:6379/0?stream=s").depth == 1
