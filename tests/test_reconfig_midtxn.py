"""Runtime configuration against a transaction delivered in several batches.

Concern: a subscription change made while a large transaction is half
delivered (its first batches handled, the rest not read yet) applies from
the next transaction, as the README promises: the transaction under way is
delivered whole under the subscriptions it started with -- never half of one
table's rows of it, the rest dropped and the transaction acknowledged -- on
the compiled hot path and on the pure-Python path (a message middleware).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
import pytest
from support import collecting, run, until
from window_support import stream_fixture

from walex import Event, Events
from walex.lsn import parse_lsn

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE TABLE note (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item, note;
"""
ROWS = 400
stream = stream_fixture("reconf")
BIG = (f"BEGIN; INSERT INTO item SELECT g FROM generate_series(1, {ROWS}) g; "
       f"INSERT INTO note SELECT g FROM generate_series(1, {ROWS}) g; COMMIT")


async def hand_on(message: Any, app: Any) -> None:
    await app.process_message(message)


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("change", ["remove", "add"])
def test_subscription_change_mid_transaction_applies_from_the_next(
        admin: psycopg.Connection, dsn: str, change: str, path: str) -> None:
    """The first batch's handler removes (or adds) "note" while the reader is held up
    within the transaction (batches of 10, one queued): the transaction under way
    brings every one of its note rows (or none), the next one none (or its row)."""
    admin.execute(SCHEMA)
    changer = Events()
    state: dict[str, Any] = {}

    @changer.on_insert("item")
    async def first(items: list[Event]) -> None:
        if "done" not in state:
            state["done"] = True
            config = state["app"].config
            if change == "remove":
                config.remove("subscriptions", "note")
            else:
                config.add("subscriptions", ["note"])

    before = ["item", "note"] if change == "remove" else ["item"]
    options: dict[str, Any] = {"message_middleware": hand_on} if path == "python" else {}

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=before, modules=[changer], batch_size=10,
                              max_pending_transactions=1, **options) as rec:
            app = rec.app
            assert app is not None
            state["app"] = app
            admin.execute(BIG)
            admin.execute("INSERT INTO note VALUES (0); INSERT INTO item VALUES (0)")
            await until(lambda: bool(rec.events) and rec.events[-1].name == "item"
                        and rec.events[-1].new_record["id"] == 0, "the end marker", timeout=30)
            assert app.pipeline.compiled_path is (path == "compiled")
            await until(lambda: app.ack.flushed >= parse_lsn(rec.events[-1].lsn), "the ack")
            return list(rec.events)

    events = run(main())
    assert state.get("done")
    items = [e.new_record["id"] for e in events if e.name == "item"]
    notes = [e.new_record["id"] for e in events if e.name == "note"]
    assert items == [*range(1, ROWS + 1), 0]
    # the big transaction under the old subscriptions, whole; the next under the new
    expected = list(range(1, ROWS + 1)) if change == "remove" else [0]
    assert notes == expected, (
        f"{len([n for n in notes if n])} of the {ROWS} note rows of the transaction under "
        f"way delivered; expected {len([n for n in expected if n])} (and the next: "
        f"{0 in expected})")


def test_subscription_removed_while_a_transaction_streams(admin: psycopg.Connection,
                                                          dsn: str) -> None:
    """streaming=True: "note" removed while an open transaction is streamed (its first
    chunks received, more to come): all its note rows are delivered at its commit."""
    admin.execute(SCHEMA)
    admin.execute(sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(
        sql.Identifier(admin.info.dbname)))
    half = 3000

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["item", "note"], streaming=True) as rec:
            app = rec.app
            assert app is not None
            with psycopg.connect(dsn) as writer:
                writer.execute(f"INSERT INTO note SELECT g FROM generate_series(1, {half}) g")
                writer.execute(f"INSERT INTO item SELECT g FROM generate_series(1, {half}) g")
                await until(lambda: bool(app.pipeline.assembler._streams), "a stream open")
                app.config.remove("subscriptions", "note")
                writer.execute(f"INSERT INTO note SELECT g FROM generate_series({half + 1}, "
                               f"{2 * half}) g")
                writer.commit()
            admin.execute("INSERT INTO note VALUES (0); INSERT INTO item VALUES (0)")
            await until(lambda: bool(rec.events) and rec.events[-1].name == "item"
                        and rec.events[-1].new_record["id"] == 0, "the end marker", timeout=30)
            return list(rec.events)

    events = run(main())
    notes = [e.new_record["id"] for e in events if e.name == "note"]
    assert notes == list(range(1, 2 * half + 1)), (
        f"{len(notes)} of the {2 * half} note rows of the streamed transaction delivered")


@pytest.mark.parametrize("window", [0, 64])
def test_module_removed_mid_transaction_applies_from_the_next(
        admin: psycopg.Connection, dsn: str, window: int, request: pytest.FixtureRequest) -> None:
    """The first batch's handler removes the module whose handler takes "note" while the
    transaction's later batches wait: that handler still gets every note row of it
    (without destinations, and relaying to Redis with a window of 64)."""
    options: dict[str, Any] = {}
    if window:
        prefix = request.getfixturevalue("stream")
        options = {"destination_window": window, "destinations": [
            f"redis://127.0.0.1:6379/0?stream={prefix}:{{table}}&timeout=5"]}
    admin.execute(SCHEMA)
    changer, notes_module = Events(), Events()
    state: dict[str, Any] = {}
    noted: list[int] = []

    @changer.on_insert("item")
    async def first(items: list[Event]) -> None:
        if "done" not in state:
            state["done"] = True
            state["app"].config.remove("modules", notes_module)

    @notes_module.on_insert("note")
    async def note(events: list[Event]) -> None:
        noted.extend(e.new_record["id"] for e in events)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item", "note"],
                              modules=[changer, notes_module], batch_size=10,
                              max_pending_transactions=1, **options) as rec:
            app = rec.app
            assert app is not None
            state["app"] = app
            admin.execute(BIG)
            admin.execute("INSERT INTO note VALUES (0); INSERT INTO item VALUES (0)")
            await until(lambda: bool(rec.events) and rec.events[-1].name == "item"
                        and rec.events[-1].new_record["id"] == 0, "the end marker", timeout=30)
            assert (app.pipeline.window is not None) is bool(window)

    run(main())
    assert noted == list(range(1, ROWS + 1)), (
        f"the removed module's handler got {len(noted)} of the {ROWS} note rows of the "
        "transaction under way")
