"""A relay with a handler on one table: the transactions no handler wants.

Concern (:mod:`walex.windowed`, :meth:`walex.dispatch.Dispatcher.plan`): with a
destination window, the usual relay has a handler on some tables and relays
every table. The batches taken that no handler wants (a plan of nothing to
call: :meth:`Dispatcher.plan` knows a table no handler takes without asking
the handlers again) are done for the handlers together, between the calls of
the others. The handler still gets exactly its events (its filters asked about
those only), every transaction is published and acknowledged in commit order,
none before the handler call of an earlier one returned, and a handler
registered while the relay streams, on a table no handler took until then,
gets every later transaction, each acknowledged only after its call. Runs
against a real PostgreSQL and the local Redis.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import psycopg
from destinations.brokers import redis_stored
from support import run, until
from window_support import commit_lsn, stream_fixture

from walex import Event, Events, WalEx

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, v int DEFAULT 0);
CREATE TABLE mark (id int PRIMARY KEY, v int DEFAULT 0);
CREATE PUBLICATION pub FOR TABLE item, mark;
"""

stream = stream_fixture("wr")
_names = itertools.count(1)


def relay(dsn: str, events: Events, stream: str) -> WalEx:
    """An app with ``events`` relaying tables ``item`` and ``mark`` to ``<stream>:<table>``
    on the local Redis through a window of 64."""
    return WalEx(dsn, publication="pub", subscriptions=["item", "mark"], modules=[events],
                 name=f"walex_wrelay_{next(_names)}", status_interval=0.2,
                 destinations=[f"redis://127.0.0.1:6379/0?stream={stream}:{{table}}&timeout=5"],
                 destination_window=64)


