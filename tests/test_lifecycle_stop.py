"""``stop()`` asked for by the app's own calls, and what a stop leaves behind.

Concern: a handler (or a per-event function, a plain handler through
``run_coroutine_threadsafe``, a message middleware) that stops its app,
awaiting ``app.stop()`` as any other code would, cannot wait for the stop to
end: the stop waits for the call in hand. The stop must still happen,
promptly and whole: the call returns, its transaction is acknowledged,
nothing after it is handled, the session is closed (the slot let go), and
the app can start again. A call that stop() cut off and that runs on (a
plain one on its thread, an async one ignoring its cancellation) must end
before a new start's calls begin; and a stop closes the spill files of the
transactions still open.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from typing import Any

import psycopg
from psycopg import sql
import pytest
from support import run, until

from walex import Event, Events, WalEx
from walex.pgoutput.messages import Insert

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item;
"""

_names = itertools.count(1)


def commit_lsn(event: Event) -> int:
    return int(event.id.split("-")[0], 16)


def slot_state(admin: psycopg.Connection, slot: str) -> tuple[int, bool]:
    row = admin.execute("SELECT confirmed_flush_lsn - '0/0', active FROM pg_replication_slots "
                        "WHERE slot_name = %s", [slot]).fetchone()
    assert row is not None, f"no slot {slot}"
    return int(row[0]), bool(row[1])


@pytest.mark.parametrize("where", ["handler", "function", "plain handler", "middleware"])
def test_stop_awaited_by_a_handler_call(admin: psycopg.Connection, dsn: str, where: str) -> None:
    """On main the stop waited shutdown_grace for the call awaiting it, cancelled its own
    task half-way and left the session open (slot active) and the app unstartable."""
    admin.execute(SCHEMA)
    handled: list[int] = []
    returned: list[int] = []
    app: WalEx
    events = Events()
    loop: asyncio.AbstractEventLoop
    options: dict[str, Any] = {}

    async def stop_on_two(event: Event) -> None:
        if event.new_record["id"] == 2:
            await app.stop()
            returned.append(2)

    if where == "handler":
        @events.on_insert("item")
        async def handler(items: list[Event]) -> None:
            handled.extend(e.new_record["id"] for e in items)
            await stop_on_two(items[0])
    elif where == "function":
        events.on_insert("item", functions=[stop_on_two])(
            lambda items: handled.extend(e.new_record["id"] for e in items))
    elif where == "middleware":
        events.on_insert("item")(lambda items: handled.extend(e.new_record["id"] for e in items))

        async def middleware(message: Any, owner: WalEx) -> None:
            if isinstance(message, Insert) and message.new.values[0] == b"3" and not returned:
                returned.append(2)  # the reader is cancelled by the stop: it goes no further
                await owner.stop()  # before the third transaction's row is handed on
            await owner.process_message(message)

        options["message_middleware"] = middleware
    else:
        @events.on_insert("item")
        def plain(items: list[Event]) -> None:
            handled.extend(e.new_record["id"] for e in items)
            if items[0].new_record["id"] == 2:
                asyncio.run_coroutine_threadsafe(app.stop(), loop).result(timeout=20)
                returned.append(2)

    async def main() -> None:
        nonlocal app, loop
        loop = asyncio.get_running_loop()
        app = WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events],
                    name=f"walex_stop_inside_{next(_names)}", durable_slot=True,
                    shutdown_grace=20, **options)
        await app.start()
        for i in (1, 2, 3):
            admin.execute("INSERT INTO item VALUES (%s)", [i])
        began = time.monotonic()
        await until(lambda: 2 in handled, "the second transaction")
        await asyncio.wait_for(app.wait(), 10)  # stopped, without an error
        assert time.monotonic() - began < 5, "the stop waited for the call that asked for it"
        assert returned == [2]  # the call went on and returned (a middleware: asked)
        assert handled == [1, 2]  # nothing after it
        assert not app._tasks
        deadline = time.monotonic() + 10
        while slot_state(admin, app.slot_name)[1]:  # the session closed: the slot let go
            assert time.monotonic() < deadline, "the slot is still active after the stop"
            await asyncio.sleep(0.05)
        # the second transaction was acknowledged: a restart delivers the third only
        await app.start()
        try:
            await until(lambda: 3 in handled, "the third transaction")
            await asyncio.sleep(0.3)
        finally:
            await app.stop()
        assert handled == [1, 2, 3]

    run(main(), timeout=90)


