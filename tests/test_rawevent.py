"""Rows kept as sent and typed when read (walex.rawevent): the same Events.

With ``raw_rows`` either hot path (each test runs on both) hands on
:class:`RawEvent` s for rows PostgreSQL sent whole as text; reading their records types them with the
rules of walex.rows. Two apps stream the same changes from two slots, one
with raw rows and one typed, and every field of every event must agree, over
the type matrix, the edge values Python cannot hold, replica identities and
unchanged TOAST values (which stay typed Events). An app with destinations
keeps raw rows by default for the tables no handler takes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import psycopg
import pytest
from support import collecting, run
from test_types import ROW_VALUES, same
from test_types import SCHEMA as MATRIX_SCHEMA
from workers.test_edge_values import SCHEMA as EDGE_SCHEMA
from workers.test_edge_values import rows as edge_rows

from walex import Events, WalEx
from walex.event import Event
from walex.hotpath import compiled_available
from walex.rawevent import RawEvent
from walex.rawrow import pack_row, row_values



@pytest.fixture(autouse=True, params=["compiled", "pure"])
def hot_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test on both hot paths: the compiled one (walex._hotpath) and the pure-Python
    one (walex.transactions with walex.rawevent.change_event), which make the same
    RawEvents."""
    if request.param == "compiled":
        if not compiled_available() or os.environ.get("WALEX_PURE_PYTHON"):
            pytest.skip("walex._hotpath not built, or the pure-Python path forced")
    else:
        monkeypatch.setenv("WALEX_PURE_PYTHON", "1")
    return request.param

_FIELDS = ("name", "type", "source", "timestamp", "lsn", "id")


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, tuple) and isinstance(b, tuple) and type(a) is type(b) and len(a) == len(b):
        return all(_same_value(x, y) for x, y in zip(a, b))
    return same(a, b) and type(a) is type(b)


def _has_nan(value: Any) -> bool:
    """Whether a value holds a NaN anywhere (never equal to itself: such events compare
    unequal, as two typed Events with it do)."""
    if isinstance(value, Event):
        return _has_nan((value.new_record, value.old_record))
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    try:
        return value != value  # float('nan'), Decimal('NaN')
    except Exception:  # a value that will not compare (Decimal sNaN): as a NaN
        return True


