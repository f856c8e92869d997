"""The app's lifecycle: what ``stop()`` finishes and cuts off, and that no internal task dies silently.

Concern: :meth:`WalEx.stop` lets the batch in hand finish (within
``shutdown_grace``), acknowledges it and starts nothing queued after it; a
handler call still running when the grace runs out is cancelled, and the log
says so. Whatever a handler raises, ``asyncio.CancelledError`` included, is a
handler failure under the error policy; an internal task that ends in any way
while the app runs makes :meth:`WalEx.wait` raise.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import psycopg
import pytest
from support import collecting, run, until

from walex import ConfigError, Event, Events, HandlerError, WalEx, WalExError

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item;
"""

_names = itertools.count(1)


def make_app(dsn: str, events: Events, **options: Any) -> WalEx:
    options.setdefault("name", f"walex_lifecycle_{next(_names)}")
    return WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events], **options)


def commit_lsn(event: Event) -> int:
    """The commit LSN of the event's transaction, from its id: acknowledged if the slot is past it."""
    return int(event.id.split("-")[0], 16)


def confirmed_flush(admin: psycopg.Connection, slot: str) -> int:
    """The slot's confirmed position, once its walsender is gone (so it read the last status update)."""
    deadline = time.monotonic() + 10
    while True:
        row = admin.execute(
            "SELECT confirmed_flush_lsn - '0/0', active FROM pg_replication_slots WHERE slot_name = %s",
            [slot],
        ).fetchone()
        assert row is not None, f"no slot {slot}"
        if not row[1]:
            return int(row[0])
        assert time.monotonic() < deadline, f"slot {slot} still active 10s after stop()"
        time.sleep(0.05)


def current_lsn(admin: psycopg.Connection) -> int:
    return int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])  # type: ignore[index]


# -- a handler's CancelledError is a handler failure ---------------------------


@pytest.mark.parametrize("kind", ["async", "plain"])
def test_handler_raising_cancelled_error_is_retried(admin: psycopg.Connection, dsn: str, kind: str) -> None:
    admin.execute(SCHEMA)
    calls: list[list[Event]] = []
    events = Events()

    def flaky(items: list[Event]) -> None:
        calls.append(items)
        if len(calls) == 1:
            raise asyncio.CancelledError()

    async def flaky_async(items: list[Event]) -> None:
        flaky(items)

    events.on_insert("item")(flaky_async if kind == "async" else flaky)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, max_retries=2, retry_backoff=0.01)
        async with app:
            admin.execute("INSERT INTO item VALUES (1)")
            await until(lambda: app.transactions_handled == 1, "the transaction handled")
            assert app.dispatcher.retries == 1
            await app.stop()
        [[first], [second]] = calls
        assert first.id == second.id
        assert confirmed_flush(admin, app.slot_name) > commit_lsn(first)

    run(main())


def test_handler_always_raising_cancelled_error_stops_the_app(
    admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute(SCHEMA)
    calls: list[list[Event]] = []
    events = Events()

    @events.on_insert("item")
    async def broken(items: list[Event]) -> None:
        calls.append(items)
        raise asyncio.CancelledError()

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, max_retries=1, retry_backoff=0.01)
        await app.start()
        try:
            admin.execute("INSERT INTO item VALUES (1)")
            with pytest.raises(HandlerError, match=r"handler .*broken raised CancelledError\(\)"):
                await asyncio.wait_for(app.wait(), 20)
        finally:
            await app.stop()
        assert len(calls) == 2  # the call and one retry
        assert confirmed_flush(admin, app.slot_name) < commit_lsn(calls[0][0])

    with caplog.at_level(logging.WARNING, logger="walex"):
        run(main())
    assert any("retry 1/1" in r.getMessage() for r in caplog.records)


