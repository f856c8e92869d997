"""With a destination window, plain handler calls are still handed over in runs.

Concern (:mod:`walex.handoff`, the windowed dispatcher): the transactions
taken together into a destination window (:meth:`Window.take`) that each go
to one plain handler are handed to the handlers' thread as one run of calls
(:meth:`walex.threads.Workers.run_handlers`), not one hand-off each; each is
still acknowledged only once its handler returned and Redis confirmed it, in
commit order. A call failing in the middle of a run stops the run there: the
calls before it count as handled (acknowledged once confirmed), the failing
one goes through the error policy (stopping the app unacknowledged, skipped,
dead-lettered), the later ones are called only if the policy lets the app go
on. Runs against a real PostgreSQL and the local Redis.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import psycopg
import pytest
from destinations.brokers import redis_stored
from support import queue_up, run, until
from window_support import commit_lsn, make_app, redelivered, stream_fixture, wait_confirmed

from walex import Event, Events, HandlerError, WalEx

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item;
"""


class Calls:
    """A plain handler: the row id, commit LSN, acknowledged position and handled count
    at each call. The first call waits for ``go``; the call of a row in ``fail_at``
    raises, once the lane has no unconfirmed transaction left (so that what the run
    finished before it is acknowledged the moment the run returns, not at Redis' pace)."""

    def __init__(self, box: list[WalEx], fail_at: set[int] | None = None) -> None:
        self.box = box
        self.started = threading.Event()
        self.go = threading.Event()
        self.seen: list[tuple[int, int, int, int]] = []
        self.fail_at = set(fail_at or ())

    def __call__(self, items: list[Event]) -> None:
        if not self.seen:
            self.started.set()
            assert self.go.wait(30), "the test never released the first call"
        app = self.box[0]
        event = items[0]
        row = event.new_record["id"]
        self.seen.append((row, commit_lsn(event), app.ack.flushed, app.transactions_handled))
        if row in self.fail_at:
            self.fail_at.discard(row)
            wait_confirmed(app, "Redis never confirmed the run")
            raise RuntimeError(f"handler fails on row {row}")

    def ids(self) -> list[int]:
        return [s[0] for s in self.seen]


class HandOffs:
    """Counts the hand-offs to the handlers' thread through the Workers API: runs
    (``run_handlers``, with their sizes) and single calls (``run_handler``)."""

    def __init__(self, app: WalEx) -> None:
        self.runs: list[int] = []
        self.singles = 0
        workers = app.dispatcher.workers
        run_handlers, run_handler = workers.run_handlers, workers.run_handler

        async def counted_run(calls: list[Any], var: Any, stopping: Any) -> Any:
            self.runs.append(len(calls))
            return await run_handlers(calls, var, stopping)

        async def counted_one(func: Any, arg: Any) -> Any:
            self.singles += 1
            return await run_handler(func, arg)

        workers.run_handlers = counted_run  # type: ignore[method-assign]
        workers.run_handler = counted_one  # type: ignore[method-assign]

    @property
    def total(self) -> int:
        return len(self.runs) + self.singles


stream = stream_fixture("hw")


def test_plain_calls_taken_into_the_window_go_to_the_thread_as_one_run(
    admin: psycopg.Connection, dsn: str, stream: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box)
    events = Events()
    events.on_insert("item")(calls)

    async def main() -> HandOffs:
        app = make_app(dsn, events, stream)
        box.append(app)
        handoffs = HandOffs(app)
        async with app:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            await until(lambda: app.transactions_handled == 12, "12 transactions handled")
            last = calls.seen[-1][1]
            await until(lambda: app.ack.flushed > last, "the last one acknowledged")
        return handoffs

    handoffs = run(main())
    assert calls.ids() == list(range(1, 13))
    # row 1 alone, then rows 2..12, queued while it waited and taken together: one run
    assert handoffs.runs == [1, 11] and handoffs.singles == 0, (handoffs.runs, handoffs.singles)
    for _row, lsn, flushed, _handled in calls.seen:  # not acknowledged before its handler ran
        assert flushed < lsn
    # a run's calls are recorded after it: none of rows 2..12 saw another of them recorded
    assert {s[3] for s in calls.seen[1:]} <= {0, 1}, calls.seen
    stored = asyncio.run(redis_stored(f"{stream}:*"))
    assert [doc["data"]["new_record"]["id"] for _id, doc, _x in stored] == list(range(1, 13))


