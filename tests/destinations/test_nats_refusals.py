"""NATS refusals that retrying cannot cure follow on_error; /healthz says when a destination fails.

Against the machine's nats-server (127.0.0.1:4222, JetStream) and a real
PostgreSQL: a row over the server's max_payload, a stream with
``max_msg_size``, a full stream with ``discard=new`` and a stream whose
subjects do not take walex's subject. Each test uses streams of its own.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg
import pytest
from support import collecting, run, until

from walex import DestinationError, Event
from walex.lsn import parse_lsn
from walex.observe.health import health

from .brokers import check_stream, nats_delete, nats_stored, wait_count
from .conftest import require

TABLE = """
CREATE TABLE a (id int PRIMARY KEY, v text);
CREATE PUBLICATION pub FOR ALL TABLES;
"""


async def make_stream(port: int, **config: Any) -> int:
    """Create a stream; returns the server's max_payload."""
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        await nc.jetstream().add_stream(StreamConfig(**config))
        return int(nc.max_payload)
    finally:
        await nc.close()


async def max_payload(port: int) -> int:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        return int(nc.max_payload)
    finally:
        await nc.close()


async def purge(stream: str, port: int) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        await nc.jetstream().purge_stream(stream)
    finally:
        await nc.close()


async def setup_case(case: str, port: int, stream: str, unique: str) -> tuple[str, int]:
    """Set the broker up for ``case``; returns (destination URL, bytes of the refused row)."""
    from nats.js.api import DiscardPolicy

    subject = f"wr{unique}.{{table}}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject={subject}&timeout=5"
    if case == "max_payload":
        return url, await max_payload(port) + 1000
    if case == "max_msg_size":
        await make_stream(port, name=stream, subjects=[f"wr{unique}.>"], max_msg_size=2000)
        return url, 5000
    if case == "full":  # room for the first row only, and new messages refused
        await make_stream(port, name=stream, subjects=[f"wr{unique}.>"], max_msgs=1,
                          discard=DiscardPolicy.NEW)
        return url, 10
    assert case == "subjects"  # the stream exists, for other subjects
    await make_stream(port, name=stream, subjects=[f"other{unique}.>"])
    return url, 10


