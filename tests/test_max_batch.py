"""``max_batch``: a handler gets the events of several queued transactions per call.

Concern (:mod:`walex.handlers`, :mod:`walex.dispatch`, :mod:`walex.handoff`):
off by default (one call per table per transaction); with ``max_batch=N`` the
events of the transactions queued while the handler was busy come in calls of
at most ``N`` events, in WAL order, and each of those transactions is
acknowledged only after every call holding its events returned. A failing
batch acknowledges none of its transactions under "stop" (they are delivered
again, same ids, after a restart); other policies settle the whole call.
Nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import psycopg
import pytest
from support import queue_up, release_a_full_queue, run, until

from walex import ConfigError, Event, Events, HandlerError, WalEx

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item;
"""

_names = itertools.count(1)


def make_app(dsn: str, events: Events, **options: Any) -> WalEx:
    options.setdefault("name", f"walex_max_batch_{next(_names)}")
    options.setdefault("status_interval", 0.2)
    return WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events], **options)


def commit_lsn(event: Event) -> int:
    return int(event.id.split("-")[0], 16)


class Batches:
    """The calls a handler got: row ids, commit LSNs, the acknowledged position at the
    call. The first call waits for ``go``; a call whose first row is in ``fail_first``
    raises (once per listed time)."""

    def __init__(self, box: list[WalEx], fail_first: dict[int, int] | None = None) -> None:
        self.box = box
        self.started = threading.Event()
        self.go = threading.Event()
        self.calls: list[tuple[list[int], list[int], int]] = []
        self.fail_first = dict(fail_first or {})

    def __call__(self, items: list[Event]) -> None:
        if not self.calls:
            self.started.set()
            assert self.go.wait(30), "the test never released the first call"
        rows = [e.new_record["id"] for e in items]
        self.calls.append((rows, [commit_lsn(e) for e in items], self.box[0].ack.flushed))
        if self.fail_first.get(rows[0], 0) > 0:
            self.fail_first[rows[0]] -= 1
            raise RuntimeError(f"batch handler fails on the batch from row {rows[0]}")

    def rows(self) -> list[list[int]]:
        return [c[0] for c in self.calls]


def register(events: Events, batches: Batches, plain: bool, **options: Any) -> None:
    if plain:
        events.on_insert("item", **options)(batches)
        return

    async def handler(items: list[Event]) -> None:
        if not batches.calls:
            batches.started.set()
            await until(batches.go.is_set, "the test releasing the first call", timeout=30)
        batches(items)
    events.on_insert("item", **options)(handler)


def stream_queued(admin: psycopg.Connection, dsn: str, events: Events, batches: Batches,
                  rows: int, **options: Any) -> WalEx:
    """Queue ``rows`` transactions behind the first call (:func:`queue_up`), release it, and
    return the app once every transaction was handled and the last one acknowledged."""

    async def main() -> WalEx:
        app = make_app(dsn, events, **options)
        batches.box.append(app)
        async with app:
            await queue_up(admin, app, batches, rows)
            batches.go.set()
            await until(lambda: app.transactions_handled == rows, f"{rows} transactions handled")
            last = batches.calls[-1][1][-1]
            await until(lambda: app.ack.flushed > last, "the last one acknowledged")
        return app

    return run(main())