def assert_same_events(raw: list[Event], typed: list[Event]) -> None:
    assert len(raw) == len(typed)
    for r, t in zip(raw, typed):
        assert type(t) is Event
        # equal as Events (rows compared by ==: NaN aside) on either side of ==, in raw form
        same_slot = dataclasses.replace(t, timestamp=r.timestamp, lsn=r.lsn, id=r.id)
        if not _has_nan(t):
            assert r == same_slot and same_slot == r and not (r != same_slot)
        for name in _FIELDS:
            if name not in ("timestamp", "lsn", "id"):  # the slots differ: LSNs are the same
                assert getattr(r, name) == getattr(t, name), name
        for name in ("new_record", "old_record"):
            a, b = getattr(r, name), getattr(t, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert _same_value(a, b), f"{r.type} {name}:\n{a}\n{b}"
        if t.changes is None:
            assert r.changes is None
        else:
            assert list(r.changes) == list(t.changes)
            for col in t.changes:
                assert _same_value(r.changes[col].old_value, t.changes[col].old_value), col
                assert _same_value(r.changes[col].new_value, t.changes[col].new_value), col


async def _both(dsn: str, statements: list[str], admin: psycopg.Connection, count: int,
                **options: Any) -> tuple[list[Event], list[bool], list[Event]]:
    """The events of the same changes through a raw-rows app and a typed one, and whether
    each raw one still held its rows untyped when its handler got it."""
    async with collecting(dsn, raw_rows=True, **options) as raw, \
            collecting(dsn, raw_rows=False, **options) as typed:
        for statement in statements:
            admin.execute(statement)
        raw_events = await raw.wait_for(count)
        untyped = [type(e) is RawEvent and e.raw is not None for e in raw_events]
        return raw_events, untyped, await typed.wait_for(count)


def test_type_matrix_raw_rows_type_as_the_typed_path(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(MATRIX_SCHEMA)
    admin.execute("ALTER TABLE typed REPLICA IDENTITY FULL")
    statements = [
        f"INSERT INTO typed VALUES {ROW_VALUES}",
        "UPDATE typed SET c_int4 = 5, c_bytea = '\\x01', c_float8 = 'NaN' WHERE id IN (1, 2)",
        "UPDATE typed SET c_text = c_text WHERE id = 3",  # no change at all
        "DELETE FROM typed WHERE id = 4",
    ]
    raw, untyped, typed = run(_both(dsn, statements, admin, 9, subscriptions=["typed"]))
    assert all(untyped), untyped
    assert_same_events(raw, typed)


def test_edge_values_raw_rows_type_as_the_typed_path(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EDGE_SCHEMA)
    statements = edge_rows(admin) + ["UPDATE edge SET c_date = c_date"]
    count = len(statements) - 1 + 7
    raw, untyped, typed = run(_both(dsn, statements, admin, count, subscriptions=["edge"]))
    assert any(untyped)
    assert_same_events(raw, typed)


IDENTITIES = """
CREATE TABLE d (id int PRIMARY KEY, b text, n numeric);
CREATE TABLE f (id int PRIMARY KEY, b text, n numeric);
ALTER TABLE f REPLICA IDENTITY FULL;
CREATE TABLE k (a int NOT NULL, b text NOT NULL, c text);
CREATE UNIQUE INDEX k_ab ON k (b, a);
ALTER TABLE k REPLICA IDENTITY USING INDEX k_ab;
CREATE TABLE doc (id int PRIMARY KEY, body text, n int);
ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE PUBLICATION pub FOR TABLE d, f, k, doc;
"""


def test_replica_identities_and_toast(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(IDENTITIES)
    statements = []
    for table in ("d", "f"):
        statements += [f"INSERT INTO {table} VALUES (1, 'x', 1.5), (2, NULL, NULL)",
                       f"UPDATE {table} SET b = 'y' WHERE id = 1",
                       f"UPDATE {table} SET id = 3 WHERE id = 2",
                       f"DELETE FROM {table} WHERE id = 1"]
    statements += ["INSERT INTO k VALUES (1, 'a', 'c')", "UPDATE k SET c = 'd'",
                   "UPDATE k SET a = 2", "DELETE FROM k",
                   "INSERT INTO doc VALUES (1, repeat('toast ', 4000), 1)",
                   "UPDATE doc SET n = 2",  # body not resent: an unchanged TOAST value
                   "DELETE FROM doc"]
    raw, untyped, typed = run(_both(dsn, statements, admin, 2 * 5 + 4 + 3))
    assert_same_events(raw, typed)
    assert untyped[:14] == [True] * 14
    assert untyped[14:] == [True, False, True]  # the update with an unchanged TOAST value


def test_a_raw_row_is_the_tuple_data_postgresql_sent(admin: psycopg.Connection, dsn: str) -> None:
    """Each row a RawEvent keeps is one bytes object, the row's TupleData as PostgreSQL sent
    it (walex.rawrow: what ``pack_row`` gives of its values), the same on both hot paths,
    NULLs and a row of 70 columns included; a row with an unchanged TOAST value is typed."""
    wide = ", ".join(f"c{i} text" for i in range(70))
    admin.execute(IDENTITIES + f"CREATE TABLE wide (id int PRIMARY KEY, {wide});"
                  "ALTER TABLE wide REPLICA IDENTITY FULL; ALTER PUBLICATION pub ADD TABLE wide")
    values = ", ".join("NULL" if i % 7 == 3 else f"'v{i}'" for i in range(70))
    statements = ["INSERT INTO f VALUES (1, 'x', 1.5), (2, NULL, NULL)",
                  "UPDATE f SET b = 'y' WHERE id = 1",
                  "DELETE FROM f WHERE id = 2",
                  "INSERT INTO doc VALUES (1, repeat('toast ', 4000), 1)",
                  "UPDATE doc SET n = 2",  # body not resent: an unchanged TOAST value
                  f"INSERT INTO wide VALUES (1, {values})",
                  "UPDATE wide SET c3 = 'set', c4 = NULL"]
    seen: list[Any] = []
    events = Events()

    @events.on_event("all")
    async def keep(batch: list[Event]) -> None:  # the rows as the handler gets them
        seen.extend((e.raw[1], e.raw[2]) if type(e) is RawEvent and e.raw is not None else None
                    for e in batch)

    async def main() -> None:
        async with collecting(dsn, raw_rows=True, modules=[events],
                              subscriptions=["f", "doc", "wide"]) as rec:
            for statement in statements:
                admin.execute(statement)
            await rec.wait_for(8)

    run(main())
    assert [pair is not None for pair in seen] == [True] * 5 + [False, True, True]
    rows = [pair for pair in seen if pair is not None]
    assert rows[:3] == [(pack_row((b"1", b"x", b"1.5")), None),
                        (pack_row((b"2", None, None)), None),
                        (pack_row((b"1", b"y", b"1.5")), pack_row((b"1", b"x", b"1.5")))]
    assert rows[3] == (None, pack_row((b"2", None, None)))
    wide_new = tuple(None if i % 7 == 3 else f"v{i}".encode() for i in range(70))
    assert rows[5][0] == pack_row((b"1",) + wide_new)
    updated = (b"1",) + wide_new[:3] + (b"set", None) + wide_new[5:]
    assert rows[6] == (pack_row(updated), pack_row((b"1",) + wide_new))
    assert all(row_values(row) == tuple(row_values(row)) and pack_row(row_values(row)) == row
               for pair in rows for row in pair if row is not None)


def test_raw_rows_by_default_for_the_tables_no_handler_takes_in_an_app_that_relays(
        dsn: str) -> None:
    def raw(table: str, *handled: str, **options: Any) -> bool:
        events = Events()
        for name in handled:
            events.on_event(name)(_nothing)
        app = WalEx(dsn, publication="pub", modules=[events], **options)
        return app.pipeline._is_raw("public", table)

    relay = {"destinations": ["redis://127.0.0.1:9/0?stream=x"]}
    assert raw("t", **relay) is True
    assert raw("t", "other", **relay) is True  # a handler of another table only
    assert raw("t", "t", **relay) is False  # a handler would type them anyway
    assert raw("t", "all", **relay) is False
    assert raw("t", **relay, raw_rows=False) is False
    assert raw("t") is False  # no destination
    assert raw("t", "t", raw_rows=True) is True


async def _nothing(batch: list[Event]) -> None:
    pass


def test_a_raw_event_typed_by_threads_at_once_and_replaced() -> None:
    """Several threads reading one RawEvent's rows at once all get them (typed once or more,
    never a failure), and ``dataclasses.replace`` gives an event the encoder and the sizer
    take as typed."""
    import dataclasses
    import threading

    from walex.event import EventType, Source
    from walex.sizes import event_bytes

    source = Source(db="d", schema="s", table="t", columns={"id": "int4", "b": "text"},
                    primary_key=("id",))

    class Slow:  # a Table's face: what walex.rows reads of one
        relation_id, name = 1, "t"
        column_names = ["id", "b"]
        key_indexes = [0]

        def load(self, row: Any, tag: str, lsn: int) -> list[Any]:
            import time

            time.sleep(0.01)  # threads overlap while typing
            return [int(row.values[0]), row.values[1].decode()]

    Slow.source = source
    for _ in range(5):
        event = RawEvent.of("t", EventType.UPDATE, source, (Slow(), pack_row((b"1", b"x")),
                                                                 pack_row((b"1", b"y")), "O", 5),
                            None, "0/1", "id1")
        seen: list[Any] = []
        threads = [threading.Thread(target=lambda: seen.append(event.changes)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [dict(c) for c in seen] == [{"b": ("y", "x")}] * 4
        assert event.raw is None and event.new_record == {"id": 1, "b": "x"}
    fresh = RawEvent.of("t", EventType.INSERT, source, (Slow(), pack_row((b"2", b"z")), None, "", 5),
                        None, "0/1", "id2")
    copy = dataclasses.replace(fresh, id="id3")
    assert type(copy) is RawEvent and copy.raw is None and copy.new_record == {"id": 2, "b": "z"}
    assert event_bytes(copy) > 0
