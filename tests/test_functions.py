"""Per-event functions: once per selected event, concurrent and bounded, failures under the policy.

Concern: the ``functions=[...]`` of a handler. Each runs once for every event
its handler selected (after the filters), plain and coroutine functions
alike; they run concurrently, at most ``function_concurrency`` at a time; a
function that fails is retried ``max_retries`` times, then logged with the
event's id and handled by ``on_error``: ``"stop"`` stops the app without
acknowledging the transaction, ``"skip"`` goes on, a dead-letter callable
receives ``([event], exception)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from support import Recorder, collecting, run, until

from walex import Event, Events, HandlerError

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, label text, hidden bool NOT NULL DEFAULT false);
CREATE PUBLICATION pub FOR TABLE item;
"""


def ids(events: list[Event]) -> list[int]:
    return [e.new_record["id"] for e in events]


def end_lsn(event: Event) -> int:
    """The end LSN of the event's transaction, from its id."""
    return int(event.id.split("-")[0], 16)


class Tracker:
    """Records which events a function got and how many calls overlapped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.running = 0
        self.max_running = 0

    def enter(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)
            self.running += 1
            self.max_running = max(self.max_running, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1

    def async_function(self, seconds: float = 0.0) -> Callable[[Event], object]:
        async def function(event: Event) -> None:
            self.enter(event)
            await asyncio.sleep(seconds)
            self.leave()

        return function

    def sync_function(self, seconds: float = 0.0) -> Callable[[Event], None]:
        def function(event: Event) -> None:
            self.enter(event)
            time.sleep(seconds)
            self.leave()

        return function


def test_functions_run_once_per_selected_event(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    rec, events = Recorder(), Events()
    plain, coro, other = Tracker(), Tracker(), Tracker()
    events.on_insert("item", unwatched_records={"hidden": True},
                     functions=[plain.sync_function(), coro.async_function()])(rec.handler("ins"))
    events.on_update("item", functions=[other.sync_function()])(rec.handler("upd"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("INSERT INTO item VALUES (1, 'a', false), (2, 'b', true), (3, 'c', false)")
            admin.execute("INSERT INTO item VALUES (4, 'd', true)")  # nothing selected
            admin.execute("UPDATE item SET label = 'x' WHERE id IN (2, 3)")
            await rec.wait_for(6)
            await until(lambda: rec.app.transactions_handled == 3, "3 transactions")  # type: ignore[union-attr]
        assert [ids(c) for c in rec.calls_of("ins")] == [[1, 3]]
        assert sorted(ids(plain.events)) == [1, 3]
        assert sorted(ids(coro.events)) == [1, 3]
        assert sorted(ids(other.events)) == [2, 3]
        assert {e.id for e in plain.events} == {e.id for e in rec.calls_of("ins")[0]}

    run(main())


@pytest.mark.parametrize(("concurrency", "kind", "expected"), [
    (2, "async", 2), (16, "async", 6), (3, "sync", 3),
])
def test_functions_are_concurrent_and_bounded(admin: psycopg.Connection, dsn: str,
                                              concurrency: int, kind: str, expected: int) -> None:
    admin.execute(SCHEMA)
    tracker, events = Tracker(), Events()
    function = tracker.async_function(0.2) if kind == "async" else tracker.sync_function(0.2)
    events.on_insert("item", functions=[function])(lambda items: None)

    async def main() -> None:
        async with collecting(dsn, modules=[events], function_concurrency=concurrency) as rec:
            admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 6) g")
            await rec.wait_for(6)
            started = time.monotonic()
            await until(lambda: rec.app.transactions_handled == 1, "the transaction")  # type: ignore[union-attr]
        assert sorted(ids(tracker.events)) == [1, 2, 3, 4, 5, 6]
        assert tracker.max_running == expected
        assert time.monotonic() - started < 5

    run(main())


def test_plain_functions_are_bounded_by_function_concurrency_only(admin: psycopg.Connection,
                                                                  dsn: str) -> None:
    # more than the default thread pool's min(32, cpu_count + 4) threads
    concurrency = min(32, (os.cpu_count() or 1) + 4) + 2
    admin.execute(SCHEMA)
    tracker, events = Tracker(), Events()
    events.on_insert("item", functions=[tracker.sync_function(0.5)])(lambda items: None)

    async def main() -> None:
        async with collecting(dsn, modules=[events], function_concurrency=concurrency) as rec:
            admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, %s) g",
                          [concurrency + 2])
            await until(lambda: rec.app.transactions_handled == 1, "the transaction")  # type: ignore[union-attr]
        assert len(tracker.events) == concurrency + 2
        assert tracker.max_running == concurrency

    run(main())


def failing_function(seen: list[Event], fail_on: int, times: int = 1_000) -> Callable[[Event], None]:
    """A function recording each call, raising on the record ``fail_on`` ``times`` times."""

    def function(event: Event) -> None:
        seen.append(event)
        if event.new_record["id"] == fail_on and sum(e.id == event.id for e in seen) <= times:
            raise ValueError(f"cannot handle {fail_on}")

    return function


def test_failing_function_under_stop(admin: psycopg.Connection, dsn: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    admin.execute(SCHEMA)
    seen: list[Event] = []
    events = Events()
    events.on_insert("item", functions=[failing_function(seen, fail_on=2)])(lambda items: None)

    async def main() -> None:
        with pytest.raises(HandlerError) as info:
            async with collecting(dsn, modules=[events], max_retries=0) as rec:
                admin.execute("INSERT INTO item VALUES (1, 'a'), (2, 'b'), (3, 'c')")
                await rec.wait_for(3)
                await rec.app.wait()  # type: ignore[union-attr]
        [failed] = [e for e in seen if e.new_record["id"] == 2]
        message = str(info.value)
        assert f"function failing_function.<locals>.function for event {failed.id}" in message
        assert "ValueError('cannot handle 2')" in message
        assert sorted(ids(seen)) == [1, 2, 3]  # the others ran all the same
        assert rec.app.ack.flushed < end_lsn(failed)  # type: ignore[union-attr]
        return failed

    with caplog.at_level(logging.ERROR, logger="walex"):
        failed = run(main())
    logged = [r.getMessage() for r in caplog.records if r.name == "walex.dispatch"]
    assert len(logged) == 1 and failed.id in logged[0]


def test_failing_function_under_skip(admin: psycopg.Connection, dsn: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    admin.execute(SCHEMA)
    seen: list[Event] = []
    events = Events()
    events.on_insert("item", functions=[failing_function(seen, fail_on=2)])(lambda items: None)

    async def main() -> list[Event]:
        async with collecting(dsn, modules=[events], on_error="skip", max_retries=1,
                              retry_backoff=0.01) as rec:
            admin.execute("INSERT INTO item VALUES (1, 'a'), (2, 'b')")
            admin.execute("INSERT INTO item VALUES (3, 'c')")
            await rec.wait_for(3)
            await until(lambda: rec.app.transactions_handled == 2, "2 transactions")  # type: ignore[union-attr]
            assert (rec.app.dispatcher.failures, rec.app.dispatcher.retries) == (1, 1)  # type: ignore[union-attr]
            assert rec.app.ack.flushed >= end_lsn(rec.events[2])  # type: ignore[union-attr]
        return [e for e in seen if e.new_record["id"] == 2]

    with caplog.at_level(logging.WARNING, logger="walex"):
        failed = run(main())
    assert len(failed) == 2 and failed[0].id == failed[1].id  # tried, retried once, skipped
    messages = [r.getMessage() for r in caplog.records if r.name == "walex.dispatch"]
    assert [m for m in messages if "skipped" in m] == [
        f"function failing_function.<locals>.function for event {failed[0].id} failed after "
        f"1 retries, skipped events {failed[0].id}: ValueError('cannot handle 2')"
    ]


def test_failing_function_goes_to_dead_letter(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    seen: list[Event] = []
    dead: list[tuple[list[Event], BaseException]] = []
    events = Events()
    events.on_insert("item", functions=[failing_function(seen, fail_on=1)])(lambda items: None)

    async def dead_letter(items: list[Event], exc: BaseException) -> None:
        dead.append((items, exc))

    async def main() -> None:
        async with collecting(dsn, modules=[events], on_error=dead_letter, max_retries=0) as rec:
            admin.execute("INSERT INTO item VALUES (1, 'a'), (2, 'b')")
            admin.execute("INSERT INTO item VALUES (3, 'c')")
            await rec.wait_for(3)
            await until(lambda: rec.app.transactions_handled == 2, "2 transactions")  # type: ignore[union-attr]
        [(items, exc)] = dead
        assert [e.id for e in items] == [rec.events[0].id]
        assert repr(exc) == "ValueError('cannot handle 1')"
        assert sorted(ids(seen)) == [1, 2, 3]

    run(main())


def test_function_retried_until_it_succeeds(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    seen: list[Event] = []
    events = Events()
    events.on_insert("item", functions=[failing_function(seen, fail_on=1, times=2)])(
        lambda items: None
    )

    async def main() -> None:
        async with collecting(dsn, modules=[events], max_retries=2, retry_backoff=0.01) as rec:
            admin.execute("INSERT INTO item VALUES (1, 'a')")
            await rec.wait_for(1)
            await until(lambda: rec.app.transactions_handled == 1, "the transaction")  # type: ignore[union-attr]
            assert (rec.app.dispatcher.failures, rec.app.dispatcher.retries) == (0, 2)  # type: ignore[union-attr]
        assert len(seen) == 3 and len({e.id for e in seen}) == 1

    run(main())