@pytest.mark.parametrize("plain", [False, True], ids=["async", "plain"])
def test_queued_transactions_come_in_calls_of_at_most_max_batch_acknowledged_after_them(
    admin: psycopg.Connection, dsn: str, plain: bool
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    if not plain:
        register(events, batches, plain, max_batch=20)

    async def main() -> None:
        app = make_app(dsn, events)
        box.append(app)
        if plain:  # registered after the app was made: batches all the same
            register(events, batches, plain, max_batch=20)
        async with app:
            await queue_up(admin, app, batches, 51)
            batches.go.set()
            await until(lambda: app.transactions_handled == 51, "51 transactions handled")
            last = batches.calls[-1][1][-1]
            await until(lambda: app.ack.flushed > last, "the last one acknowledged")

    run(main())
    # the first call alone (nothing was queued), then the 50 queued transactions in
    # calls of 20, 20 and the 10 left: nothing waited for a batch to fill
    assert batches.rows() == [[1], list(range(2, 22)), list(range(22, 42)), list(range(42, 52))]
    for _rows, lsns, flushed in batches.calls:
        assert lsns == sorted(lsns)
        assert flushed < lsns[0]  # none of a call's transactions acknowledged before it


def test_without_max_batch_each_transaction_is_its_own_call(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    register(events, batches, plain=False)
    stream_queued(admin, dsn, events, batches, 8)
    assert batches.rows() == [[i] for i in range(1, 9)]


def test_a_transaction_larger_than_max_batch_comes_in_calls_of_max_batch(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    batches.go.set()
    events = Events()
    register(events, batches, plain=False, max_batch=20)

    async def main() -> None:
        app = make_app(dsn, events)
        box.append(app)
        async with app:
            admin.execute("INSERT INTO item SELECT generate_series(1, 45)")
            await until(lambda: app.transactions_handled == 1, "the transaction handled")

    run(main())
    assert batches.rows() == [list(range(1, 21)), list(range(21, 41)), list(range(41, 46))]


def test_other_handlers_still_get_one_call_per_transaction(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    register(events, batches, plain=False, max_batch=100)
    each: list[list[int]] = []

    @events.on_insert("item")
    async def per_transaction(items: list[Event]) -> None:
        each.append([e.new_record["id"] for e in items])

    stream_queued(admin, dsn, events, batches, 10)
    assert batches.rows() == [[1], list(range(2, 11))]
    assert each == [[i] for i in range(1, 11)]


def test_a_failing_batch_under_stop_acknowledges_none_of_its_transactions(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box, fail_first={2: 1})
    events = Events()
    register(events, batches, plain=True, max_batch=100)
    first_lsn: list[int] = []

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, slot_name="walex_max_batch_stop",
                       max_retries=0)
        box.append(app)
        await app.start()
        try:
            await queue_up(admin, app, batches, 12)
            batches.go.set()
            with pytest.raises(HandlerError, match="batch of 11 events"):
                await asyncio.wait_for(app.wait(), 30)
        finally:
            await app.stop()
        first_lsn.append(batches.calls[0][1][0])
        assert app.transactions_handled == 1
        assert first_lsn[0] < app.ack.flushed < batches.calls[1][1][0]  # row 1's, not the batch's

    run(main())
    failed = batches.calls[1]
    assert failed[0] == list(range(2, 13))

    # a restart gets the batch again, with the same ids
    again: list[str] = []
    ids_before = [f"{lsn:016X}" for lsn in failed[1]]
    events2 = Events()

    @events2.on_insert("item", max_batch=100)
    async def handler(items: list[Event]) -> None:
        again.extend(e.id for e in items)

    async def rerun() -> None:
        app = make_app(dsn, events2, durable_slot=True, slot_name="walex_max_batch_stop")
        async with app:
            await until(lambda: len(again) >= 11, "the batch delivered again")

    run(rerun())
    assert [i.split("-")[0] for i in again] == ids_before


def test_a_failing_batch_under_skip_is_skipped_as_a_whole(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box, fail_first={2: 1})
    events = Events()
    register(events, batches, plain=False, max_batch=5)
    app = stream_queued(admin, dsn, events, batches, 12, on_error="skip", max_retries=0)
    assert app.dispatcher.failures == 1
    assert batches.rows() == [[1], [2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12]]


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "10"])
def test_max_batch_must_be_a_whole_number_of_events(value: Any) -> None:
    events = Events()
    with pytest.raises(ConfigError, match="max_batch must be a whole number of events >= 1"):
        events.on_insert("item", max_batch=value)(lambda items: None)


def test_max_batch_with_functions_is_refused_with_the_fix() -> None:
    events = Events()
    with pytest.raises(ConfigError, match="register the functions on a handler of their own"):
        events.on_insert("item", max_batch=10, functions=[print])(lambda items: None)


def test_a_call_can_hold_more_transactions_than_the_queue(admin: psycopg.Connection, dsn: str) -> None:
    # the transactions a call defers are in hand, not queued: the reader, held up by
    # a full queue, may queue more, so one call is not capped by max_pending_transactions
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    register(events, batches, plain=False, max_batch=100)

    async def main() -> None:
        app = make_app(dsn, events, max_pending_transactions=8)
        box.append(app)
        async with app:
            await release_a_full_queue(admin, app, batches, "INSERT INTO item VALUES (%s)", 201, 8)

    run(main())
    sizes = [len(rows) for rows in batches.rows()]
    assert [r for rows in batches.rows() for r in rows] == list(range(1, 202))
    assert max(sizes) <= 100
    assert max(sizes) > 8, sizes
    for _rows, lsns, flushed in batches.calls:
        assert lsns == sorted(lsns)
        assert flushed < lsns[0]


def slot_flushed(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots "
                        "WHERE slot_name = %s", [slot]).fetchone()
    assert row is not None
    return int(row[0])


def test_the_slot_is_not_advanced_past_a_batch_whose_call_is_running(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    in_call = threading.Event()
    leave = threading.Event()
    calls: list[list[int]] = []

    @events.on_insert("item", max_batch=100)
    def handler(items: list[Event]) -> None:
        calls.append([commit_lsn(e) for e in items])
        if len(calls) == 1:
            batches.started.set()
            assert batches.go.wait(30)
        elif len(calls) == 2:  # the batch: blocked mid-call
            in_call.set()
            assert leave.wait(30)

    async def main() -> None:
        app = make_app(dsn, events, durable_slot=True, slot_name="walex_max_batch_slot")
        box.append(app)
        async with app:
            slot = app.slot_name
            await queue_up(admin, app, batches, 21)
            batches.go.set()
            await until(in_call.is_set, "the batched call")
            assert len(calls[1]) == 20
            first, last = calls[1][0], calls[1][-1]
            await until(lambda: slot_flushed(admin, slot) > calls[0][0], "row 1 acknowledged")
            app.ack.last_sent = -1
            await until(lambda: app.ack.last_sent != -1, "a status update during the call")
            assert app.ack.last_sent < first
            assert app.ack.flushed < first
            assert slot_flushed(admin, slot) < first
            leave.set()
            await until(lambda: slot_flushed(admin, slot) > last, "the batch acknowledged")

    try:
        run(main())
    finally:
        leave.set()
        batches.go.set()


def test_a_failing_batch_goes_to_the_dead_letter_handler_as_a_whole(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box, fail_first={2: 2})
    events = Events()
    register(events, batches, plain=True, max_batch=6)
    dead: list[tuple[list[int], str]] = []

    def dead_letter(items: list[Event], exc: BaseException) -> None:
        dead.append(([e.new_record["id"] for e in items], str(exc)))

    stream_queued(admin, dsn, events, batches, 12, on_error=dead_letter, max_retries=1, retry_backoff=0.01)
    # the failing call, retried once, fails again: its events go to the dead letter
    # handler in one list, and its transactions count as handled
    assert batches.rows() == [[1], [2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert dead == [([2, 3, 4, 5, 6, 7], "batch handler fails on the batch from row 2")]


def test_a_full_call_failing_under_stop_names_the_whole_batch(
    admin: psycopg.Connection, dsn: str
) -> None:
    # the call made as soon as max_batch events are kept (not the one made when the
    # queue ran dry) fails: the error names its events, all of them unacknowledged
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box, fail_first={2: 1})
    events = Events()
    register(events, batches, plain=False, max_batch=5)

    async def main() -> None:
        app = make_app(dsn, events, max_retries=0)
        box.append(app)
        await app.start()
        try:
            await queue_up(admin, app, batches, 12)
            batches.go.set()
            with pytest.raises(HandlerError, match="on a batch of 5 events") as raised:
                await asyncio.wait_for(app.wait(), 30)
        finally:
            await app.stop()
        failed = batches.calls[1]
        assert failed[0] == [2, 3, 4, 5, 6]
        assert f"{failed[1][0]:016X}-" in str(raised.value)
        assert app.transactions_handled == 1
        assert app.ack.flushed < failed[1][0]

    run(main())


def test_with_a_destination_every_transaction_is_published_and_acknowledged_after_its_call(
    admin: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64
    import json

    from destinations.receiver import Receiver

    monkeypatch.setenv("WALEX_TEST_MAX_BATCH_SECRET",
                       "whsec_" + base64.b64encode(b"walex max_batch test").decode())
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    register(events, batches, plain=False, max_batch=10)

    async def main() -> list[bytes]:
        with Receiver() as hook:
            app = make_app(dsn, events,
                           destinations=[hook.url(query="secret_env=WALEX_TEST_MAX_BATCH_SECRET")])
            box.append(app)
            async with app:
                await queue_up(admin, app, batches, 21)
                batches.go.set()
                await until(lambda: app.transactions_handled == 21, "21 transactions handled")
                last = batches.calls[-1][1][-1]
                await until(lambda: app.ack.flushed > last, "the last one acknowledged")
            return [body for _p, _h, body, _s in hook.accepted()]

    bodies = run(main())
    assert batches.rows() == [[1], list(range(2, 12)), list(range(12, 22))]
    for _rows, _lsns, flushed in batches.calls:
        assert flushed < _lsns[0]
    published = [e["data"]["new_record"]["id"] for body in bodies for e in json.loads(body)]
    assert published == list(range(1, 22))  # one request per transaction, in order


def test_filters_still_choose_the_events_of_a_batched_handler(
    admin: psycopg.Connection, dsn: str
) -> None:
    # where= keeps the even rows: a call holds those of several transactions, and the
    # transactions between them (nothing selected) are acknowledged in order after it
    admin.execute(SCHEMA)
    box: list[WalEx] = []
    batches = Batches(box)
    events = Events()
    register(events, batches, plain=True, max_batch=4,
             where=lambda e: e.new_record["id"] % 2 == 0 or e.new_record["id"] == 1)

    stream_queued(admin, dsn, events, batches, 21)
    assert batches.rows() == [[1], [2, 4, 6, 8], [10, 12, 14, 16], [18, 20]]
    for _rows, lsns, flushed in batches.calls:
        assert flushed < lsns[0]
