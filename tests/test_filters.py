"""Handler filters: what each keeps on real events, how they combine, and their validation.

Concern: the keyword filters of every ``Events`` decorator
(``unwatched_records``, ``unwatched_fields``, ``columns_changed``,
``where``), checked against events streamed from PostgreSQL, combined with
AND, and refused in the wrong shape when the handler is registered. Covers the
fixes of the original's bugs: an empty ``unwatched_records`` drops nothing;
``unwatched_fields`` keeps updates of tables without ``REPLICA IDENTITY
FULL``; filters in the wrong shape raise instead of being ignored. A ``where``
predicate that raises follows the app's error policy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest
from support import Recorder, collecting, run, until

from walex import Change, ConfigError, Event, Events, EventType, HandlerError, Source

SCHEMA = """
CREATE TABLE "user" (
    id int PRIMARY KEY, name text, email text,
    event_subscribe bool NOT NULL DEFAULT true, updated_at int NOT NULL DEFAULT 0
);
ALTER TABLE "user" REPLICA IDENTITY FULL;
CREATE TABLE plain (id int PRIMARY KEY, name text, updated_at int NOT NULL DEFAULT 0);
CREATE SCHEMA other;
CREATE TABLE other.plain (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE "user", plain, other.plain;
"""


async def handled(rec: Recorder, transactions: int) -> None:
    """Wait until the app finished dispatching ``transactions`` transactions."""
    assert rec.app is not None
    await until(lambda: rec.app.transactions_handled >= transactions,  # type: ignore[union-attr]
                f"{transactions} transactions handled")
    assert rec.app.transactions_handled == transactions


def summary(calls: list[list[Event]]) -> list[list[tuple[str, str, int]]]:
    """Each call as [(type, table, id), ...]."""
    return [[(e.type.value, e.name, (e.new_record or e.old_record or {}).get("id")) for e in c]
            for c in calls]


def test_unwatched_records_drops_matching_records(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    rec, events = Recorder(), Events()
    events.on_event("user", unwatched_records={"event_subscribe": False})(rec.handler("kept"))
    events.on_event("user", unwatched_records={"event_subscribe": False, "name": "b"})(
        rec.handler("both_pairs")
    )

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("""INSERT INTO "user" (id, name, event_subscribe)
                             VALUES (1, 'a', true), (2, 'b', false), (3, 'c', false)""")
            admin.execute("""UPDATE "user" SET name = name || '2' WHERE id IN (1, 2)""")
            admin.execute("""DELETE FROM "user" WHERE id IN (1, 2)""")  # old record decides
            await rec.wait_for(3 + 2 + 2)
            await handled(rec, 3)
        assert summary(rec.calls_of("kept")) == [
            [("insert", "user", 1)], [("update", "user", 1)], [("delete", "user", 1)],
        ]
        # both pairs must match to drop: only (2, 'b', false) did, and only before its rename
        assert summary(rec.calls_of("both_pairs")) == [
            [("insert", "user", 1), ("insert", "user", 3)],
            [("update", "user", 1), ("update", "user", 2)],
            [("delete", "user", 1), ("delete", "user", 2)],
        ]

    run(main())


def test_empty_unwatched_records_drops_nothing(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    rec, events = Recorder(), Events()
    events.on_event("user", unwatched_records={})(rec.handler("empty"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("""INSERT INTO "user" (id, name) VALUES (1, 'a')""")
            admin.execute("""UPDATE "user" SET name = 'b'""")
            admin.execute("""DELETE FROM "user\"""")
            admin.execute("""TRUNCATE "user\"""")
            await rec.wait_for(4)
            await handled(rec, 4)
        assert summary(rec.calls_of("empty")) == [
            [("insert", "user", 1)], [("update", "user", 1)], [("delete", "user", 1)],
            [("truncate", "user", None)],
        ]

    run(main())


