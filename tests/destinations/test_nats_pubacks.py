"""The two ways PubAcks reach walex (walex.destinations.pubacks): straight from nats-py's
parser (direct) and through the subscription (the fallback), against the machine's
nats-server and a real PostgreSQL. Both store every event once, count duplicates and fail
a batch on a refusal with the same error."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import nats.aio.client
import nats.js.errors
import psycopg
import pytest
from support import collecting, run

from walex import DestinationError
from walex.destinations import from_url
from walex.destinations import pubacks as pubacks_module
from walex.destinations.encoding import Outgoing, encode
from walex.destinations.pubacks import PubAcks, direct_usable

from .brokers import check_stream, nats_delete, nats_stored
from .conftest import require
from .test_nats_refusals import make_stream

TABLES = """
CREATE TABLE a (id int PRIMARY KEY, v int);
CREATE TABLE b (id int PRIMARY KEY, v int);
CREATE PUBLICATION pub FOR ALL TABLES;
"""
WAYS = ["direct", "subscription"]


def _way(way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if way == "subscription":  # a client the direct way was not checked for
        monkeypatch.setattr(pubacks_module, "direct_usable", lambda nc, sid: False)


def _delivered(destination: Any) -> int:
    """Answers the ack subscription's queue took (none of the direct way's)."""
    acks = destination._acks
    return sum(sub._received for sub in destination.nc._subs.values()
               if sub.subject == acks.prefix + "*")


async def _events(admin: psycopg.Connection, dsn: str, rows: int) -> list[Outgoing]:
    async with collecting(dsn) as rec:
        admin.execute("INSERT INTO a SELECT g, g FROM generate_series(1, %s) g", (rows,))
        admin.execute("INSERT INTO b VALUES (1, 1)")
        return encode(await rec.wait_for(rows + 1))


@pytest.mark.parametrize("way", WAYS)
def test_every_event_stored_once_and_duplicates_counted(admin: psycopg.Connection, dsn: str,
                                                        unique: str, way: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    port = require("nats")
    _way(way, monkeypatch)
    admin.execute(TABLES)
    stream = f"WK{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=wk{unique}.{{table}}"

    async def main() -> None:
        try:
            batch = await _events(admin, dsn, 5000)  # more than one window of 4096
            destination = from_url(url + "&chain=false")  # a PubAck per message
            for attempt in range(2):  # a second connection (as after a lost one) works alike
                await destination.open()
                acks = destination._acks  # type: ignore[attr-defined]
                nc = destination.nc  # type: ignore[attr-defined]
                assert acks.is_direct is (way == "direct")
                try:
                    if attempt == 0:
                        await destination.publish(batch[:3000])
                        assert destination.duplicates == 0  # type: ignore[attr-defined]
                        await destination.publish(batch[1000:])
                        assert destination.duplicates == 2000  # type: ignore[attr-defined]
                        answers = 3000 + 4001
                    else:
                        await destination.publish(batch[-10:])
                        assert destination.duplicates == 2010  # type: ignore[attr-defined]
                        answers = 10
                    # the direct way built no message and queued nothing for the subscription
                    assert _delivered(destination) == (0 if way == "direct" else answers)
                    assert nc.stats["in_msgs"] >= answers
                finally:
                    await destination.close()
                assert "_process_msg" not in vars(nc)  # the client has its own back
            check_stream(await nats_stored(stream, port), [e.id for e in batch])
        finally:
            await nats_delete(stream, port)

    run(main())


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", ["no_responders", "other_stream"])
def test_a_refused_message_fails_its_batch_with_the_same_error(
        admin: psycopg.Connection, dsn: str, unique: str, way: str, case: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose other messages are PubAcked (counted the direct way) fails on the one
    message refused: no responders (503, a subject no stream takes) or another stream."""
    port = require("nats")
    _way(way, monkeypatch)
    admin.execute(TABLES)
    stream, other = f"WR{unique}", f"WO{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=wr{unique}.{{table}}&timeout=5"

    async def main() -> None:
        try:
            await make_stream(port, name=stream, subjects=[f"wr{unique}.a"])
            if case == "other_stream":
                await make_stream(port, name=other, subjects=[f"wr{unique}.b"])
            batch = await _events(admin, dsn, 50)  # 50 rows of a, then one of b
            destination = from_url(url)
            await destination.open()
            try:
                assert destination._acks.is_direct is (way == "direct")  # type: ignore[attr-defined]
                with pytest.raises(DestinationError) as info:
                    await destination.publish(batch)
                if case == "no_responders":
                    assert f"no stream takes subject 'wr{unique}.b'" in str(info.value)
                else:
                    assert "the subject is stored by another stream" in str(info.value)
                assert batch[-1].id in str(info.value) or case == "no_responders"
                await destination.publish(batch[:50])  # the accepted ones: stored already
                assert destination.duplicates == 50  # type: ignore[attr-defined]
            finally:
                await destination.close()
            check_stream(await nats_stored(stream, port), [e.id for e in batch[:50]])
        finally:
            await nats_delete(stream, port)
            await nats_delete(other, port)

    run(main())