def stored(stream: str) -> dict[str, list[tuple[str, int, int]]]:
    """Each table's stream on Redis: (type, id, commit LSN) in stream order."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for event_id, doc, (key, _entry) in asyncio.run(redis_stored(f"{stream}:*")):
        row = doc["data"]["new_record"] or doc["data"]["old_record"]
        out.setdefault(key.rsplit(":", 1)[1], []).append(
            (doc["type"].rsplit(".", 1)[1], row["id"], int(event_id.split("-")[0], 16)))
    return out


def test_a_handler_on_one_table_gets_its_events_and_the_others_go_on_in_order(
        admin: psycopg.Connection, dsn: str, stream: str) -> None:
    """First an update of ``mark`` (a type the handler does not take, seen before any insert
    of that table). Then row ``mark`` 0's call waits while every other transaction is queued
    behind it, so that they are taken together: runs of transactions of ``item`` (one row,
    several rows, an update), an update of ``mark`` and transactions with a ``mark`` insert
    (one beside rows of ``item``) between them."""
    admin.execute(SCHEMA)
    admin.execute("INSERT INTO mark VALUES (100)")  # before the slot: not streamed
    module = Events()
    box: list[WalEx] = []
    asked: list[tuple[str, str]] = []  # what the handler's filter was asked about
    calls: list[tuple[list[tuple[str, str, int]], int, int]] = []  # events, commit, flushed
    go, started = asyncio.Event(), asyncio.Event()

    def keep(event: Event) -> bool:
        asked.append((event.source.table, event.type.value))
        return True

    @module.on_insert("mark", where=keep)
    async def handler(events: list[Event]) -> None:
        app = box[0]
        calls.append(([(e.source.table, e.type.value, e.new_record["id"]) for e in events],
                      commit_lsn(events[0]), app.ack.flushed))
        if len(calls) == 1:
            started.set()
            await go.wait()
        elif len(calls) == 2:  # the 14 transactions before it were done for the handlers
            await until(lambda: app.transactions_handled >= 14,  # before the call: recorded
                        "the transactions before mark 1 acknowledged")  # once confirmed
            assert app.transactions_handled == 14  # not the later ones
            calls[1] = (*calls[1][:2], app.ack.flushed)

    async def main() -> WalEx:
        app = relay(dsn, module, stream)
        box.append(app)
        async with app:
            admin.execute("UPDATE mark SET v = 1 WHERE id = 100")
            await until(lambda: app.transactions_handled == 1, "the update relayed")
            admin.execute("INSERT INTO mark VALUES (0)")
            await asyncio.wait_for(started.wait(), 15)
            for i in range(1, 11):
                admin.execute("INSERT INTO item VALUES (%s)", [i])
            admin.execute("UPDATE mark SET v = 1 WHERE id = 0")
            with admin.transaction():
                for i in range(11, 14):
                    admin.execute("INSERT INTO item VALUES (%s)", [i])
                admin.execute("UPDATE item SET v = 1 WHERE id = 1")
            with admin.transaction():
                admin.execute("INSERT INTO item VALUES (14)")
                admin.execute("INSERT INTO mark VALUES (1)")
                admin.execute("INSERT INTO item VALUES (15)")
            for i in range(16, 21):
                admin.execute("INSERT INTO item VALUES (%s)", [i])
            admin.execute("INSERT INTO mark VALUES (2)")
            for i in range(21, 26):
                admin.execute("INSERT INTO item VALUES (%s)", [i])
            end = int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])
            await until(lambda: app.ack.received >= end, "every transaction received")
            await until(lambda: app.pipeline.queue.qsize() >= 24, "queued behind mark 0")
            assert app.transactions_handled == 1
            go.set()
            await until(lambda: app.transactions_handled == 26, "26 transactions handled")
            await until(lambda: app.ack.flushed >= app.ack.received, "all acknowledged")
        return app

    app = run(main())
    assert [c[0] for c in calls] == [[("mark", "insert", 0)], [("mark", "insert", 1)],
                                     [("mark", "insert", 2)]]
    assert asked == [("mark", "insert")] * 3  # the filter ran on the handler's events only
    for _events, commit, flushed in calls:  # none acknowledged before its call
        assert flushed < commit
    streams = stored(stream)
    items = streams["item"]
    assert [(kind, i) for kind, i, _c in items] == (
        [("insert", i) for i in range(1, 14)] + [("update", 1)]
        + [("insert", i) for i in range(14, 26)])
    assert [(kind, i) for kind, i, _c in streams["mark"]] == [
        ("update", 100), ("insert", 0), ("update", 0), ("insert", 1), ("insert", 2)]
    commits = sorted({c for _k, _i, c in items + streams["mark"]})
    assert len(commits) == 26 and [c for _k, _i, c in items] == sorted(c for _k, _i, c in items)
    assert app.destinations.events_published == 31 and app.pipeline.events_handled == 31


def test_a_handler_registered_while_it_streams_on_a_table_no_handler_took(
        admin: psycopg.Connection, dsn: str, stream: str) -> None:
    """A relay whose one handler takes ``mark``: the transactions of ``item`` are relayed with
    no call. A handler on ``item`` registered while it streams gets every transaction
    committed after that, each acknowledged only once that call returned; the one on
    ``mark`` still gets its own."""
    admin.execute(SCHEMA)
    module = Events()
    marks: list[int] = []
    seen: list[tuple[int, int, int]] = []  # (id, commit LSN, acknowledged when called)

    @module.on_insert("mark")
    async def on_mark(events: list[Event]) -> None:
        marks.extend(e.new_record["id"] for e in events)

    async def main() -> WalEx:
        app = relay(dsn, module, stream)
        async with app:
            for i in range(30):
                admin.execute("INSERT INTO item VALUES (%s)", [i])
            admin.execute("INSERT INTO mark VALUES (0)")
            await until(lambda: app.transactions_handled == 31, "31 transactions relayed")

            @module.on_event("item")
            async def on_item(events: list[Event]) -> Any:
                for e in events:
                    seen.append((e.new_record["id"], commit_lsn(e), app.ack.flushed))

            for i in range(30, 60):
                admin.execute("INSERT INTO item VALUES (%s)", [i])
            admin.execute("INSERT INTO mark VALUES (1)")
            await until(lambda: app.transactions_handled == 62, "62 transactions")
            await until(lambda: app.ack.flushed >= app.ack.received, "all acknowledged")
        return app

    app = run(main())
    assert marks == [0, 1]
    assert [i for i, _c, _f in seen] == list(range(30, 60))
    assert all(flushed < commit for _i, commit, flushed in seen)  # none acknowledged before
    items = stored(stream)["item"]
    assert [i for _k, i, _c in items] == list(range(60))
    assert app.destinations.events_published == 62
