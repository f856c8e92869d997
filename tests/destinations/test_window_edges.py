"""A destination window at its edges, attacked the way users hit it.

Concern (:mod:`walex.destinations.window`, :mod:`walex.windowed`): the window
full while the broker is down and the app stopped; against real brokers the
tests start and kill themselves. Every change reaches the broker in order per
key, with the same ids when published again, and nothing is acknowledged to
PostgreSQL before the broker confirmed it.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex import DestinationError
from walex.lsn import parse_lsn

from .brokers import rabbitmq_delete, rabbitmq_queue, rabbitmq_stored, redis_stored
from .conftest import require
from .servers import OwnRedis
from .test_outage import confirmed
from .test_window import INSERT_KEYS, KEYS, SETUP, check_keys, until_confirmed, write

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402


def test_stop_while_the_dispatcher_waits_for_room_in_a_full_window(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker is down and the window (window=4) is full, so the dispatcher waits for
    room with more transactions queued: stop() cuts the window off after shutdown_grace
    without failing, nothing past the broker's last confirmation is acknowledged, and a
    restart delivers every change, in order per key, with the same ids."""
    admin.execute(SETUP)
    slot, updates = "window_full_stop", 12

    async def main(server: OwnRedis) -> tuple[list[Any], list[Any], int]:
        url = f"redis://127.0.0.1:{server.port}/0?stream=wf:{{table}}&timeout=1&window=4"
        options: dict[str, Any] = dict(durable_slot=True, slot_name=slot, status_interval=0.2,
                                       shutdown_grace=1)
        async with collecting(dsn, destinations=[url], **options) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec._until(lambda: app.transactions_handled == 1, 60, "the rows stored")
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(write, dsn, updates)
            await rec._until(lambda: app.destinations.retries >= 1, 60, "a failed attempt")
            await rec._until(lambda: app.pipeline.queue.qsize() >= 1
                             and len(app.pipeline.window) == 4, 60, "the window full")
            first = list(rec.events)
        held = confirmed(admin, slot)
        await asyncio.to_thread(server.start)
        async with collecting(dsn, destinations=[url], **options) as rec:
            again = await rec.wait_for(updates, 60)
            await until_confirmed(admin, slot, parse_lsn(again[-1].lsn), 60)
        return first, again, held

    with OwnRedis(tmp_path) as server, caplog.at_level("WARNING", logger="walex"):
        first, again, held = run(main(server), timeout=240)
        stored = asyncio.run(redis_stored("wf:*", server.port))
    # the window waited for Redis, not for a handler: the stop says which it may be
    assert "handler call or destination publish cut off after shutdown_grace=1s" in caplog.text
    assert held < parse_lsn(first[KEYS].lsn), "acknowledged before Redis confirmed it"
    handled = {e.id: e for e in first}
    assert all(handled[e.id].lsn == e.lsn for e in again if e.id in handled)
    check_keys(stored, updates)