def test_function_raising_cancelled_error_is_skipped(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    seen: list[Event] = []
    events = Events()

    def function(event: Event) -> None:
        seen.append(event)
        if event.new_record["id"] == 1:
            raise asyncio.CancelledError()

    events.on_insert("item", functions=[function])(lambda items: None)

    async def main() -> None:
        async with collecting(dsn, modules=[events], on_error="skip", max_retries=0) as rec:
            admin.execute("INSERT INTO item VALUES (1), (2)")
            admin.execute("INSERT INTO item VALUES (3)")
            await rec.wait_for(3)
            await until(lambda: rec.app.transactions_handled == 2, "2 transactions")  # type: ignore[union-attr]
            assert rec.app.dispatcher.failures == 1  # type: ignore[union-attr]
            assert rec.app.ack.flushed > commit_lsn(rec.events[2])  # type: ignore[union-attr]
        assert sorted(e.new_record["id"] for e in seen) == [1, 2, 3]

    run(main())


# -- an internal task that ends is an error ----------------------------------


@pytest.mark.parametrize("how", ["cancelled", "returned"])
def test_an_internal_task_that_ends_makes_wait_raise(admin: psycopg.Connection, dsn: str, how: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        app = make_app(dsn, Events())
        if how == "returned":  # as an acknowledger with a bug would
            async def returns() -> None:
                await asyncio.sleep(0.2)

            app.pipeline.run_acknowledger = returns  # type: ignore[method-assign]
        await app.start()
        try:
            if how == "cancelled":
                [task] = [t for t in asyncio.all_tasks() if t.get_name() == f"walex-{app.settings.name}-ack"]
                task.cancel()
            with pytest.raises(WalExError, match=f"internal task walex-{app.settings.name}-ack {how}"):
                await asyncio.wait_for(app.wait(), 15)
        finally:
            await app.stop()

    run(main())


def test_wait_before_start_is_an_error_not_a_hang(admin: psycopg.Connection, dsn: str) -> None:
    """wait() on an app (or a worker) that was never started waited for ever: a
    ConfigError naming the fix. After a start and a stop it returns."""
    from walex.workers import Worker

    admin.execute(SCHEMA)

    async def main() -> None:
        app = make_app(dsn, Events())
        with pytest.raises(ConfigError, match=r"never started.*start\(\) first"):
            await asyncio.wait_for(app.wait(), 5)
        await app.start()
        await app.stop()
        await asyncio.wait_for(app.wait(), 5)
        events = Events()
        events.on_event("item")(lambda batch: None)
        worker = Worker("nats://127.0.0.1:1?stream=never", [events])  # not connected
        with pytest.raises(ConfigError, match=r"never started"):
            await asyncio.wait_for(worker.wait(), 5)

    run(main())


# -- stop() and shutdown_grace -------------------------------------------------


def test_stop_finishes_the_batch_in_hand_and_starts_no_other(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    started: list[Event] = []
    finished: list[Event] = []
    events = Events()

    @events.on_insert("item")
    async def slow(items: list[Event]) -> None:
        started.extend(items)
        await asyncio.sleep(1)
        finished.extend(items)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True)
        await app.start()
        for i in range(1, 10):
            admin.execute("INSERT INTO item VALUES (%s)", [i])
        ninth = current_lsn(admin)
        admin.execute("INSERT INTO item VALUES (10)")
        await until(lambda: started, "the first call")
        # received past the ninth commit: transactions 2 to 9 at least are queued
        await until(lambda: app.ack.received >= ninth, "the transactions received")
        began = time.monotonic()
        await app.stop()
        assert time.monotonic() - began < 5  # liveness: not a 1 s handler per queued transaction
        assert [e.new_record["id"] for e in started] == [1]
        assert finished == started  # the call in hand completed
        acknowledged = confirmed_flush(admin, app.slot_name)
        assert acknowledged > commit_lsn(started[0])
        await app.wait()

        # a restart resumes at the second transaction, each delivered once
        await app.start()
        try:
            await until(lambda: len(finished) == 10, "the other 9 transactions", timeout=30)
            await asyncio.sleep(0.3)
        finally:
            await app.stop()
        # the first transaction was acknowledged (not delivered again), the second was not
        assert [e.new_record["id"] for e in finished] == list(range(1, 11))
        assert acknowledged <= commit_lsn(finished[1])

    run(main(), timeout=90)


@pytest.mark.parametrize("kind", ["async", "plain"])
def test_stop_cuts_off_a_handler_after_the_grace_and_says_so(
    admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    admin.execute(SCHEMA)
    started: list[Event] = []
    finished: list[Event] = []
    events = Events()

    if kind == "async":
        @events.on_insert("item")
        async def stuck(items: list[Event]) -> None:
            started.extend(items)
            await asyncio.sleep(4)
            finished.extend(items)
    else:
        @events.on_insert("item")
        def stuck(items: list[Event]) -> None:
            started.extend(items)
            time.sleep(4)
            finished.extend(items)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, shutdown_grace=0.5)
        await app.start()
        admin.execute("INSERT INTO item VALUES (1)")
        await until(lambda: started, "the call")
        await app.stop()
        assert finished == []
        assert confirmed_flush(admin, app.slot_name) < commit_lsn(started[0])
        return app

    with caplog.at_level(logging.WARNING, logger="walex"):
        app = run(main())
    [message] = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert "handler call cut off after shutdown_grace=0.5s" in message
    assert f"transaction committed at {started[0].lsn} was not acknowledged" in message
    assert app.settings.name in message


@pytest.mark.parametrize("where", ["handler", "plain handler's awaitable", "function"])
@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit])
def test_handler_raising_base_exception_when_cut_off(admin: psycopg.Connection, dsn: str,
                                                     kind: type[BaseException], where: str) -> None:
    """A handler (a per-event function, the awaitable a plain handler returned) cut off by
    stop() that raises KeyboardInterrupt or SystemExit as it is cancelled: on main it left
    its task and stopped the event loop itself, stop() cancelled half done; it must be the
    error wait() raises, stop() finishing."""
    admin.execute(SCHEMA)
    events = Events()
    started: list[Event] = []

    async def stubborn(event: Event) -> None:
        started.append(event)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise kind("leaving") from None

    if where == "handler":
        @events.on_insert("item")
        async def handler(items: list[Event]) -> None:
            await stubborn(items[0])
    elif where == "plain handler's awaitable":  # awaited on the loop (walex.threads)
        events.on_insert("item")(lambda items: stubborn(items[0]))
    else:
        events.on_insert("item", functions=[stubborn])(lambda items: None)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, shutdown_grace=0.5)
        await app.start()
        admin.execute("INSERT INTO item VALUES (1)")
        await until(lambda: started, "the call")
        await app.stop()
        with pytest.raises(HandlerError, match=kind.__name__) as info:
            await app.wait()
        cause = info.value.__cause__
        while isinstance(cause, HandlerError):  # a function's: within the dispatch's own
            cause = cause.__cause__
        assert isinstance(cause, kind)
        assert not app._tasks
        assert confirmed_flush(admin, app.slot_name) < commit_lsn(started[0])

    try:
        run(main())
    except (KeyboardInterrupt, SystemExit) as exc:  # out of the loop: not the test runner's
        pytest.fail(f"{exc!r} left the event loop")


