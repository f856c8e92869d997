"""What the subscriptions reach, said out loud.

Concern: a handler for a table that no subscription covers (or, at start,
that matches no published table) is warned about at start and when the
configuration changes at runtime, once per handler; a table renamed while
the app runs is no longer matched by its old name, and the log says so
(subscriptions and handler tables are names; see walex.subscriptions). The
runtime check of an added subscription is in test_runtime_config.py.
"""

from __future__ import annotations

import psycopg
import pytest
from support import collecting, run, until

from walex import Event, Events

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE TABLE note (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item, note;
"""


def names(events: list[Event]) -> list[str]:
    return [f"{e.name}{e.new_record['id']}" for e in events]


def handler(name: str) -> object:
    def handle(items: list[Event]) -> None:
        pass

    handle.__qualname__ = name
    return handle


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_handlers_that_cannot_fire_are_warned_about(
    admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute(SCHEMA)
    events, later = Events(), Events()
    for table in ("items", "item", "public.item", "other.item", "note", "all"):
        events.on_insert(table)(handler(f"new_{table.replace('.', '_')}"))
    later.on_update("notes")(handler("changed_notes"))

    async def main() -> list[list[str]]:
        seen = []
        with caplog.at_level("WARNING", logger="walex"):
            async with collecting(dsn, subscriptions=["item", "note"], modules=[events],
                                  name="reach") as rec:
                app = rec.app
                assert app is not None
                seen.append(warnings(caplog))
                caplog.clear()
                app.config.remove("subscriptions", "note")  # the handler for note cannot fire
                app.config.add("modules", [later])
                app.config.replace("max_retries", 1)  # still unreachable: said once only
                seen.append(warnings(caplog))
                caplog.clear()
            async with collecting(dsn, subscriptions=["*"], modules=[events, later]):
                seen.append(warnings(caplog))
        return seen

    at_start, at_runtime, with_all = run(main())
    assert at_start == [
        "walex 'reach': handler new_items (insert of 'items') can never fire: no subscription "
        "covers its table (subscriptions: ['item', 'note']). Fix: subscribe to 'items', or "
        "correct the table name of the handler.",
        "walex 'reach': handler new_other_item (insert of 'other.item') does not fire: no table of the "
        "publication matches it, so it fires only once such a table is published (is the table "
        "name right?)",
    ]
    assert [w.split(" can never fire")[0] for w in at_runtime] == [
        "walex 'reach': handler new_note (insert of 'note')",
        "walex 'reach': handler changed_notes (update of 'notes')",
    ]
    assert all("(subscriptions: ['item'])" in w for w in at_runtime)
    assert [w.split(": ", 1)[1].split(" does not fire")[0] for w in with_all] == [
        "handler new_items (insert of 'items')",
        "handler new_other_item (insert of 'other.item')",
        "handler changed_notes (update of 'notes')",
    ]


def test_table_renamed_while_running_is_reported(
    admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute(SCHEMA)
    oid = admin.execute("SELECT 'item'::regclass::oid").fetchone()[0]  # type: ignore[index]

    async def main(subscriptions: list[str]) -> list[Event]:
        events = Events()
        events.on_insert("item")(handler("new_item"))
        with caplog.at_level("INFO", logger="walex"):
            async with collecting(dsn, subscriptions=subscriptions, modules=[events]) as rec:
                admin.execute("INSERT INTO item VALUES (1)")
                await rec.wait_for(1)
                admin.execute("ALTER TABLE item RENAME TO thing")
                admin.execute("INSERT INTO thing VALUES (2)")
                admin.execute("INSERT INTO note VALUES (1)")
                await until(lambda: any(e.name == "note" for e in rec.events), "the note")
                return list(rec.events)

    received = run(main(["item", "note"]))
    assert names(received) == ["item1", "note1"]  # subscriptions follow names, as at start
    [warning] = warnings(caplog)
    assert (f"table public.item (relation id {oid}) is now named public.thing: subscriptions "
            "['item', 'note'] do not name it any more, so its changes are not delivered from "
            "here on") in warning
    assert "Fix: subscribe to 'public.thing'" in warning
    caplog.clear()

    admin.execute("ALTER TABLE thing RENAME TO item; TRUNCATE item, note")
    received = run(main(["*"]))
    assert names(received) == ["item1", "thing2", "note1"]
    [warning] = warnings(caplog)
    assert (f"table public.item (relation id {oid}) is now named public.thing: it is still "
            "subscribed, but handler new_item (insert of 'item') no longer matches it") in warning
