"""Several WalEx apps in one process: each its own slot, handlers and lifecycle.

Concern: apps with different names run side by side on the same database,
each with its own replication slot (temporary, or durable named after the
app), its own subscriptions and handler modules; one failing, stopping or
being reconfigured by name leaves the others streaming; a second app with a
name already running is refused. Also the lifecycle around a slot: an app
whose durable slot is held waits for it, and stop() returns once the
transaction in hand is done.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import psycopg
import pytest
from support import Recorder, collecting, run, until

from walex import ConfigError, Event, Events, HandlerError, WalEx
from walex.app import get_app
from walex.configs import add_config

SCHEMA = """
CREATE TABLE "user" (id int PRIMARY KEY);
CREATE TABLE todo (id int PRIMARY KEY);
CREATE TABLE shared (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE "user", todo, shared;
"""


def names(events: list[Event]) -> list[str]:
    return [f"{e.name}{e.new_record['id']}" for e in events]


def slots(admin: psycopg.Connection) -> dict[str, tuple[bool, bool]]:
    """slot name -> (temporary, active) of the test database."""
    rows = admin.execute("SELECT slot_name, temporary, active FROM pg_replication_slots "
                         "WHERE database = current_database()").fetchall()
    return {name: (temporary, active) for name, temporary, active in rows}


async def slots_become(admin: psycopg.Connection, expected: dict[str, tuple[bool, bool]]) -> None:
    """Wait until the slots are ``expected`` (a walsender ends a moment after its client)."""
    await until(lambda: slots(admin) == expected, f"slots {expected}, have {slots(admin)}")


def test_two_apps_each_with_own_slot_and_subscriptions(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["user", "shared"], name="inst_a") as a, \
                collecting(dsn, subscriptions=["todo", "shared"], name="inst_b") as b:
            assert a.app is not None and b.app is not None
            assert (get_app("inst_a"), get_app("inst_b")) == (a.app, b.app)
            assert a.app.slot_name.startswith("inst_a_walex_")
            assert b.app.slot_name.startswith("inst_b_walex_")
            assert slots(admin) == {a.app.slot_name: (True, True), b.app.slot_name: (True, True)}
            admin.execute("""INSERT INTO "user" VALUES (1); INSERT INTO todo VALUES (1);
                             INSERT INTO shared VALUES (1)""")
            admin.execute("INSERT INTO todo VALUES (2)")
            await a.wait_for(2)
            await b.wait_for(3)
            await a.settle()
            assert names(a.events) == ["user1", "shared1"]
            assert names(b.events) == ["todo1", "shared1", "todo2"]
            assert a.events[1].id == b.events[1].id  # the same change, seen by both
        await slots_become(admin, {})

    run(main())


def test_same_name_twice_is_refused(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["user"], name="inst_same") as rec:
            other = WalEx(dsn, publication="pub", name="inst_same")
            with pytest.raises(ConfigError, match="a walex app named 'inst_same' is already "
                                                  "running in this process"):
                await other.start()
            assert rec.app is not None and get_app("inst_same") is rec.app
            assert list(slots(admin)) == [rec.app.slot_name]
            admin.execute("""INSERT INTO "user" VALUES (1)""")
            await rec.wait_for(1)

    run(main())


def test_a_failing_app_leaves_the_other_streaming(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    failing = Events()

    @failing.on_insert("shared")
    def explode(items: list[Event]) -> None:
        raise RuntimeError("b breaks")

    async def main() -> None:
        async with collecting(dsn, subscriptions=["shared"], name="inst_ok") as a:
            with pytest.raises(HandlerError, match="RuntimeError\\('b breaks'\\)"):
                async with collecting(dsn, subscriptions=["shared"], name="inst_failing",
                                      modules=[failing], max_retries=0) as b:
                    admin.execute("INSERT INTO shared VALUES (1)")
                    await a.wait_for(1)
                    assert b.app is not None
                    await b.app.wait()
            assert a.app is not None
            await slots_become(admin, {a.app.slot_name: (True, True)})
            with pytest.raises(ConfigError, match="no walex app named 'inst_failing'"):
                get_app("inst_failing")
            admin.execute("INSERT INTO shared VALUES (2)")
            await a.wait_for(2)
            assert names(a.events) == ["shared1", "shared2"]

    run(main())


def test_stopping_or_reconfiguring_one_app_leaves_the_other(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(
                collecting(dsn, subscriptions=["user"], name="inst_one"))
            b = await stack.enter_async_context(
                collecting(dsn, subscriptions=["user"], name="inst_two"))
            assert a.app is not None and b.app is not None
            add_config("inst_two", "subscriptions", ["todo"])
            assert (a.app.settings.subscriptions, b.app.settings.subscriptions) == (
                ["user"], ["user", "todo"])
            admin.execute("""INSERT INTO "user" VALUES (1); INSERT INTO todo VALUES (1)""")
            await b.wait_for(2)
            await a.wait_for(1)
            await a.app.stop()
            await slots_become(admin, {b.app.slot_name: (True, True)})
            admin.execute("""INSERT INTO "user" VALUES (2)""")
            await b.wait_for(3)
            await a.settle()
            assert names(a.events) == ["user1"]
            assert names(b.events) == ["user1", "todo1", "user2"]

    run(main())


def test_durable_slots_named_after_each_app(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    recorders = [Recorder(), Recorder()]

    async def main() -> None:
        async with collecting(dsn, subscriptions=["user"], name="inst_durable_a",
                              durable_slot=True, recorder=recorders[0]), \
                collecting(dsn, subscriptions=["todo"], name="inst_durable_b",
                           durable_slot=True, recorder=recorders[1]):
            assert slots(admin) == {"inst_durable_a_walex": (False, True),
                                    "inst_durable_b_walex": (False, True)}
            admin.execute("""INSERT INTO "user" VALUES (1); INSERT INTO todo VALUES (1)""")
            await recorders[0].wait_for(1)
            await recorders[1].wait_for(1)
        # each kept its slot, confirmed up to the end of the transaction it handled
        await slots_become(admin, {"inst_durable_a_walex": (False, False),
                                   "inst_durable_b_walex": (False, False)})
        end = int(recorders[0].events[0].id.split("-")[0], 16)
        rows = admin.execute("SELECT slot_name, confirmed_flush_lsn - '0/0' >= %s "
                             "FROM pg_replication_slots WHERE database = current_database() "
                             "ORDER BY slot_name", (end,)).fetchall()
        assert rows == [("inst_durable_a_walex", True), ("inst_durable_b_walex", True)]

    run(main())
    assert [names(r.events) for r in recorders] == [["user1"], ["todo1"]]


@pytest.mark.parametrize(("first", "second"), [("my-app", "my_app"), ("App", "app")])
def test_distinct_names_get_distinct_durable_slots(first: str, second: str) -> None:
    a = WalEx("postgresql://localhost/x", publication="pub", name=first, durable_slot=True)
    b = WalEx("postgresql://localhost/x", publication="pub", name=second, durable_slot=True)
    assert a.slot_name != b.slot_name


def test_app_waits_for_its_durable_slot_held_by_another(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    got: list[Event] = []
    events = Events()
    events.on_insert("user")(got.extend)
    waiting = WalEx(dsn, publication="pub", subscriptions=["user"], name="inst_waiter",
                    durable_slot=True, slot_name="inst_shared_slot", slot_wait_timeout=20,
                    modules=[events])

    async def main() -> None:
        async with collecting(dsn, subscriptions=["user"], name="inst_holder",
                              durable_slot=True, slot_name="inst_shared_slot") as first:
            starting = asyncio.create_task(waiting.start())
            try:
                await asyncio.sleep(1)
                assert not starting.done(), starting.exception()  # waits for the slot
                assert first.app is not None
                await first.app.stop()
                await asyncio.wait_for(asyncio.shield(starting), 20)  # free: it streams
            finally:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
        try:
            admin.execute("""INSERT INTO "user" VALUES (1)""")
            await until(lambda: bool(got), "the event")
            assert names(got) == ["user1"]
        finally:
            await waiting.stop()

    run(main())


def test_stop_returns_once_the_transaction_in_hand_is_done(admin: psycopg.Connection,
                                                           dsn: str) -> None:
    admin.execute(SCHEMA)
    events, finished = Events(), []

    @events.on_insert("user")
    async def slow(items: list[Event]) -> None:
        await asyncio.sleep(0.5)
        finished.extend(items)

    async def main() -> float:
        app = WalEx(dsn, publication="pub", subscriptions=["user"], name="inst_grace",
                    modules=[events], shutdown_grace=3)
        await app.start()
        try:
            admin.execute("""INSERT INTO "user" VALUES (1)""")
            await until(lambda: app.pipeline.busy, "the transaction in hand")
        finally:
            began = time.monotonic()
            await asyncio.wait_for(app.stop(), 10)
        assert names(finished) == ["user1"]  # it was let finish, and acknowledged
        assert app.ack.flushed >= int(finished[0].id.split("-")[0], 16)
        return time.monotonic() - began

    assert run(main()) < 2  # the handler needed 0.5 s; shutdown_grace is only a bound


def test_handler_registered_after_the_app_was_created_is_called(
    admin: psycopg.Connection, dsn: str
) -> None:
    admin.execute(SCHEMA)
    events = Events()
    late: list[Event] = []

    async def main() -> None:
        async with collecting(dsn, subscriptions=["user"], modules=[events]) as rec:
            events.on_insert("user")(late.extend)  # after WalEx(...) copied the modules
            admin.execute("""INSERT INTO "user" VALUES (1)""")
            await rec.wait_for(1)
            await until(lambda: bool(late), "the late handler's event")

    run(main())
    assert names(late) == ["user1"]