def test_a_stop_whose_caller_is_cancelled_still_ends(admin: psycopg.Connection, dsn: str) -> None:
    """stop() under a timeout that runs out (asyncio.wait_for, a second Ctrl-C cancelling
    the main task) while the call in hand finishes: on main the stop was cancelled half
    done (session open, slot active, tasks kept) and every later stop() returned at once;
    the stop must go on to its end, and a later stop() wait for it."""
    admin.execute(SCHEMA)
    events = Events()
    started: list[Event] = []
    finished: list[Event] = []

    @events.on_insert("item")
    async def slow(items: list[Event]) -> None:
        started.extend(items)
        await asyncio.sleep(1.5)
        finished.extend(items)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, shutdown_grace=10)
        await app.start()
        admin.execute("INSERT INTO item VALUES (1)")
        await until(lambda: started, "the call")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(app.stop(), 0.2)
        await app.stop()  # waits for the stop under way
        assert finished == started
        assert not app._tasks and app.pipeline.connection is None
        await app.wait()
        assert confirmed_flush(admin, app.slot_name) > commit_lsn(started[0])

    run(main())


def test_a_cut_off_call_that_swallows_its_cancellation_is_not_acknowledged(
        admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A handler cut off by stop() that catches its cancellation and returns: stop() logged
    that the transaction was not acknowledged, and on main then acknowledged it (the
    dispatcher loop recorded the call's return), so the slot never delivered it again."""
    admin.execute(SCHEMA)
    events = Events()
    calls: list[Event] = []

    @events.on_insert("item")
    async def swallowing(items: list[Event]) -> None:
        calls.extend(items)
        if len(calls) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                return  # gives up half-way, as if done

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, shutdown_grace=0.5)
        await app.start()
        admin.execute("INSERT INTO item VALUES (1)")
        await until(lambda: calls, "the call")
        await app.stop()
        assert "not acknowledged" in caplog.text
        assert confirmed_flush(admin, app.slot_name) < commit_lsn(calls[0])
        await app.start()  # the slot delivers it again
        try:
            await until(lambda: len(calls) == 2, "the transaction delivered again")
        finally:
            await app.stop()
        assert [e.id for e in calls] == [calls[0].id] * 2

    run(main())


def test_start_while_a_cancelled_stop_goes_on_and_two_starts_at_once(
        admin: psycopg.Connection, dsn: str) -> None:
    """start() right after a stop() whose caller was cancelled waits for that stop to end
    (which would otherwise close what the start opens; on main the half-done stop left
    the app 'already started'); a second start() while one is under way is a ConfigError
    (on main both opened a session)."""
    admin.execute(SCHEMA)
    events = Events()
    calls: list[Event] = []

    @events.on_insert("item")
    async def slow(items: list[Event]) -> None:
        calls.extend(items)
        await asyncio.sleep(1)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, shutdown_grace=10)
        await app.start()
        admin.execute("INSERT INTO item VALUES (1)")
        await until(lambda: calls, "the call")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(app.stop(), 0.2)
        first = asyncio.ensure_future(app.start())
        await asyncio.sleep(0)
        with pytest.raises(ConfigError, match="already starting"):
            await app.start()
        await first
        try:
            admin.execute("INSERT INTO item VALUES (2)")
            await until(lambda: len(calls) == 2, "the second transaction")
            assert app.pipeline.connection is not None  # the stop did not close this session
            assert app._tasks and not any(t.done() for t in app._tasks)
        finally:
            await app.stop()
        await app.wait()
        assert [e.new_record["id"] for e in calls] == [1, 2]

    run(main())