def test_a_plain_call_failing_in_a_run_under_stop_acknowledges_exactly_those_before_it(
    admin: psycopg.Connection, dsn: str, stream: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box, fail_at={6})
    events = Events()
    events.on_insert("item")(calls)
    slot = f"hw_stop_{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[HandOffs, list[int]]:
        app = make_app(dsn, events, stream, durable_slot=True, slot_name=slot, max_retries=0)
        box.append(app)
        handoffs = HandOffs(app)
        await app.start()
        try:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            with pytest.raises(HandlerError, match="handler fails on row 6"):
                await asyncio.wait_for(app.wait(), 30)
        finally:
            await app.stop()
        assert calls.ids() == [1, 2, 3, 4, 5, 6]  # none after the failing call
        fifth, sixth = calls.seen[4][1], calls.seen[5][1]
        assert app.transactions_handled == 5
        assert fifth < app.ack.flushed < sixth  # the five before it acknowledged, not it
        # a restart delivers again from the failing transaction on, not before it
        again = await redelivered(dsn, stream, slot, 7, "rows 6..12 delivered again")
        return handoffs, again

    handoffs, again = run(main())
    assert handoffs.runs == [1, 11] and handoffs.singles == 0, (handoffs.runs, handoffs.singles)
    assert again == list(range(6, 13))


@pytest.mark.parametrize("policy", ["skip", "dead_letter"])
def test_after_a_plain_call_failing_in_a_run_the_policy_lets_the_later_ones_go_on_in_order(
    admin: psycopg.Connection, dsn: str, stream: str, policy: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box, fail_at={4, 9})
    events = Events()
    events.on_insert("item")(calls)
    dead: list[list[int]] = []

    def dead_letter(items: list[Event], exc: BaseException) -> None:
        dead.append([e.new_record["id"] for e in items])

    async def main() -> HandOffs:
        app = make_app(dsn, events, stream, max_retries=0,
                       on_error="skip" if policy == "skip" else dead_letter)
        box.append(app)
        handoffs = HandOffs(app)
        async with app:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            await until(lambda: app.transactions_handled == 12, "12 transactions handled")
            last = calls.seen[-1][1]
            await until(lambda: app.ack.flushed > last, "the last one acknowledged")
            assert app.dispatcher.failures == 2
        return handoffs

    handoffs = run(main())
    assert calls.ids() == list(range(1, 13))
    # row 1; rows 2..12 as a run cut by each failure: [2, 3, 4], [5..9], [10, 11, 12]
    assert handoffs.runs == [1, 11, 8, 3], handoffs.runs
    assert handoffs.singles == (2 if policy == "dead_letter" else 0)  # the dead letters
    assert dead == ([[4], [9]] if policy == "dead_letter" else [])
    for _row, lsn, flushed, _handled in calls.seen:
        assert flushed < lsn
    stored = asyncio.run(redis_stored(f"{stream}:*"))
    assert [doc["data"]["new_record"]["id"] for _id, doc, _x in stored] == list(range(1, 13))


def test_stop_during_a_run_in_the_window_lets_only_the_call_in_hand_finish(
    admin: psycopg.Connection, dsn: str, stream: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    calls = Calls(box)
    second = threading.Event()
    release = threading.Event()
    events = Events()

    def handler(items: list[Event]) -> None:
        calls(items)
        if len(calls.seen) == 2:  # row 2, the first call of the run of rows 2..12
            second.set()
            assert release.wait(30)
    events.on_insert("item")(handler)
    slot = f"hw_close_{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[HandOffs, list[int]]:
        app = make_app(dsn, events, stream, durable_slot=True, slot_name=slot)
        box.append(app)
        handoffs = HandOffs(app)
        await app.start()
        try:
            await queue_up(admin, app, calls, 12)
            calls.go.set()
            await until(second.is_set, "row 2 in hand")
            stopping = asyncio.ensure_future(app.stop())
            await until(lambda: app.pipeline.closing, "stop() begun")
            release.set()
            await asyncio.wait_for(stopping, 30)
        finally:
            release.set()
            await app.stop()
        assert calls.ids() == [1, 2]
        assert app.transactions_handled == 2
        again = await redelivered(dsn, stream, slot, 10, "rows 3..12 delivered again")
        return handoffs, again

    handoffs, again = run(main())
    # rows 2..12 handed over as one run; it stopped after the call in hand
    assert handoffs.runs == [1, 11] and handoffs.singles == 0, (handoffs.runs, handoffs.singles)
    assert again == list(range(3, 13))  # given back, unacknowledged: delivered again
