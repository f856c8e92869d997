"""Transactions queued for the handlers are handed over in runs, not one wake-up each.

Concern (:mod:`walex.handoff`): when several committed transactions are
queued, the dispatcher takes them all in one wake-up, and those that each go
to one plain handler are handed to the handlers' thread as one run of calls;
still, each transaction is acknowledged only after its handler returned, in
commit order. A call failing in the middle of a run stops the run there: the
calls before it count as handled, the failing one goes through the error
policy (retried, skipped, or stopping the app unacknowledged), the later ones
are called only if the policy lets the app go on. ``stop()`` lets only the
call in hand finish.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import psycopg
import pytest
from support import queue_up, run, until

from walex import Event, Events, HandlerError, WalEx

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item;
"""

_names = itertools.count(1)


def make_app(dsn: str, events: Events, **options: Any) -> WalEx:
    options.setdefault("name", f"walex_handoff_{next(_names)}")
    return WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events], **options)


def commit_lsn(event: Event) -> int:
    return int(event.id.split("-")[0], 16)


def current_lsn(admin: psycopg.Connection) -> int:
    return int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])  # type: ignore[index]


class Calls:
    """What a handler saw at each call: the row ids, the acknowledged position, and how
    many transactions the app had recorded handled. The first call waits for ``go``."""

    def __init__(self, app_box: list[WalEx], fail_at: dict[int, int] | None = None) -> None:
        self.app_box = app_box
        self.started = threading.Event()  # the first call began
        self.go = threading.Event()
        self.seen: list[tuple[int, int, int, int]] = []  # (id, commit lsn, flushed, handled)
        self.fail_at = dict(fail_at or {})  # row id -> how many times its call raises

    def __call__(self, items: list[Event]) -> None:
        if not self.seen:
            self.started.set()
            assert self.go.wait(30), "the test never released the first call"
        app = self.app_box[0]
        event = items[0]
        row = event.new_record["id"]
        self.seen.append((row, commit_lsn(event), app.ack.flushed, app.transactions_handled))
        if self.fail_at.get(row, 0) > 0:
            self.fail_at[row] -= 1
            raise RuntimeError(f"handler fails on row {row}")

    def ids(self) -> list[int]:
        return [s[0] for s in self.seen]


@pytest.mark.parametrize("plain", [False, True], ids=["async", "plain"])
def test_queued_transactions_are_each_acknowledged_only_after_their_handler(
    admin: psycopg.Connection, dsn: str, plain: bool
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box)
    events = Events()
    if plain:
        events.on_insert("item")(calls)
    else:
        async def handler(items: list[Event]) -> None:
            if not calls.seen:
                calls.started.set()
                await until(calls.go.is_set, "the test releasing the first call", timeout=30)
            calls(items)
        events.on_insert("item")(handler)

    async def main() -> None:
        app = make_app(dsn, events, status_interval=0.2)
        box.append(app)
        async with app:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            await until(lambda: app.transactions_handled == 12, "12 transactions handled")
            last = calls.seen[-1][1]
            await until(lambda: app.ack.flushed > last, "the last one acknowledged")

    run(main())
    assert calls.ids() == list(range(1, 13))
    for _row, lsn, flushed, _handled in calls.seen:  # not acknowledged before its handler ran
        assert flushed < lsn
    flushed_seen = [s[2] for s in calls.seen]
    assert flushed_seen == sorted(flushed_seen)


@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "with-metrics"])
def test_plain_handler_calls_of_queued_transactions_go_to_its_thread_as_one_run(
    admin: psycopg.Connection, dsn: str, metrics: bool
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box)
    events = Events()
    events.on_insert("item")(calls)

    async def main() -> None:
        # metrics (without tracing) count through hooks and keep the runs
        app = make_app(dsn, events, **({"metrics_port": 0} if metrics else {}))
        box.append(app)
        async with app:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            await until(lambda: app.transactions_handled == 12, "12 transactions handled")
            if metrics:  # every transaction counted once, with its latency
                stats = app.pipeline.stats
                assert sum(stats.events.values()) == 12
                assert sum(stats.commit_to_handler.counts) == 12

    run(main())
    assert calls.ids() == list(range(1, 13))
    # Calls 2 to 12, queued while the first one waited, came as one run: the loop
    # recorded none of them handled before the run ended. One call at a time, each
    # call would see every earlier one recorded.
    assert [s[3] for s in calls.seen] == [0] + [1] * 11, calls.seen