@pytest.mark.parametrize("way", WAYS)
def test_answers_are_judged_alike_either_way(way: str) -> None:
    """Answers sent by hand to the ack subscription: a plain PubAck counts, one with headers
    and a PubAck written differently are parsed and count, an old attempt's and a repeated
    answer are ignored, an unreadable one fails the batch as the subscription's path does."""
    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        other = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        acks = PubAcks(nc.new_inbox() + ".")
        try:
            sub = await nc.subscribe(acks.prefix + "*", cb=acks.received)
            await nc.flush()  # the server knows the subscription before `other` answers
            if way == "direct":
                assert acks.direct(nc, sub._id)
                assert not acks.direct(nc, sub._id)  # once
            p = acks.prefix

            async def answer(n: int, data: bytes, headers: dict[str, str] | None = None) -> None:
                await other.publish(f"{p}{n}", data, headers=headers)

            acks.expect(2)  # 0, 1: an attempt given up
            first, done = acks.expect(4)  # 2 .. 5
            assert first == 2
            await answer(0, b'{"stream":"S","seq":1}')  # the old attempt's: ignored
            await answer(2, b'{"stream":"S", "seq":2,"duplicate": true}')
            await answer(2, b'{"stream":"S","seq":2}')  # answered already: ignored
            await answer(3, b'{"stream":"S","seq":3}', headers={"X": "y"})  # not plain
            await answer(4, b'{ "seq": 4, "stream": "S"}')  # a PubAck, written otherwise
            await other.flush()
            await asyncio.sleep(0.2)
            assert not done.done()
            await answer(5, b'{"stream":"S","seq":5,"duplicate":false}')
            await asyncio.wait_for(done, 5)
            assert acks.failure is None and acks.duplicates == 1
            if way == "direct":
                assert sub._received == 2  # only the two that are not plain PubAcks

            _, done = acks.expect(3)  # 6 .. 8
            await answer(6, b'{"stream":"S","seq":6}')
            await answer(7, b'not json')
            await asyncio.wait_for(done, 5)
            assert isinstance(acks.failure, nats.js.errors.Error)
            assert "unreadable PubAck b'not json'" in str(acks.failure)
            assert acks.failed_at == 1

            _, done = acks.expect(1)  # 9: a 503 status, as no responders
            await answer(9, b"", headers={"Status": "503"})
            await asyncio.wait_for(done, 5)
            assert isinstance(acks.failure, nats.js.errors.NoStreamResponseError)
        finally:
            acks.release()
            assert "_process_msg" not in vars(nc)
            await other.close()
            await nc.close()

    run(main())


def test_only_checked_clients_are_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        try:
            sub = await nc.subscribe("_walex_test.*")
            assert direct_usable(nc, sub._id)  # the nats-py walex is tested with
            assert not direct_usable(nc, sub._id + 1000)  # not a subscription of nc
            for version in ("2.5.3", "3.0.0"):
                monkeypatch.setattr(nats.aio.client, "__version__", version)
                assert not direct_usable(nc, sub._id), version
                assert not PubAcks("x.").direct(nc, sub._id)
                assert "_process_msg" not in vars(nc)
            monkeypatch.setattr(nats.aio.client, "__version__", "2.6.0")
            assert direct_usable(nc, sub._id)

            async def other(*args: Any) -> None:
                return None

            nc._process_msg = other  # somebody else's hook: left alone
            assert not direct_usable(nc, sub._id)
            del nc._process_msg
            monkeypatch.setattr(nc._ps, "nc", None)  # a parser that does not call this client
            assert not direct_usable(nc, sub._id)
        finally:
            await nc.close()

    run(main())
