"""Chained JetStream batches (walex.destinations.hpub.Frames.chained): one PubAck for a
batch whose messages the stream checks link by link, against the machine's nats-server and
a real PostgreSQL. Every message is stored once whatever breaks the chain (another
publisher's message, a refusal, a duplicate), and a broken chain is published again with a
PubAck per message, which tells each message's fate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import psycopg
import pytest
from support import collecting, run

from walex import DestinationError
from walex.destinations import from_url
from walex.destinations.encoding import Outgoing, encode
from walex.destinations.hpub import CHAINED_EXTRA

from .brokers import check_stream, nats_delete, nats_stored
from .conftest import require
from .test_nats_pubacks import TABLES, WAYS, _events, _way
from .test_nats_refusals import make_stream


@asynccontextmanager
async def _opened(url: str) -> AsyncIterator[Any]:
    """A NATS destination of ``url``, opened, closed on the way out."""
    destination = from_url(url)
    await destination.open()
    try:
        yield destination
    finally:
        await destination.close()


def _answers(destination: Any) -> int:
    return int(destination.nc.stats["in_msgs"])


async def _foreign(port: int, subject: str, ident: str) -> None:
    """A message of another publisher, stored in the stream between walex's."""
    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        ack = await nc.jetstream().publish(subject, b"{}", headers={"Nats-Msg-Id": ident})
        assert not ack.duplicate
    finally:
        await nc.close()