def test_a_plain_call_failing_in_a_run_stops_there_unacknowledged(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box, fail_at={6: 1})
    events = Events()
    events.on_insert("item")(calls)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, status_interval=0.2, max_retries=0)
        box.append(app)
        await app.start()
        try:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            with pytest.raises(HandlerError, match="handler fails on row 6"):
                await asyncio.wait_for(app.wait(), 30)
        finally:
            await app.stop()
        assert calls.ids() == [1, 2, 3, 4, 5, 6]  # none after the failing call
        assert [s[3] for s in calls.seen] == [0] + [1] * 5  # the failure came inside a run
        fifth, sixth = calls.seen[4][1], calls.seen[5][1]
        assert app.transactions_handled == 5
        assert fifth < app.ack.flushed < sixth  # the five before it acknowledged, not it

    run(main())


@pytest.mark.parametrize("policy", ["skip", "retry"])
def test_after_a_call_failing_in_a_run_the_policy_lets_the_later_ones_go_on_in_order(
    admin: psycopg.Connection, dsn: str, policy: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box, fail_at={4: 1, 9: 1})
    events = Events()
    events.on_insert("item")(calls)
    options: dict[str, Any] = {"on_error": "skip", "max_retries": 0} if policy == "skip" else {
        "max_retries": 1, "retry_backoff": 0.01}

    async def main() -> None:
        app = make_app(dsn, events, **options)
        box.append(app)
        async with app:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            await until(lambda: app.transactions_handled == 12, "12 transactions handled")
            assert app.dispatcher.failures == (2 if policy == "skip" else 0)
            assert app.dispatcher.retries == (0 if policy == "skip" else 2)

    run(main())
    expected = list(range(1, 13))
    if policy == "retry":  # the failing calls made again, before the later ones
        expected = [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12]
    assert calls.ids() == expected


def test_stop_during_a_run_lets_only_the_call_in_hand_finish(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box)
    events = Events()
    events.on_insert("item")(calls)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True)
        box.append(app)
        await app.start()
        await queue_up(admin, app, calls, 12)
        stopping = asyncio.ensure_future(app.stop())
        await until(lambda: app.pipeline.closing, "stop() begun")
        calls.go.set()
        await asyncio.wait_for(stopping, 30)
        assert calls.ids() == [1]
        assert app.transactions_handled == 1

    run(main())


def test_metrics_count_each_transaction_once_when_a_plain_run_stops_short(
    admin: psycopg.Connection, dsn: str
) -> None:
    """A run cut by a failing call leaves transactions it had counted at the queue's
    front, some for no handler at all: each is still counted once."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY);"
                  "CREATE PUBLICATION pub FOR TABLE item, other")
    box: list[WalEx] = []
    calls = Calls(box, fail_at={3: 1})
    events = Events()
    events.on_insert("item")(calls)

    async def main() -> None:
        app = WalEx(dsn, publication="pub", subscriptions=["item", "other"], modules=[events],
                    name=f"walex_handoff_{next(_names)}", metrics_port=0, max_retries=1,
                    retry_backoff=0.01)
        box.append(app)
        async with app:
            admin.execute("INSERT INTO item VALUES (1)")
            await until(calls.started.is_set, "the first call")
            for i in range(2, 7):  # item i, then a transaction no handler takes
                admin.execute("INSERT INTO item VALUES (%s)", [i])
                admin.execute("INSERT INTO other VALUES (%s)", [i])
            end = current_lsn(admin)
            await until(lambda: app.ack.received >= end, "every transaction received")
            calls.go.set()
            await until(lambda: app.transactions_handled == 11, "11 transactions handled")
            stats = app.pipeline.stats
            assert sum(stats.commit_to_handler.counts) == 11
            assert stats.events[("public", "item", "insert")] == 6
            assert stats.events[("public", "other", "insert")] == 5

    run(main())
    assert calls.ids() == [1, 2, 3, 3, 4, 5, 6]
