"""Run-time configuration against the calls under way, and hostile input.

Concern: a configuration change never loosens a bound the app keeps for the
calls under way: ``function_concurrency`` holds at every moment, across any
change (a change of any option, the bound itself lowered or raised), for the
calls already running as for those that start or retry after it. A key of
the wrong type is a ConfigError; a retry count however high stays under the
error policy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import psycopg
import pytest
from support import collecting, run, until

from walex import ConfigError, Event, Events

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, label text);
CREATE PUBLICATION pub FOR TABLE item;
"""


class Overlap:
    """Counts the calls of a function running at once; the first call of id 1 fails."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.calls: list[int] = []
        self.entered: list[int] | None = None  # set: each call's count of those running

    async def function(self, event: Event) -> None:
        key = event.new_record["id"]
        self.calls.append(key)
        self.running += 1
        self.most = max(self.most, self.running)
        if self.entered is not None:
            self.entered.append(self.running)
        try:
            if key == 1 and self.calls.count(1) == 1:
                await asyncio.sleep(0.4)
                raise RuntimeError("first try of 1 fails")
            await asyncio.sleep(1.0)
        finally:
            self.running -= 1


def test_function_concurrency_holds_across_a_change_during_a_transaction(
        admin: psycopg.Connection, dsn: str) -> None:
    """A change (here of retry_backoff) while two functions run: on main it made a new
    semaphore, and the retry of the failed call took it while the old one let the next
    call in: three calls at once with function_concurrency=2."""
    admin.execute(SCHEMA)
    overlap, events = Overlap(), Events()
    events.on_insert("item", functions=[overlap.function])(lambda items: None)

    async def main() -> None:
        async with collecting(dsn, modules=[events], function_concurrency=2, max_retries=1,
                              retry_backoff=0.01) as rec:
            app = rec.app
            assert app is not None
            admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 4) g")
            await until(lambda: overlap.running == 2, "two functions running")
            app.config.replace("retry_backoff", 0.02)
            await until(lambda: app.transactions_handled == 1, "the transaction", timeout=10)
        assert sorted(overlap.calls) == [1, 1, 2, 3, 4]
        assert overlap.most == 2

    run(main())


def test_function_concurrency_lowered_during_a_transaction_is_held_at_once(
        admin: psycopg.Connection, dsn: str) -> None:
    """function_concurrency lowered from 3 to 1 while three calls run: no call starts (or
    retries) until none runs; on main the waiting calls went on under the old bound of 3
    and the retry under the new one (four at once)."""
    admin.execute(SCHEMA)
    overlap, events = Overlap(), Events()
    events.on_insert("item", functions=[overlap.function])(lambda items: None)

    async def main() -> None:
        async with collecting(dsn, modules=[events], function_concurrency=3, max_retries=1,
                              retry_backoff=0.01) as rec:
            app = rec.app
            assert app is not None
            admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 5) g")
            await until(lambda: overlap.running == 3, "three functions running")
            app.config.replace("function_concurrency", 1)
            overlap.entered = []  # how many ran, itself included, as each later call began
            await until(lambda: app.transactions_handled == 1, "the transaction", timeout=15)
        assert sorted(overlap.calls) == [1, 1, 2, 3, 4, 5]
        assert overlap.entered == [1, 1, 1]

    run(main())


def test_a_key_of_the_wrong_type_is_a_config_error(admin: psycopg.Connection, dsn: str) -> None:
    """A list or dict as the key raised TypeError (unhashable) on main; an infinite backoff
    was taken."""
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn) as rec:
            app = rec.app
            assert app is not None
            for call in (lambda: app.config.get(["subscriptions"]),
                         lambda: app.config.replace({"on_error": "skip"}, "skip"),
                         lambda: app.config.add(["subscriptions"], "item"),
                         lambda: app.config.remove(b"subscriptions", "item")):
                with pytest.raises(ConfigError, match="unknown configuration key .*'subscriptions'"):
                    call()
            # an infinite backoff: the first failed call (or lost connection) would wait for
            # ever, silently; on main accepted
            for key in ("retry_backoff", "reconnect_backoff_max"):
                with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
                    app.config.replace(key, float("inf"))
                assert app.config.get(key) != float("inf")

    run(main())


def test_many_retries_without_backoff_stay_under_the_error_policy(
        admin: psycopg.Connection, dsn: str) -> None:
    """max_retries above 1023: on main the 1024th retry's delay (retry_backoff * 2**1024)
    raised OverflowError, which stopped the app instead of the "skip" policy going on."""
    admin.execute(SCHEMA)
    tries: list[int] = []
    events = Events()

    @events.on_insert("item")
    async def fails_on_one(items: list[Event]) -> None:
        key = items[0].new_record["id"]
        tries.append(key)
        if key == 1:
            raise RuntimeError("always")

    async def main() -> None:
        async with collecting(dsn, modules=[events], max_retries=1100, retry_backoff=0,
                              on_error="skip"):
            admin.execute("INSERT INTO item VALUES (1, 'x')")
            admin.execute("INSERT INTO item VALUES (2, 'y')")
            await until(lambda: 2 in tries, "the second transaction", timeout=60)
        assert tries.count(1) == 1101

    run(main())


def test_a_long_outage_under_many_reconnect_attempts(admin: psycopg.Connection, dsn: str) -> None:
    """reconnect_max_attempts above 1024 (a way to say: keep trying): on main the backoff of
    the 1025th attempt (0.2 * 2**1024 as a float) raised OverflowError, which stopped the
    app however many attempts were left. Here the url is replaced by one nothing answers,
    the session ended, and, past 1025 failed attempts, the good url given back."""
    admin.execute(SCHEMA)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bad = psycopg.conninfo.make_conninfo(dsn, port=port, connect_timeout=1)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"], reconnect_max_attempts=100_000,
                              reconnect_backoff_max=0.0001, durable_slot=True) as rec:
            app = rec.app
            assert app is not None
            good = app.config.get("url")
            app.config.replace("url", bad)
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                          "WHERE slot_name = %s", [app.slot_name])
            log = logging.getLogger("walex")
            failed = []

            class Count(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    if "reconnect attempt" in record.getMessage():
                        failed.append(1)

            counter = Count()
            log.addHandler(counter)
            try:
                await until(lambda: len(failed) > 1100 or not app._tasks, "1100 failed attempts",
                            timeout=60)
            finally:
                log.removeHandler(counter)
            assert app._tasks and not any(t.done() for t in app._tasks), app._error
            app.config.replace("url", good)
            admin.execute("INSERT INTO item VALUES (1, 'back')")
            await rec.wait_for(1, timeout=30)

    run(main(), timeout=120)


def test_the_retry_backoff_doubles_up_to_its_cap(admin: psycopg.Connection, dsn: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A retry waits retry_backoff doubled at each retry up to RETRY_BACKOFF_CAP (60 s; made
    small here): on main the delay kept doubling, so max_retries=20 with the default
    backoff waited days before the error policy ever saw the failure."""
    import walex.dispatch

    monkeypatch.setattr(walex.dispatch, "RETRY_BACKOFF_CAP", 0.3)
    admin.execute(SCHEMA)
    tries: list[int] = []
    events = Events()

    @events.on_insert("item")
    async def fails(items: list[Event]) -> None:
        tries.append(items[0].new_record["id"])
        raise RuntimeError("always")

    async def main() -> None:
        async with collecting(dsn, modules=[events], max_retries=5, retry_backoff=0.1,
                              on_error="skip"):
            admin.execute("INSERT INTO item VALUES (1, 'x')")
            await until(lambda: len(tries) == 6, "six calls", timeout=30)

    with caplog.at_level(logging.WARNING, logger="walex"):
        run(main())
    delays = [float(m) for m in re.findall(r"retry \d/5 in ([0-9.]+)s", caplog.text)]
    assert delays == [0.1, 0.2, 0.3, 0.3, 0.3], delays