@pytest.mark.parametrize("way", WAYS)
def test_a_chained_batch_is_stored_whole_with_one_puback(admin: psycopg.Connection, dsn: str,
                                                          unique: str, way: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    port = require("nats")
    _way(way, monkeypatch)
    admin.execute(TABLES)
    stream = f"CH{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=ch{unique}.{{table}}"

    async def main() -> None:
        try:
            batch = await _events(admin, dsn, 5000)
            async with _opened(url) as destination:
                before = _answers(destination)
                await destination.publish(batch[:10])  # a PubAck each: shows the stream's last
                assert _answers(destination) - before == 10
                await destination.publish(batch[10:])  # 4,991: one window of 4,096, then 895
                assert _answers(destination) - before == 10 + 2  # one PubAck per chain
                assert (destination.chains, destination.chains_failed) == (2, 0)
                assert destination.duplicates == 0
            check_stream(await nats_stored(stream, port), [e.id for e in batch])
        finally:
            await nats_delete(stream, port)

    run(main())


def test_another_publisher_breaks_the_chain_and_nothing_is_lost_or_stored_twice(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """A message of another publisher between two batches: the chain's first link fails,
    so none of the batch is stored by it; the batch goes again with a PubAck per message,
    and the next batches are not chained for a while (2**misses - 1), then are again."""
    port = require("nats")
    admin.execute(TABLES)
    stream = f"CF{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=cf{unique}.{{table}}"

    async def main() -> None:
        try:
            batch = await _events(admin, dsn, 400)
            async with _opened(url) as destination:
                await destination.publish(batch[:100])
                await destination.publish(batch[100:200])
                assert (destination.chains, destination.chains_failed) == (1, 0)
                await _foreign(port, f"cf{unique}.a", "foreign")
                await destination.publish(batch[200:300])  # the chain breaks: again, one by one
                assert (destination.chains, destination.chains_failed) == (2, 1)
                assert destination.duplicates == 0  # the chain stored none of it
                await destination.publish(batch[300:350])  # after one failure: one unchained
                assert destination.chains == 2
                await destination.publish(batch[350:])  # and chained again
                assert (destination.chains, destination.chains_failed) == (3, 1)
            stored = [ident for ident, _doc, _subject in await nats_stored(stream, port)]
            ids = [e.id for e in batch]
            assert stored == ids[:200] + ["foreign"] + ids[200:]
        finally:
            await nats_delete(stream, port)

    run(main())


def test_a_refusal_inside_a_chain_is_told_for_its_message(admin: psycopg.Connection, dsn: str,
                                                          unique: str) -> None:
    """A message over the stream's max_msg_size in the middle of a chained batch: the chain
    stores what came before it and nothing after; published again with a PubAck per
    message, the others are stored (those before as duplicates) and the refusal names
    the event, for on_error."""
    port = require("nats")
    admin.execute("CREATE TABLE a (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR ALL TABLES")
    stream = f"CR{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=cr{unique}.{{table}}&timeout=5"

    async def main() -> None:
        try:
            await make_stream(port, name=stream, subjects=[f"cr{unique}.>"], max_msg_size=4000)
            async with collecting(dsn) as rec:
                admin.execute("INSERT INTO a SELECT g, 'x' FROM generate_series(1, 60) g")
                admin.execute("UPDATE a SET v = repeat('y', 6000) WHERE id = 45")
                admin.execute("INSERT INTO a SELECT g, 'x' FROM generate_series(61, 70) g")
                batch: list[Outgoing] = encode(await rec.wait_for(71))
            large = batch[60]
            assert len(large.body) > 4000
            async with _opened(url) as destination:
                await destination.publish(batch[:20])
                with pytest.raises(DestinationError) as info:
                    await destination.publish(batch[20:])
                assert (destination.chains, destination.chains_failed) == (1, 1)
                assert large.id in str(info.value) and "max_msg_size" in str(info.value)
            check_stream(await nats_stored(stream, port), [e.id for e in batch if e is not large])
        finally:
            await nats_delete(stream, port)

    run(main())


def test_a_lost_link_is_not_hidden_by_another_publisher_s_message(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """The case the expected sequence alone would miss: the chain's first message is
    refused (too large) and another message reaches the stream before the second, which so
    finds the sequence it expects. The second also expects the first's id as the stream's
    last message id, so it is refused, and its PubAck (the chain's one) is an error."""
    port = require("nats")
    admin.execute("CREATE TABLE a (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR ALL TABLES")
    stream = f"CL{unique}"
    subject = f"cl{unique}.a"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=cl{unique}.{{table}}"

    async def main() -> None:
        try:
            await make_stream(port, name=stream, subjects=[f"cl{unique}.>"], max_msg_size=4000)
            async with collecting(dsn) as rec:
                admin.execute("INSERT INTO a VALUES (1, 'x')")
                admin.execute("INSERT INTO a VALUES (2, repeat('y', 6000))")
                admin.execute("INSERT INTO a VALUES (3, 'x')")
                batch: list[Outgoing] = encode(await rec.wait_for(3))
            async with _opened(url) as destination:
                await destination.publish(batch[:1])  # the stream's last: (1, batch[0].id)
                frames, acks = destination._frames, destination._acks
                sent: list[bytes] = []
                send = frames.send

                async def keep(chunks: list[bytes], messages: int, payload: int) -> None:
                    sent.extend(chunks)

                frames.send = keep
                first, done = acks.expect(1)
                assert await frames.chained(batch[1:], destination.subject.render, first,
                                            *destination._last)
                frames.send = send
                data = b"".join(sent)
                second = data.rindex(b"HPUB ")
                # another publisher's message, on this connection so that it surely comes
                # between the two
                foreign = b"PUB %b 2\r\n{}\r\n" % subject.encode()
                await frames.send([data[:second] + foreign + data[second:]], 2, 0)
                await asyncio.wait_for(done, 5)
                assert acks.failure is not None and "wrong last msg ID" in str(acks.failure)
            stored = await nats_stored_raw(stream, port)
            assert stored == [batch[0].id, None]  # the first, then the other publisher's
        finally:
            await nats_delete(stream, port)

    run(main())


async def nats_stored_raw(stream: str, port: int) -> list[str | None]:
    """The Nats-Msg-Id of each stored message (None without one)."""
    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: list[str | None] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((msg.headers or {}).get("Nats-Msg-Id"))
        return out
    finally:
        await nc.close()


def test_chain_is_a_switch() -> None:
    from walex import ConfigError

    base = "nats://127.0.0.1:4222?stream=S"
    assert from_url(base).chained is True  # type: ignore[attr-defined]
    assert from_url(base + "&chain=false").chained is False  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="chain must be true or false, got 'maybe'"):
        from_url(base + "&chain=maybe")


def test_two_relays_publishing_into_one_stream_at_once(admin: psycopg.Connection, dsn: str,
                                                        unique: str) -> None:
    """Two destinations (two relays' connections) publish batches into one stream at the
    same time, so each one's chains keep finding the other's messages in between: every
    message is stored exactly once, each relay's in its own order, whatever chains broke
    and were published again message by message."""
    port = require("nats")
    admin.execute(TABLES)
    stream = f"CT{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=ct{unique}.{{table}}"

    async def main() -> None:
        try:
            events = await _events(admin, dsn, 3999)  # 3,999 rows of a, then one of b
            halves = [events[0::2], events[1::2]]  # ids of both relays interleave in commit order

            async def relay(destination: Any, batch: list[Outgoing]) -> None:
                for at in range(0, len(batch), 100):
                    await destination.publish(batch[at:at + 100])
                    await asyncio.sleep(0)

            async with _opened(url) as first, _opened(url) as second:
                await asyncio.gather(relay(first, halves[0]), relay(second, halves[1]))
                chains = first.chains + second.chains
                broken = first.chains_failed + second.chains_failed
                assert chains > 0 and broken > 0  # the case this is about: chains broke
                assert first.duplicates + second.duplicates <= 100 * broken
            stored = [ident for ident, _doc, _subject in await nats_stored(stream, port)]
            assert sorted(stored) == sorted(e.id for e in events), "not every event once"
            for half in halves:
                mine = {e.id for e in half}
                assert [i for i in stored if i in mine] == [e.id for e in half], "out of order"
        finally:
            await nats_delete(stream, port)

    run(main())


def test_a_batch_whose_chained_headers_would_pass_max_payload_goes_unchained(unique: str) -> None:
    """A chained message carries the previous message's id: a message that fits the server's
    max_payload with its own headers, after one with a long id, would not fit chained (the
    server closes the connection on that). Such a batch goes with a PubAck per message."""
    port = require("nats")
    stream = f"CP{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=cp{unique}.{{table}}"

    def item(ident: str, body: bytes) -> Outgoing:
        return Outgoing(ident, "public", "a", "insert", 0, body, "/db/public/a",
                        "2026-12-06T00:00:00Z", "public.a", None)

    async def main() -> None:
        try:
            async with _opened(url) as destination:
                limit = destination.nc.max_payload
                await destination.publish([item("s", b"{}")])  # the stream's last: a short id
                # the largest body the chain would have been allowed with only "s" in mind
                size = limit - (1 + 64 + len(stream) + CHAINED_EXTRA + 20 + 1)
                batch = [item("x" * 200, b"{}"), item("y", b"z" * size)]
                await destination.publish(batch)
                assert destination.chains == 0
            assert await nats_stored_raw(stream, port) == ["s", "x" * 200, "y"]
        finally:
            await nats_delete(stream, port)

    run(main(), timeout=60)


def test_a_relay_whose_stream_another_publisher_keeps_writing_into_stores_in_order(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """A relay with a window of one-row transactions while another publisher writes into the
    same stream every 20 ms: chains break again and again (and the next batches go unchained
    for a while), yet walex's messages are stored once each, in commit order, none after a
    missing one. (A lane with two chained groups in flight failed exactly this, 2 runs in 12.)"""
    from .test_window import INSERT_KEYS, SETUP, write

    port = require("nats")
    admin.execute(SETUP)
    stream, updates = f"PF{unique}", 1500
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=pf{unique}.{{table}}"

    async def main() -> tuple[list[Any], Any]:
        async with collecting(dsn, destinations=[url], destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec.wait_for(10, 60)
            lane = app.pipeline.window.lanes[0]
            n = rounds = 0
            # rounds of writes until the other publisher broke a chain (a loaded host may
            # go through a round without two groups in flight at a foreign publish)
            while rounds < 5 and (rounds == 0 or lane.destination.chains_failed == 0):
                writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))
                while not writing.done():
                    await _foreign(port, f"pf{unique}.other", f"foreign-{n}")
                    n += 1
                    await asyncio.sleep(0.02)
                await writing
                rounds += 1
                await rec.wait_for(10 + rounds * updates, 120)
            events = await rec.wait_for(10 + rounds * updates, 120)
            await rec._until(lambda: not lane.queued, 60, "every group confirmed")
            return events, lane.destination

    try:
        events, destination = run(main(), timeout=240)
        stored = asyncio.run(nats_stored(stream, port))
    finally:
        asyncio.run(nats_delete(stream, port))
    assert destination.chains_failed > 0  # the other publisher did break chains
    mine = [s for s in stored if not s[0].startswith("foreign-")]
    check_stream(mine, [e.id for e in events])