@pytest.mark.parametrize("url", [
    "redis://:pw0rd-x@127.0.0.1:6379/0?stream=s&window=1024",
    "nats://us3r:pw0rd-x@127.0.0.1:4222?stream=S&window=1024",
    "amqp://guest:pw0rd-x@127.0.0.1:5672/?exchange=e&window=1024",
    "https://hooks.example.com/t0ken-pw0rd-x?token=pw0rd-x&secret_env=WALEX_TEST_W&window=1024",
])
def test_a_url_s_window_is_shown_and_never_taken_for_a_secret(
    url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``window=`` is walex's own parameter, in any URL: its value is shown in the URL's
    display (each log line and error), and a number of an error message that happens to
    equal it is not scrubbed as if it were a password; the secrets still are."""
    from walex.destinations import from_url

    monkeypatch.setenv("WALEX_TEST_W", "whsec_" + base64.b64encode(b"window").decode())
    destination = from_url(url)
    assert destination.window == 1024
    assert "window=1024" in destination.display and "pw0rd" not in destination.display
    text = "over the broker's max_message_size of 1024000 bytes (password pw0rd-x)"
    assert destination.url.scrub(text) == \
        "over the broker's max_message_size of 1024000 bytes (password ***)"


async def _redeclare(exchange: str, port: int) -> None:
    """Replace walex's topic exchange with a fanout one of the same name."""
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(exchange)
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    finally:
        await connection.close()


@pytest.mark.parametrize("window", [1, 64])
def test_a_destination_that_cannot_be_opened_again_is_no_refusal_of_the_batch(
    window: int, admin: psycopg.Connection, dsn: str, unique: str,
) -> None:
    """RabbitMQ's connection is cut and meanwhile the exchange is declared again with another
    type: opening the destination again fails for good (PRECONDITION_FAILED), whatever the
    batch. That is the destination's configuration, not a refusal of the batch in hand, so
    on_error="skip" does not skip (and acknowledge) it: the app stops with the error, the
    row unacknowledged."""
    port = require("rabbitmq")
    admin.execute(SETUP)
    slot = f"window_reopen_{unique}"
    exchange, queue = f"wo{unique}", f"wo{unique}.q"
    asyncio.run(rabbitmq_queue(exchange, queue, port))
    proxy = Proxy("127.0.0.1", port).start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?exchange={exchange}&timeout=1"
    app: Any = None

    async def main() -> list[Any]:
        nonlocal app
        with pytest.raises(DestinationError, match="exists with other settings"):
            async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                                  status_interval=0.2, destination_window=window,
                                  on_error="skip") as rec:
                app = rec.app
                assert app is not None
                admin.execute("INSERT INTO k VALUES (0, 0)")
                await rec._until(lambda: app.transactions_handled == 1, 60, "the first row")
                await _redeclare(exchange, port)
                await asyncio.to_thread(proxy.cut)
                admin.execute("INSERT INTO k VALUES (1, 0)")
                await rec._until(lambda: rec._app_done.done() or app.dispatcher.failures, 60,
                                 "the app stopped, or the row skipped")
                assert app.destinations.refusals == 0 and app.dispatcher.failures == 0, \
                    "the row was skipped as refused"
                await app.wait()
        return list(rec.events)

    try:
        events = run(main(), timeout=120)
        at_rabbitmq = asyncio.run(rabbitmq_stored(queue, port))
    finally:
        proxy.stop()
        asyncio.run(rabbitmq_delete(exchange, queue, port))
    assert [e.new_record["id"] for e in events] == [0, 1]
    assert app.destinations.refusals == 0 and app.dispatcher.failures == 0
    assert confirmed(admin, slot) <= parse_lsn(events[1].lsn), "the row was acknowledged"
    assert [i for i, _d, _x in at_rabbitmq] == [events[0].id]