MESSAGES = {
    "max_payload": "over the server's max_payload",
    "max_msg_size": "max_msg_size",
    "full": "the stream is full and has discard=new",
    "subjects": "no stream takes subject",
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_a_permanent_refusal_stops_the_app_unacknowledged(admin: psycopg.Connection, dsn: str,
                                                          unique: str, case: str) -> None:
    port = require("nats")
    admin.execute(TABLE)
    stream = f"WR_{unique}"

    async def main() -> None:
        try:
            url, size = await setup_case(case, port, stream, unique)
            with pytest.raises(DestinationError, match=MESSAGES[case]) as info:
                async with collecting(dsn, destinations=[url]) as rec:
                    rec.app.destinations.items[0].full_attempts = 2  # type: ignore[union-attr]
                    if case == "full":  # fill the stream: this row is stored
                        admin.execute("INSERT INTO a VALUES (0, 'fits')")
                        await wait_count(lambda: nats_stored(stream, port), 1)
                    admin.execute("INSERT INTO a VALUES (1, repeat('x', %s))", (size,))
                    await rec._until(lambda: False, 60, "the app to stop")
            assert stream in str(info.value) or case == "max_payload"
            app = rec.app
            assert app is not None
            event = [e for e in rec.events if e.new_record["id"] == 1][0]
            assert app.ack.flushed < parse_lsn(event.lsn)  # nothing acknowledged past it
        finally:
            await nats_delete(stream, port)

    run(main(), timeout=120)


@pytest.mark.parametrize("case", ["max_payload", "max_msg_size", "subjects"])
def test_under_skip_the_refused_batch_is_settled_and_the_stream_goes_on(
        admin: psycopg.Connection, dsn: str, unique: str, case: str) -> None:
    port = require("nats")
    admin.execute(TABLE)
    stream = f"WR_{unique}"
    dead: list[tuple[list[str], BaseException]] = []

    def dead_letter(events: list[Event], exc: BaseException) -> None:
        dead.append(([e.id for e in events], exc))

    async def main() -> None:
        try:
            url, size = await setup_case(case, port, stream, unique)
            async with collecting(dsn, destinations=[url], on_error=dead_letter) as rec:
                app = rec.app
                assert app is not None
                admin.execute("INSERT INTO a VALUES (1, repeat('x', %s))", (size,))
                admin.execute("INSERT INTO a VALUES (2, 'small')")
                events = await rec.wait_for(2)
                await until(lambda: app.ack.flushed > parse_lsn(events[1].lsn),
                            "both transactions acknowledged", timeout=60)
                assert app.destinations.refusals >= 1
            [(ids, exc)] = dead[:1]
            assert ids == [events[0].id] and isinstance(exc, DestinationError)
            assert MESSAGES[case] in str(exc)
            if case != "subjects":  # the second row was stored; the first never was
                stored = await wait_count(lambda: nats_stored(stream, port), 1)
                check_stream(stored, [events[1].id])
                assert app.destinations.refusals == 1
        finally:
            await nats_delete(stream, port)

    run(main(), timeout=120)


def test_a_full_stream_is_retried_a_while_then_follows_on_error(
        admin: psycopg.Connection, dsn: str, unique: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """discard=new: retried (room may be freed), then skipped under "skip", with warnings."""
    port = require("nats")
    admin.execute(TABLE)
    stream = f"WR_{unique}"

    async def main() -> None:
        try:
            url, _size = await setup_case("full", port, stream, unique)
            async with collecting(dsn, destinations=[url], on_error="skip") as rec:
                app = rec.app
                assert app is not None
                app.destinations.items[0].full_attempts = 3  # type: ignore[union-attr]
                admin.execute("INSERT INTO a VALUES (0, 'fits')")
                admin.execute("INSERT INTO a VALUES (1, 'no room')")
                events = await rec.wait_for(2)
                await until(lambda: app.ack.flushed > parse_lsn(events[1].lsn),
                            "both transactions acknowledged", timeout=60)
                assert app.destinations.refusals == 1
                # 3 attempts, then on_error (with a window the two transactions go as one
                # group first, then one at a time: the refused one has its 3 attempts again)
                assert app.destinations.retries >= 2
            stored = await nats_stored(stream, port)
            check_stream(stored, [events[0].id])
        finally:
            await nats_delete(stream, port)

    with caplog.at_level(logging.WARNING):
        run(main(), timeout=120)
    assert "the stream is full and has discard=new" in caplog.text  # never dropped silently


def test_healthz_is_503_while_a_destination_cannot_deliver_and_200_once_it_does(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """A full stream retried: unhealthy past unhealthy_after; healthy once room was freed."""
    port = require("nats")
    admin.execute(TABLE)
    stream = f"WR_{unique}"

    async def main() -> None:
        import asyncio
        import urllib.error
        import urllib.request

        def get(url: str) -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        try:
            url, _size = await setup_case("full", port, stream, unique)
            async with collecting(dsn, destinations=[url], metrics_port=0,
                                  metrics_host="127.0.0.1") as rec:
                app = rec.app
                assert app is not None
                app.destinations.items[0].full_attempts = 10_000  # type: ignore[union-attr]
                app.destinations.unhealthy_after = 0.5
                await until(lambda: health(app)[0] == 200, "healthy at first")
                admin.execute("INSERT INTO a VALUES (0, 'fits')")
                admin.execute("INSERT INTO a VALUES (1, 'no room')")
                events = await rec.wait_for(2)
                await until(lambda: health(app)[0] == 503, "unhealthy while refused", timeout=30)
                status, body = await asyncio.to_thread(
                    get, f"http://127.0.0.1:{app.observer.port}/healthz")
                assert status == 503 and body["status"] == "destination_failing", body
                assert f"destination nats://127.0.0.1:{port}?stream={stream}" in body["reason"]
                assert "discard=new" in body["reason"]
                assert app.ack.flushed < parse_lsn(events[1].lsn)
                await purge(stream, port)  # room again: the batch goes in
                await until(lambda: app.ack.flushed > parse_lsn(events[1].lsn),
                            "the second acknowledged once there is room", timeout=60)
                await until(lambda: health(app)[0] == 200, "healthy again")
                status, body = await asyncio.to_thread(
                    get, f"http://127.0.0.1:{app.observer.port}/healthz")
                assert status == 200 and body["status"] == "streaming", body
                assert app.destinations.refusals == 0
        finally:
            await nats_delete(stream, port)

    run(main(), timeout=120)