class Overlap:
    """How many calls of a handler ran at once, and in which order they began and ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.log: list[str] = []

    def enter(self, key: int) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.log.append(f"+{key}")

    def leave(self, key: int) -> None:
        with self.lock:
            self.running -= 1
            self.log.append(f"-{key}")


@pytest.mark.parametrize("kind", ["plain", "async ignoring cancellation"])
def test_start_after_a_cut_off_call_waits_for_it(admin: psycopg.Connection, dsn: str,
                                                 kind: str) -> None:
    """A handler call cut off by stop() (a plain one on its thread, an async one that
    ignores its cancellation for longer than stop() waits) still runs when the app starts
    again: on main the new handler calls ran beside it, the same transaction (not
    acknowledged, delivered again) handled twice at once; an async one's old dispatcher
    loop even went on taking batches beside the new one."""
    admin.execute(SCHEMA)
    overlap, events = Overlap(), Events()
    first = [True]
    hold = 3.0 if kind == "plain" else 12.0  # stop() waits 10 s for its tasks

    if kind == "plain":
        @events.on_insert("item")
        def plain(items: list[Event]) -> None:
            key = items[0].new_record["id"]
            overlap.enter(key)
            if first[0]:
                first[0] = False
                time.sleep(hold)
            else:
                time.sleep(0.05)
            overlap.leave(key)
    else:
        @events.on_insert("item")
        async def stubborn(items: list[Event]) -> None:
            key = items[0].new_record["id"]
            overlap.enter(key)
            if first[0]:
                first[0] = False
                began = time.monotonic()
                while time.monotonic() - began < hold:
                    try:
                        await asyncio.sleep(hold - (time.monotonic() - began))
                    except asyncio.CancelledError:
                        pass  # ignored
            else:
                await asyncio.sleep(0.05)
            overlap.leave(key)

    async def main() -> None:
        app = WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events],
                    name=f"walex_stop_inside_{next(_names)}", durable_slot=True,
                    shutdown_grace=0.5)
        await app.start()
        admin.execute("INSERT INTO item VALUES (1)")
        await until(lambda: overlap.running, "the first call")
        await app.stop()  # cuts the call off: transaction 1 is not acknowledged
        await app.start()
        try:
            for i in (2, 3, 4):
                admin.execute("INSERT INTO item VALUES (%s)", [i])
            await until(lambda: overlap.log.count("-4") == 1, "the fourth transaction",
                        timeout=hold + 20)
            await asyncio.sleep(0.3)
        finally:
            await app.stop()
        assert overlap.most == 1, overlap.log
        later = ["+2", "-2", "+3", "-3", "+4", "-4"]
        # the cut-off call returned before any other began; transaction 1 again (unless that
        # call's return was recorded), then each other once, in order
        assert overlap.log[:2] == ["+1", "-1"]
        assert overlap.log[2:] in (["+1", "-1"] + later, later)

    run(main(), timeout=120)


def _open_in(directory: str) -> list[str]:
    """The files in ``directory`` this process holds open (unlinked spill files included)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory + "/"):
            found.append(target)
    return found


def test_stop_closes_the_spill_of_a_transaction_still_streaming(admin: psycopg.Connection,
                                                                dsn: str, tmp_path: Any) -> None:
    """streaming=True, stop() while an open transaction is streamed and spilled: its spill
    file (unlinked, so its disk space is freed only once closed) stayed open on main for
    as long as the app object lived."""
    admin.execute(SCHEMA)
    admin.execute(sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(
        sql.Identifier(admin.info.dbname)))

    async def main() -> None:
        spill_dir = str(tmp_path)
        app = WalEx(dsn, publication="pub", subscriptions=["item"], streaming=True, batch_size=50,
                    spill_dir=spill_dir, name=f"walex_stop_inside_{next(_names)}")
        await app.start()
        try:
            with psycopg.connect(dsn) as writer:
                writer.execute("INSERT INTO item SELECT g FROM generate_series(1, 5000) g")
                await until(lambda: bool(_open_in(spill_dir)), "a spill file")
                await app.stop()
                assert _open_in(spill_dir) == []
                writer.rollback()
        finally:
            await app.stop()

    run(main())


def test_a_stop_while_start_waits_for_a_cut_off_call_returns_at_once(
        admin: psycopg.Connection, dsn: str) -> None:
    """start() waits for a plain call the last stop() cut off (still on its thread); a
    stop() meanwhile ends that wait at once (start() raises StoppedError) instead of
    waiting, as long as the stuck call runs, for the start to finish."""
    from walex import StoppedError

    admin.execute(SCHEMA)
    release = threading.Event()
    running = threading.Event()
    events = Events()

    @events.on_insert("item")
    def stuck(items: list[Event]) -> None:
        running.set()
        release.wait(60)

    async def main() -> None:
        app = WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events],
                    name=f"walex_stop_inside_{next(_names)}", durable_slot=True,
                    shutdown_grace=0.5)
        await app.start()
        admin.execute("INSERT INTO item VALUES (1)")
        await asyncio.get_running_loop().run_in_executor(None, running.wait, 30)
        await app.stop()  # cuts the call off; it runs on, on its thread
        starting = asyncio.ensure_future(app.start())
        await asyncio.sleep(0.5)  # start() waits for the stuck call
        assert not starting.done()
        began = time.monotonic()
        try:
            await asyncio.wait_for(app.stop(), 10)
            with pytest.raises(StoppedError, match="cut off"):
                await asyncio.wait_for(starting, 5)
        finally:
            release.set()
        assert time.monotonic() - began < 5

    run(main(), timeout=90)