def test_stop_while_a_full_window_waits_makes_the_call_holding_the_deferred_events(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A max_batch handler keeps the events of the transactions in hand while more are
    queued; the window (window=2) is full with Redis down, so the loop waits for room with
    those events kept. stop() comes, then Redis is back: the call holding the kept events
    is made (as without a window: the batches in hand finish), they are acknowledged, and
    the stop cuts nothing off."""
    from walex import Event, Events, WalEx

    admin.execute(SETUP)
    slot = "window_deferred_stop"
    calls: list[list[tuple[int, str]]] = []  # (row, commit LSN) of each call's events
    gate = asyncio.Event()
    events = Events()

    @events.on_event("k", max_batch=50)
    async def handle(items: list[Event]) -> None:
        calls.append([(e.new_record["id"], e.lsn) for e in items])
        await gate.wait()  # the first call holds the dispatcher while the others queue

    async def until(check: Any, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while not check():
            assert asyncio.get_running_loop().time() < deadline, what
            await asyncio.sleep(0.01)

    async def main(server: OwnRedis) -> Any:
        url = f"redis://127.0.0.1:{server.port}/0?stream=wd:{{table}}&timeout=1&window=2"
        app = WalEx(dsn, publication="pub", subscriptions=["k"], modules=[events],
                    name="walex_window_deferred", destinations=[url], durable_slot=True,
                    slot_name=slot, status_interval=0.2, shutdown_grace=20)
        await app.start()
        try:
            admin.execute("INSERT INTO k VALUES (0, 0)")
            await until(lambda: calls and app.pipeline.window is not None
                        and not app.pipeline.window.lanes[0].queued, "row 0 at Redis")
            await asyncio.to_thread(server.stop)
            for i in range(1, 8):
                admin.execute("INSERT INTO k VALUES (%s, 0)", [i])
            await until(lambda: app.pipeline.queue.qsize() == 7, "rows 1 to 7 queued")
            gate.set()  # rows 1 and 2 fill the window, their events kept for one call
            await until(lambda: len(app.pipeline.window) == 2 and app.dispatcher.pending
                        and app.destinations.retries >= 1, "the window full, events kept")
            stopping = asyncio.ensure_future(app.stop())
            await until(lambda: app.pipeline.closing, "the stop began")
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(stopping, 60)
        finally:
            gate.set()
            await app.stop()
        assert [[i for i, _lsn in call] for call in calls] == [[0], [1, 2]]
        await until_confirmed(admin, slot, parse_lsn(calls[1][-1][1]) + 1, 30)  # acknowledged
        return app

    with OwnRedis(tmp_path) as server:
        app = run(main(server), timeout=180)
    assert "cut off" not in caplog.text
    assert app.transactions_handled == 3


def test_a_lane_s_failure_stops_the_app_even_when_a_handler_swallows_its_cancellation(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """A lane ends with a refusal under on_error="stop" (Redis refuses the events of table
    ``other``) while the dispatcher awaits an async handler that catches the
    CancelledError meant to interrupt it and returns. The lane's error still stops the
    app (raised by wait()), rather than leaving a relay with no lane that acknowledges
    nothing and never says why; the refused transaction is not acknowledged."""
    from walex import Event, Events, WalEx

    from .test_window import _refusing_other

    admin.execute(SETUP)
    slot = "window_swallowed"
    gate, started = asyncio.Event(), asyncio.Event()
    swallowed: list[int] = []
    events = Events()

    @events.on_insert("k")
    async def handle(items: list[Event]) -> None:
        if items[0].new_record["id"] == 0:
            started.set()
            await gate.wait()
            return
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:  # a handler that does not let itself be cancelled
            swallowed.append(items[0].new_record["id"])

    async def main(server: OwnRedis) -> tuple[BaseException | None, int]:
        url = await _refusing_other(server, "wsw")
        app = WalEx(dsn, publication="pub", subscriptions=["k", "other"], modules=[events],
                    name="walex_window_swallowed", destinations=[url], durable_slot=True,
                    slot_name=slot, status_interval=0.2, on_error="stop")
        await app.start()
        error: BaseException | None = None
        try:
            admin.execute("INSERT INTO k VALUES (0, 0)")
            await asyncio.wait_for(started.wait(), 30)
            before = int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])
            admin.execute("INSERT INTO other VALUES (1)")  # refused by Redis for good
            admin.execute("INSERT INTO k VALUES (1, 0)")  # its call swallows the cancel
            end = int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while app.ack.received < end or app.pipeline.queue.qsize() < 2:
                assert loop.time() < deadline, "the two transactions were never queued"
                await asyncio.sleep(0.01)
            gate.set()  # both taken together: published as one group, the handler called
            try:
                await asyncio.wait_for(app.wait(), 60)
            except TimeoutError:
                raise AssertionError("the app neither stopped nor relayed: the lane is gone "
                                     f"(its error: {app.pipeline.window.error!r})") from None
            except Exception as exc:
                error = exc
        finally:
            gate.set()
            await asyncio.gather(app.stop(), return_exceptions=True)
        return error, before

    with OwnRedis(tmp_path) as server:
        error, before = run(main(server), timeout=180)
    assert swallowed == [1]
    assert isinstance(error, DestinationError) and "wsw:other" in str(error)
    assert confirmed(admin, slot) <= before, "acknowledged past the refused transaction"


def test_a_confirmation_after_the_window_was_discarded_takes_no_bytes_off(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """A standby that loses its lock drops everything it received (queue and window,
    ``Pipeline.discard_unhandled``, which zeroes the byte budget's count) before its lanes
    are cancelled; a confirmation arriving in between must not take its batch's bytes off
    again (on main the count went below zero: the budget loosened by that much for good).
    Reproduced by discarding while the lanes wait for a stopped Redis, then starting it."""
    admin.execute(SETUP)
    updates = 6

    async def main(server: OwnRedis) -> int:
        url = f"redis://127.0.0.1:{server.port}/0?stream=wd:{{table}}&timeout=1&window=64"
        async with collecting(dsn, destinations=[url], status_interval=0.2) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec._until(lambda: app.transactions_handled == 1, 60, "the rows stored")
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(write, dsn, updates)
            await rec._until(lambda: len(app.pipeline.window) >= 1, 60, "batches in the window")
            handled = app.transactions_handled
            app.pipeline.discard_unhandled()  # what standby.abandon does first
            await asyncio.to_thread(server.start)
            await rec._until(lambda: app.transactions_handled > handled, 60,
                             "a confirmation after the discard")
            return app.pipeline.queue.bytes

    with OwnRedis(tmp_path) as server:
        left = run(main(server), timeout=120)
    assert left >= 0, f"the byte count went to {left}"