def test_a_stop_while_start_opens_its_session_leaves_nothing_running(
        admin: psycopg.Connection, dsn: str) -> None:
    """stop() called while start() was past any standby wait, opening its session: the stop
    closed the session under it and returned, then start() went on, made its tasks and
    returned, the app running after its stop() (seen in the suite: a standby's start()
    ending just after a.stop() let it have the slot, b.stop() racing it, the app left
    running for the rest of the process). start() now raises StoppedError and the stop
    closes what it opened."""
    from walex import StoppedError
    import walex.app

    admin.execute(SCHEMA)
    slots: list[str] = []

    async def main() -> None:
        app = make_app(dsn, Events(), durable_slot=True)
        slots.append(app.slot_name)
        real, opened, go = app._open, asyncio.Event(), asyncio.Event()

        async def open_slowly() -> None:
            await real()
            opened.set()
            await go.wait()  # the rest of start() after its session is open

        app._open = open_slowly  # type: ignore[method-assign]
        starting = asyncio.ensure_future(app.start())
        await asyncio.wait_for(opened.wait(), 30)
        stopping = asyncio.ensure_future(app.stop())
        await asyncio.sleep(0.3)
        go.set()
        with pytest.raises(StoppedError, match="stopped while start"):
            await asyncio.wait_for(starting, 10)
        await asyncio.wait_for(stopping, 10)
        assert not app._tasks
        assert app.settings.name not in walex.app._running
        await asyncio.wait_for(app.wait(), 5)

    run(main())
    deadline = time.monotonic() + 10  # the walsender ends just after its client closed
    while (active := admin.execute("SELECT active FROM pg_replication_slots WHERE "
                                   "slot_name = %s", slots).fetchone()) != (False,):
        assert time.monotonic() < deadline, f"the slot still held after the stop: {active}"
        time.sleep(0.05)
