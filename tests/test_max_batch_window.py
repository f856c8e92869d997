"""``max_batch`` with a destination window: the transactions taken together share calls.

Concern (:mod:`walex.handoff`, the windowed ``max_batch`` loop): the
transactions taken into the window at once (:meth:`Window.take`) are in hand
together, so a ``max_batch`` handler gets their events in calls of up to
``max_batch`` events, as it does for the transactions queued without a
window; each is acknowledged once every call holding its events returned and
Redis confirmed it, in commit order. The encoded messages a window holds are
bounded (``held_bytes``, a quarter of ``max_pending_bytes``): the kept events
are handed over before the loop waits for room, so the calls are made and
the window drains instead of waiting for itself. Runs against a real
PostgreSQL and the local Redis.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import psycopg
import pytest
from destinations.brokers import redis_stored
from support import release_a_full_queue, run, until
from window_support import commit_lsn, make_app, redelivered, stream_fixture, wait_confirmed

from walex import Event, Events, HandlerError, WalEx

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, pad text);
CREATE PUBLICATION pub FOR TABLE item;
"""

PAD = 4000  # characters a row: ~4 kB encoded
PENDING = 64 * 1024  # max_pending_bytes: a window holding 16 kB of encoded messages


class Batches:
    """The calls a plain handler got: row ids, commit LSNs, the acknowledged position. The
    first call waits for ``go``; a call holding a row of ``fail_at`` raises once."""

    def __init__(self, box: list[WalEx], fail_at: set[int] | None = None,
                 confirmed_first: bool = False) -> None:
        self.box = box
        self.confirmed_first = confirmed_first
        self.started = threading.Event()
        self.go = threading.Event()
        self.calls: list[tuple[list[int], list[int], int]] = []
        self.fail_at = set(fail_at or ())

    def __call__(self, items: list[Event]) -> None:
        if not self.calls:
            self.started.set()
            assert self.go.wait(30), "the test never released the first call"
        rows = [e.new_record["id"] for e in items]
        self.calls.append((rows, [commit_lsn(e) for e in items], self.box[0].ack.flushed))
        failing = self.fail_at & set(rows)
        if failing:
            self.fail_at -= failing
            if self.confirmed_first:  # what the calls before finished is recorded at once
                wait_confirmed(self.box[0], "Redis never confirmed them")
            raise RuntimeError(f"batch handler fails on the batch from row {rows[0]}")

    def rows(self) -> list[list[int]]:
        return [c[0] for c in self.calls]


async def queue_up(admin: psycopg.Connection, batches: Batches, rows: int) -> None:
    """Row 1 alone, then rows 2..``rows`` of ``PAD`` characters, one transaction each, while
    the first call waits (the byte budget holds the reader back after a few)."""
    admin.execute("INSERT INTO item VALUES (1, '')")
    await until(batches.started.is_set, "the first call")
    for i in range(2, rows + 1):
        admin.execute("INSERT INTO item VALUES (%s, repeat('x', %s))", [i, PAD])
    await asyncio.sleep(0.5)  # the reader queues what the budget lets in


stream = stream_fixture("mbw")


def test_transactions_taken_together_share_calls_beyond_the_bytes_the_window_holds(
    admin: psycopg.Connection, dsn: str, stream: str
) -> None:
    """30 transactions of ~4 kB against a window holding 16 kB of encoded messages
    (``max_pending_bytes`` 64 kB): the kept events are handed over whenever the window
    is full that way, in calls of several transactions, and the window drains."""
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    events.on_insert("item", max_batch=10)(batches)
    rows = 31

    async def main() -> None:
        app = make_app(dsn, events, stream, max_pending_bytes=PENDING)
        box.append(app)
        async with app:
            await queue_up(admin, batches, rows)
            batches.go.set()
            await until(lambda: app.transactions_handled == rows, f"{rows} transactions handled",
                        timeout=30)
            last = batches.calls[-1][1][-1]
            await until(lambda: app.ack.flushed > last, "the last one acknowledged")

    run(main())
    calls = batches.rows()
    assert [row for call in calls for row in call] == list(range(1, rows + 1))
    assert calls[0] == [1] and all(len(call) <= 10 for call in calls)
    # several transactions a call (one alone only when the reader fell behind)
    assert len(calls) < rows - 1 and max(map(len, calls)) >= 3, calls
    for _rows, lsns, flushed in batches.calls:  # not acknowledged before its call
        assert flushed < lsns[0]
    stored = asyncio.run(redis_stored(f"{stream}:*"))
    assert [doc["data"]["new_record"]["id"] for _id, doc, _x in stored] == list(range(1, rows + 1))


def test_a_failing_batch_under_stop_acknowledges_exactly_the_calls_before_it(
    admin: psycopg.Connection, dsn: str, stream: str
) -> None:
    """The call holding row 12 fails under "stop" (once Redis confirmed everything taken):
    the transactions of the calls before it are acknowledged, none of its own; a restart
    delivers again from its first transaction on."""
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box, fail_at={12}, confirmed_first=True)
    events = Events()
    events.on_insert("item", max_batch=10)(batches)
    slot = f"mbw_stop_{uuid.uuid4().hex[:8]}"
    rows = 31

    async def main() -> tuple[list[list[int]], list[int], list[int]]:
        app = make_app(dsn, events, stream, durable_slot=True, slot_name=slot, max_retries=0,
                       max_pending_bytes=PENDING)
        box.append(app)
        await app.start()
        try:
            await queue_up(admin, batches, rows)
            batches.go.set()
            with pytest.raises(HandlerError, match="batch handler fails"):
                await asyncio.wait_for(app.wait(), 30)
        finally:
            await app.stop()
        calls = batches.rows()
        failed = next(i for i, call in enumerate(calls) if 12 in call)
        before = [row for call in calls[:failed] for row in call]
        assert before == list(range(1, calls[failed][0]))
        assert app.transactions_handled == len(before)
        assert batches.calls[failed - 1][1][-1] < app.ack.flushed < batches.calls[failed][1][0]
        again = await redelivered(dsn, stream, slot, rows - len(before),
                                  "the rest delivered again")
        return calls, before, again

    calls, before, again = run(main())
    assert again == list(range(len(before) + 1, rows + 1)), (calls, again)


def test_a_call_can_hold_more_transactions_than_the_queue(
    admin: psycopg.Connection, dsn: str, stream: str
) -> None:
    """The batches taken are in hand, not queued: the reader, held up by a full queue, is
    let in before the kept events are handed over, so one call is not capped by
    ``max_pending_transactions`` (8 here)."""
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    events.on_insert("item", max_batch=100)(batches)

    async def main() -> None:
        app = make_app(dsn, events, stream, max_pending_transactions=8)
        box.append(app)
        async with app:
            await release_a_full_queue(admin, app, batches, "INSERT INTO item VALUES (%s, '')", 201, 8)

    run(main())
    sizes = [len(rows) for rows in batches.rows()]
    assert [r for rows in batches.rows() for r in rows] == list(range(1, 202))
    assert max(sizes) <= 100 and max(sizes) > 8, sizes
    for _rows, lsns, flushed in batches.calls:
        assert flushed < lsns[0]
