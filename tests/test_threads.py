"""Where plain (non-async) code runs: one dedicated thread per app for handlers, a pool for functions.

Concern: an app's plain handlers run one at a time, in order, on one thread of
that app (so a thread-bound resource such as a sqlite3 connection made by a
handler keeps working across calls); its plain per-event functions run on a
pool of ``function_concurrency`` threads; the threads end when the app
stops, and a restarted app gets new ones.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import threading
import time
from typing import Any

import psycopg
from support import run, until

from walex import Event, Events, WalEx

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item;
"""

_names = itertools.count(1)


def make_app(dsn: str, events: Events, **options: Any) -> WalEx:
    options.setdefault("name", f"walex_threads_{next(_names)}")
    return WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events], **options)


def app_threads(app: WalEx) -> list[str]:
    prefix = f"walex-{app.settings.name}-"
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_plain_handlers_share_one_thread_so_a_sqlite_connection_keeps_working(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    db: list[sqlite3.Connection] = []  # made by the first call, used by every later one
    threads: list[str] = []
    rows: list[tuple[str, int]] = []
    events = Events()

    def record(label: str, items: list[Event]) -> None:
        threads.append(threading.current_thread().name)
        if not db:
            db.append(sqlite3.connect(":memory:"))
            db[0].execute("CREATE TABLE seen (label text, id int)")
        time.sleep(0.1)  # both handlers of a transaction are in flight at once
        db[0].executemany("INSERT INTO seen VALUES (?, ?)", [(label, e.new_record["id"]) for e in items])
        rows[:] = db[0].execute("SELECT label, id FROM seen ORDER BY id, label").fetchall()

    @events.on_insert("item")
    def first(items: list[Event]) -> None:
        record("first", items)

    @events.on_insert("item")
    def second(items: list[Event]) -> None:
        record("second", items)

    async def main() -> WalEx:
        app = make_app(dsn, events, max_retries=0)
        async with app:
            for i in range(1, 4):
                admin.execute("INSERT INTO item VALUES (%s)", [i])
            await until(lambda: app.transactions_handled == 3, "3 transactions")
        return app

    app = run(main())
    assert rows == [("first", 1), ("second", 1), ("first", 2), ("second", 2), ("first", 3), ("second", 3)]
    assert len(set(threads)) == 1 and threads[0].startswith(f"walex-{app.settings.name}-handlers")


def test_threads_end_when_the_app_stops_and_a_restart_gets_new_ones(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    handled: list[tuple[int, str]] = []
    events = Events()

    def function(event: Event) -> None:
        handled.append((event.new_record["id"], threading.current_thread().name))

    @events.on_insert("item", functions=[function])
    def handler(items: list[Event]) -> None:
        handled.extend((e.new_record["id"], threading.current_thread().name) for e in items)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True)
        for i in (1, 2):
            async with app:
                admin.execute("INSERT INTO item VALUES (%s)", [i])
                await until(lambda: app.transactions_handled == i, f"transaction {i}")
                assert len(app_threads(app)) == 2  # the handler thread and one function thread
            await until(lambda: not app_threads(app), "no thread of the app left", timeout=5)
        name = app.settings.name
        assert sorted(handled) == [
            (1, f"walex-{name}-functions_0"), (1, f"walex-{name}-handlers_0"),
            (2, f"walex-{name}-functions_0"), (2, f"walex-{name}-handlers_0"),
        ]

    run(main())


def test_a_plain_dead_letter_handler_runs_on_the_handler_thread(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    threads: list[str] = []
    events = Events()

    @events.on_insert("item")
    async def broken(items: list[Event]) -> None:
        raise ValueError("broken")

    def dead_letter(items: list[Event], exc: BaseException) -> None:
        threads.append(threading.current_thread().name)

    async def main() -> WalEx:
        app = make_app(dsn, events, on_error=dead_letter, max_retries=0)
        async with app:
            admin.execute("INSERT INTO item VALUES (1)")
            await until(lambda: app.transactions_handled == 1, "the transaction")
            await asyncio.sleep(0)
        return app

    app = run(main())
    assert [t.rpartition("_")[0] for t in threads] == [f"walex-{app.settings.name}-handlers"]


def test_function_pool_follows_a_runtime_change_of_function_concurrency(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    lock = threading.Lock()
    running = [0]
    peaks: list[int] = []  # the most calls running at once, per transaction
    events = Events()

    def function(event: Event) -> None:
        with lock:
            running[0] += 1
            peaks[-1] = max(peaks[-1], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1

    events.on_insert("item", functions=[function])(lambda items: None)
    more = min(32, (os.cpu_count() or 1) + 4) + 2  # beyond the default thread pool's size

    async def main() -> None:
        app = make_app(dsn, events, function_concurrency=2)
        async with app:
            for n, (first, last) in enumerate([(1, more), (more + 1, 2 * more)], 1):
                peaks.append(0)
                admin.execute("INSERT INTO item SELECT generate_series(%s::int, %s::int)", [first, last])
                await until(lambda: app.transactions_handled == n, f"transaction {n}")
                app.config.replace("function_concurrency", more)
        assert peaks == [2, more]

    run(main())