def test_unwatched_fields_with_and_without_full_identity(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    admin.execute("""INSERT INTO "user" (id, name) VALUES (1, 'a'); INSERT INTO plain VALUES (1, 'a')""")
    rec, events = Recorder(), Events()
    events.on_event("user", unwatched_fields=["updated_at"])(rec.handler("user"))
    events.on_update("plain", unwatched_fields=["updated_at"])(rec.handler("plain"))
    events.on_update("user", unwatched_fields=[])(rec.handler("empty"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("""UPDATE "user" SET updated_at = 1""")  # only unwatched: dropped
            admin.execute("""UPDATE "user" SET name = 'b', updated_at = 2""")  # kept
            admin.execute("""UPDATE "user" SET name = name""")  # changed nothing: dropped
            admin.execute("""INSERT INTO "user" (id, name) VALUES (2, 'x')""")  # not an update
            # no FULL identity: the old values are unknown, so the update is kept
            admin.execute("UPDATE plain SET updated_at = 1")
            await rec.wait_for(5)
            await handled(rec, 5)
        user_calls = rec.calls_of("user")
        assert summary(user_calls) == [[("update", "user", 1)], [("insert", "user", 2)]]
        assert set(user_calls[0][0].changes or {}) == {"name", "updated_at"}
        [[plain]] = rec.calls_of("plain")
        assert (plain.changes, plain.new_record) == (None, {"id": 1, "name": "a", "updated_at": 1})
        # an empty list drops nothing, not even the update that changed nothing
        assert summary(rec.calls_of("empty")) == [[("update", "user", 1)]] * 3

    run(main())


def test_columns_changed_keeps_updates_of_those_columns(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    admin.execute("""INSERT INTO "user" (id, name, email) VALUES (1, 'a', 'a@x');
                     INSERT INTO plain VALUES (1, 'a')""")
    rec, events = Recorder(), Events()
    events.on_event("user", columns_changed=["email", "event_subscribe"])(rec.handler("user"))
    events.on_update("plain", columns_changed=["name"])(rec.handler("plain"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("""UPDATE "user" SET name = 'b'""")  # dropped
            admin.execute("""UPDATE "user" SET email = 'b@x'""")  # kept
            admin.execute("""UPDATE "user" SET event_subscribe = false, name = 'c'""")  # kept
            admin.execute("""DELETE FROM "user\"""")  # not an update: kept
            admin.execute("UPDATE plain SET updated_at = 5")  # old values unknown: kept
            await rec.wait_for(5)
            await handled(rec, 5)
        user_calls = rec.calls_of("user")
        assert summary(user_calls) == [[("update", "user", 1)], [("update", "user", 1)],
                                       [("delete", "user", 1)]]
        assert [set(c[0].changes or {}) for c in user_calls[:2]] == [
            {"email"}, {"event_subscribe", "name"},
        ]
        assert summary(rec.calls_of("plain")) == [[("update", "plain", 1)]]

    run(main())


def test_where_and_filters_combined_with_and(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    admin.execute("""INSERT INTO "user" (id, name, event_subscribe)
                     SELECT g, 'n' || g, g % 3 <> 0 FROM generate_series(1, 9) g""")
    rec, events = Recorder(), Events()
    events.on_insert("user", where=lambda e: e.new_record["id"] % 2 == 0)(rec.handler("even"))
    events.on_update(
        "user",
        unwatched_records={"event_subscribe": False},  # drops ids 3, 6, 9
        columns_changed=["name"],  # drops the updates of updated_at only
        where=lambda e: e.new_record["id"] > 1,  # drops id 1
    )(rec.handler("combined"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("""INSERT INTO "user" (id, name)
                             SELECT g, 'n' FROM generate_series(10, 15) g""")
            admin.execute("""UPDATE "user" SET name = 'm' WHERE id <= 6""")
            admin.execute("""UPDATE "user" SET updated_at = 1 WHERE id > 6 AND id <= 9""")
            await rec.wait_for(6 + 6 + 3)
            await handled(rec, 3)
        assert summary(rec.calls_of("even")) == [[("insert", "user", i) for i in (10, 12, 14)]]
        assert summary(rec.calls_of("combined")) == [[("update", "user", i) for i in (2, 4, 5)]]

    run(main())


def test_handler_table_with_schema(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    rec, events = Recorder(), Events()
    events.on_insert("other.plain")(rec.handler("other"))
    events.on_insert("public.plain")(rec.handler("public"))
    events.on_insert("plain")(rec.handler("any_schema"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("INSERT INTO plain VALUES (1); INSERT INTO other.plain VALUES (2)")
            await rec.wait_for(2)
            await handled(rec, 1)
        tables = {label: [[e.table for e in c] for c in rec.calls_of(label)]
                  for label in ("other", "public", "any_schema")}
        assert tables == {"other": [["other.plain"]], "public": [["public.plain"]],
                          "any_schema": [["public.plain", "other.plain"]]}

    run(main())


# -- validation at decoration time -------------------------------------------------

DECORATORS = ["on_event", "on_insert", "on_update", "on_delete", "on_truncate"]


def _noop(events: list[Event]) -> None:
    pass


@pytest.mark.parametrize("decorator", DECORATORS)
def test_every_decorator_takes_every_filter(decorator: str) -> None:
    events = Events()
    getattr(events, decorator)(
        "user", unwatched_records={"a": 1}, unwatched_fields=["b"], columns_changed=["c"],
        where=lambda e: True, functions=[print],
    )(_noop)
    [handler] = events.handlers
    assert (handler.table, len(handler.filters), handler.functions) == ("user", 4, [print])


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"unwatched_records": ["event_subscribe"]}, "unwatched_records must be a mapping"),
    ({"unwatched_records": "event_subscribe"}, "unwatched_records must be a mapping"),
    ({"unwatched_records": {1: False}}, "unwatched_records must be a mapping"),
    ({"unwatched_fields": "updated_at"}, "unwatched_fields must be a list of column names"),
    ({"unwatched_fields": 5}, "unwatched_fields must be a list of column names"),
    ({"unwatched_fields": [1]}, "unwatched_fields must be a list of column names"),
    ({"unwatched_fields": {"updated_at": 1}}, "unwatched_fields must be a list of column names"),
    ({"columns_changed": "email"}, "columns_changed must be a list of column names"),
    ({"columns_changed": []}, "columns_changed needs at least one column name"),
    ({"where": "id > 1"}, "where must be a callable"),
    ({"where": True}, "where must be a callable"),
    ({"functions": print}, "functions must be a list of callables"),
    ({"functions": [print, "f"]}, "functions must be callables"),
    ({"functions": "print"}, "functions must be a list of callables"),
    ({"unwatched_field": ["updated_at"]}, "unknown handler option unwatched_field; the options are"),
    ({"filters": {}, "fields": []}, "unknown handler options fields, filters"),
]


@pytest.mark.parametrize("decorator", DECORATORS)
@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS,
                         ids=[f"{next(iter(o))}-{i}" for i, (o, _) in enumerate(BAD_OPTIONS)])
def test_wrong_filter_shape_raises_at_decoration(decorator: str, options: dict[str, Any],
                                                 message: str) -> None:
    events = Events()
    with pytest.raises(ConfigError) as info:
        getattr(events, decorator)("user", **options)(_noop)
    assert message in str(info.value)
    assert events.handlers == []


def test_register_checks_like_the_decorators() -> None:
    events = Events()
    with pytest.raises(ConfigError, match="types must be among"):
        events.register(_noop, "user", types=["upsert"])
    with pytest.raises(ConfigError, match="table must be a table name"):
        events.register(_noop, "")
    with pytest.raises(ConfigError, match="a handler must be callable"):
        events.register("not callable", "user")  # type: ignore[arg-type]
    assert events.handlers == []


# -- a filter that raises --------------------------------------------------------------

def raising_where(seen: list[Event]) -> Callable[[Event], bool]:
    """A predicate recording what it saw and raising on the record of id 2."""

    def where(event: Event) -> bool:
        seen.append(event)
        if event.new_record["id"] == 2:
            raise KeyError("no such thing")
        return True

    return where


def test_raising_where_stops_the_app_under_stop(admin: psycopg.Connection, dsn: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    admin.execute(SCHEMA)
    rec, events, seen = Recorder(), Events(), []
    events.on_insert("user", where=raising_where(seen))(rec.handler("where"))

    async def main() -> None:
        with pytest.raises(HandlerError) as info:
            async with collecting(dsn, modules=[events], recorder=rec, on_error="stop"):
                admin.execute("""INSERT INTO "user" (id) VALUES (1), (2)""")
                await rec.wait_for(2)
        message = str(info.value)
        assert "a filter of handler" in message and "KeyError('no such thing')" in message
        assert [e.new_record["id"] for e in seen] == [1, 2]
        assert seen[1].id in message
        # nothing of the transaction was handled, and it was not acknowledged
        assert rec.calls == []
        assert rec.app is not None and rec.app.ack.flushed < int(seen[1].id.split("-")[0], 16)

    with caplog.at_level(logging.ERROR, logger="walex"):
        run(main())
    assert any(seen[1].id in r.getMessage() for r in caplog.records)


def test_raising_where_under_skip_leaves_the_event_out(admin: psycopg.Connection, dsn: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    admin.execute(SCHEMA)
    rec, events = Recorder(), Events()
    events.on_insert("user", where=raising_where([]))(rec.handler("where"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec, on_error="skip"):
            admin.execute("""INSERT INTO "user" (id) VALUES (1), (2), (3)""")
            admin.execute("""INSERT INTO "user" (id) VALUES (4)""")
            await rec.wait_for(4)
            await handled(rec, 2)
            assert rec.app is not None and rec.app.dispatcher.failures == 1
        assert summary(rec.calls_of("where")) == [
            [("insert", "user", 1), ("insert", "user", 3)], [("insert", "user", 4)],
        ]

    with caplog.at_level(logging.ERROR, logger="walex"):
        run(main())
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and rec.events[1].id in skipped[0]


def test_column_lists_may_be_any_iterable() -> None:
    events = Events()
    events.on_update("user", unwatched_fields=(c for c in ["updated_at"]))(_noop)
    [handler] = events.handlers

    def update(changed: str) -> Event:
        return Event("user", EventType.UPDATE, Source("db", "public", "user"), {"id": 1},
                     {"id": 1}, {changed: Change(0, 1)}, datetime.now(timezone.utc), "0/1",
                     "0000000000000001-00000000")

    # the generator was read once, not emptied by the check of its items
    assert [handler.passes(update("updated_at")), handler.passes(update("name"))] == [False, True]
