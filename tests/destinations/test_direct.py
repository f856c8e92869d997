"""The direct encoder writes, from the text PostgreSQL sent, the reference's bytes.

RawEvents are made of what a real PostgreSQL sent: each test runs its statements
with a pgoutput slot, peeks the slot's messages in a session with the
replication session's settings (DateStyle=ISO, IntervalStyle=postgres,
extra_float_digits=3, TimeZone=UTC), decodes them and makes the Tables from
the Relation messages as the reader does (a RelationCache over a TypeCatalog
with a lookup connection), and a RawEvent of each change (what the compiled hot
path builds for a relay). Each RawEvent goes through both twins of the direct
encoder (pure Python and ``walex.destinations._direct``), which must give
``encode_event_reference(event.typed())`` field for field and byte for byte, or
leave the event ("unfit"); through ``encode_event`` and ``encode`` (every
path, the RawEvent left untyped); and ordinary rows must take the direct way.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.types.numeric import FloatLoader
from destinations.test_encoding_paths import PLAIN_ROWS, PLAIN_SCHEMA
from test_types import MORE_BUILTINS, ROW_VALUES
from test_types import SCHEMA as MATRIX_SCHEMA
from workers.test_edge_values import SCHEMA as EDGE_SCHEMA
from workers.test_edge_values import rows as edge_rows

from support import collecting, run

from walex import Event, EventType
from walex.destinations import direct, encoding
from walex.destinations.encoding import encode, encode_event, encode_event_reference
from walex.lookups import LookupConnection
from walex.lsn import format_lsn
from walex.pgoutput import Decoder, Relation, Type
from walex.pgoutput import messages as m
from walex.pgtypes import TypeCatalog
from walex.rawevent import RawEvent
from walex.rawrow import pack_row, row_values
from walex.relations import RelationCache

TWINS = [direct.py_direct_event] + ([direct.compiled_direct_event]
                                    if direct.compiled_direct_event is not None else [])
SESSION = ("SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; "
           "SET TimeZone = 'UTC'")
COMMIT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def test_the_compiled_twin_serves_unless_pure_python_is_asked_for() -> None:
    if direct.compiled_direct_event is None:
        pytest.skip("walex.destinations._direct not built")
    expected = direct.py_direct_event if os.environ.get("WALEX_PURE_PYTHON") \
        else direct.compiled_direct_event
    assert direct.direct_event is expected
    # walex._encode calls the compiled one as a C function, and only when it serves
    assert (encoding.direct_c_entry is not None) == (expected is direct.compiled_direct_event)


def test_the_default_loaders_are_psycopgs_defaults() -> None:
    """The loader classes that go direct, found registering only the modules of psycopg
    that load those types (cheaper at import), are what all of psycopg's default
    adapters give (a user's loader, registered in psycopg.adapters, is never among them)."""
    from psycopg import postgres

    assert direct._DEFAULTS == direct._defaults(postgres.register_default_adapters)
    assert len(set(direct._DEFAULTS.values())) == 8  # every writer but json, jsonb, generic


def slot(admin: psycopg.Connection) -> None:
    admin.execute("SELECT pg_create_logical_replication_slot('direct', 'pgoutput')")


def raw_events(admin: psycopg.Connection, dsn: str) -> list[RawEvent]:
    """A RawEvent of each change the slot holds (rows with a value not sent as text are
    left out: the hot path builds RawEvents of whole text rows only)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SESSION)
        found = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('direct', NULL, "
            "NULL, 'proto_version', '1', 'publication_names', 'pub')").fetchall()
    stream = [(int(lsn.split("/")[0], 16) << 32 | int(lsn.split("/")[1], 16), bytes(data))
              for lsn, data in found]

    out: list[RawEvent] = []

    async def main() -> None:  # returns nothing: asyncio's debug mode would repr (type) them
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            lookups = LookupConnection()
            lookups.use(conn, None, None)
            catalog = TypeCatalog(lookups)
            relations = RelationCache(catalog, "db", lambda schema, table: True)
            decoder = Decoder()
            for lsn, payload in stream:
                msg = decoder.decode(payload, lsn)
                if type(msg) is Relation:
                    await relations.update(msg)
                elif type(msg) is Type:
                    await catalog.resolve([msg.type_oid])
                elif type(msg) in (m.Insert, m.Update, m.Delete):
                    table = relations.get(msg.relation_id, "test", lsn)
                    new = msg.new.values if type(msg) is not m.Delete else None
                    old = msg.old.values if type(msg) is not m.Insert and msg.old else None
                    if any(type(v) not in (bytes, type(None)) for v in (new or []) + (old or [])):
                        continue
                    kind = {m.Insert: EventType.INSERT, m.Update: EventType.UPDATE,
                            m.Delete: EventType.DELETE}[type(msg)]
                    old_kind = getattr(msg, "old_kind", None) or "" if old is not None else ""
                    raw = (table, None if new is None else pack_row(new),
                           None if old is None else pack_row(old), old_kind, lsn)
                    out.append(RawEvent.of(table.name, kind, table.source, raw, COMMIT,
                                           format_lsn(lsn), f"{lsn:016X}-{len(out):08X}"))

    asyncio.run(main())
    return out


def check(events: list[RawEvent], partitions: tuple[int, ...] = (1, 5)) -> int:
    """Every path gives the reference's Outgoing of each event; the number the direct
    encoder took (the same in both twins)."""
    counts = []
    for twin in TWINS:
        taken = 0
        for parts in partitions:
            for event in events:
                expected = encode_event_reference(event.typed(), parts)
                out = twin(event, parts)
                if out is not None:
                    assert type(out) is encoding.Outgoing
                    assert tuple(out) == tuple(expected), (twin, event.raw, out.body, expected.body)
                    taken += 1
        counts.append(taken)
    assert len(set(counts)) == 1, counts
    for parts in partitions:
        expected = [encode_event_reference(event.typed(), parts) for event in events]
        assert [encode_event(event, parts) for event in events] == expected
        assert encode(events, parts) == expected
        for batch in encoding._encode_events, encoding.compiled_fast_events:
            if batch is not None:
                assert batch(events, parts) == expected
        expected_size = sum(len(o.body) for o in expected)
        for sized in encoding._encode_events_sized, encoding.compiled_fast_events_sized:
            if sized is not None:
                assert sized(events, parts) == (expected, expected_size)
        assert encode_event_reference(events[0], parts) == expected[0] if events else True
    assert all(event.raw is not None for event in events)  # none typed in place
    return counts[0] // len(partitions)


def test_type_matrix(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(MATRIX_SCHEMA)
    slot(admin)
    admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
    admin.execute("UPDATE typed SET c_int4 = 5, c_text = 'changed', c_float8 = 'NaN'")
    admin.execute("UPDATE typed SET c_numeric = c_numeric WHERE id = 1")  # no column changed
    admin.execute("DELETE FROM typed WHERE id = 2")
    admin.execute("ALTER TABLE typed REPLICA IDENTITY DEFAULT")
    admin.execute("UPDATE typed SET id = 10 WHERE id = 1")  # key changed: 'K'
    admin.execute("UPDATE typed SET c_int2 = 3 WHERE id = 10")  # no old row
    admin.execute("DELETE FROM typed WHERE id = 10")
    events = raw_events(admin, dsn)
    assert len(events) == 5 + 5 + 1 + 1 + 3
    assert check(events) == len(events)  # generic columns go through their loaders


def test_more_builtin_types(admin: psycopg.Connection, dsn: str) -> None:
    columns = {f"c{i}": t for i, t in enumerate(MORE_BUILTINS)}
    admin.execute("CREATE TABLE more (id int PRIMARY KEY, "
                  + ", ".join(f"{c} {t}" for c, t in columns.items())
                  + "); CREATE PUBLICATION pub FOR TABLE more")
    slot(admin)
    admin.execute(f"INSERT INTO more VALUES (1, {', '.join(MORE_BUILTINS.values())})")
    admin.execute("INSERT INTO more (id) VALUES (2)")
    assert check(raw_events(admin, dsn)) == 2


def test_values_python_cannot_hold(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EDGE_SCHEMA)
    slot(admin)
    statements = edge_rows(admin)
    for statement in statements:
        admin.execute(statement)
    admin.execute("UPDATE edge SET c_ts = '-infinity', c_d_date = '0001-01-01 BC'")
    admin.execute("DELETE FROM edge WHERE id = 1")
    events = raw_events(admin, dsn)
    assert check(events) == len(events)  # rows typed again with the tolerant loaders, too


EDGE_PLAIN = """
CREATE TABLE edge_plain (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz);
ALTER TABLE edge_plain REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR TABLE edge_plain;
"""


def test_temporal_values_python_cannot_hold_go_direct_as_their_text(
        admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EDGE_PLAIN)
    slot(admin)
    values = [("infinity", "infinity", "infinity"), ("-infinity", "-infinity", "-infinity"),
              ("0044-03-15 BC", "0044-03-15 12:00:00.5 BC", "0044-03-15 12:00:00+00 BC"),
              ("10000-01-01", "10000-01-01 00:00:00", "10000-01-01 00:00:00+00"),
              ("0001-01-01", "0001-01-01 00:00:00.000001", "0001-01-01 00:00:00.1+00"),
              ("9999-12-31", "9999-12-31 23:59:59.999999", "9999-12-31 23:59:59.999999+00"),
              ("0099-01-01", "0099-01-01 00:00:00.12", "0099-01-01 00:00:00+00"),
              ("2024-02-29", "2024-02-29 12:00:00", "2024-02-29 12:00:00+05")]
    for n, row in enumerate(values):
        admin.execute("INSERT INTO edge_plain VALUES (%s, %s, %s, %s)", (n, *row))
    events = raw_events(admin, dsn)
    assert any(b"BC" in (v or b"") for e in events for v in row_values(e.raw[1]))
    assert check(events) == len(values)


def test_bench_columns(admin: psycopg.Connection, dsn: str) -> None:
    """The bench's columns with their edge values (a key beyond 2**53, NaN, BC, infinity,
    10000-01-01, a huge jsonb number): each direct, or left to the typed path (the
    unchanged TOAST update is not a RawEvent at all)."""
    admin.execute(PLAIN_SCHEMA)
    slot(admin)
    admin.execute(f"INSERT INTO plain VALUES {PLAIN_ROWS}")
    admin.execute("UPDATE plain SET a = 7 WHERE id = 5")  # big is not resent
    admin.execute("UPDATE plain SET f = 'Infinity', d = 2 WHERE id = 1")
    admin.execute("UPDATE plain SET id = 6 WHERE id = 1")
    admin.execute("DELETE FROM plain WHERE id = 3")
    admin.execute("DELETE FROM plain WHERE id = 9007199254740993")
    events = raw_events(admin, dsn)
    assert len(events) == 5 + 2 + 2  # the TOAST update is left out
    taken = check(events, (1, 4))
    assert taken >= 7  # all but the huge jsonb number (orjson refuses it: the reference's way)


class _Relabelled(RawEvent):
    """A RawEvent whose id and lsn are properties over Event's slots (the compiled twin
    reads the attributes from the slots where getattr would: here it must not)."""

    __slots__ = ()

    @property  # type: ignore[override]
    def id(self) -> str:
        return "relabelled-" + _EVENT_SLOTS["id"].__get__(self)

    @property  # type: ignore[override]
    def lsn(self) -> str:
        return _EVENT_SLOTS["lsn"].__get__(self) + "-r"


_EVENT_SLOTS = {name: Event.__dict__[name] for name in ("id", "lsn")}


def _relabelled(event: RawEvent) -> _Relabelled:
    out = object.__new__(_Relabelled)
    for name in ("name", "type", "source", "timestamp", "lsn", "id"):
        Event.__dict__[name].__set__(out, Event.__dict__[name].__get__(event))
    RawEvent.__dict__["raw"].__set__(out, event.raw)
    return out


def test_the_twins_read_an_event_as_getattr_does(admin: psycopg.Connection, dsn: str) -> None:
    """Events of one transaction (the same time, LSN and type objects: the compiled twin
    keeps their JSON forms), then the same events of a subclass whose id and lsn are
    properties, then the first ones again: each as the reference writes it."""
    admin.execute(PLAIN_SCHEMA)
    slot(admin)
    admin.execute(f"INSERT INTO plain VALUES {PLAIN_ROWS}")
    admin.execute("DELETE FROM plain WHERE id = 3")
    events = raw_events(admin, dsn)
    assert len(events) == 6
    relabelled = [_relabelled(event) for event in events]
    assert relabelled[0].id.startswith("relabelled-") and relabelled[0].lsn.endswith("-r")
    mixed = events + relabelled + events[:2] + relabelled[3:]
    taken = []
    for twin in TWINS:
        outs = [twin(event, parts) for parts in (1, 3) for event in mixed]
        expected = [encode_event_reference(event.typed(), parts)
                    for parts in (1, 3) for event in mixed]
        for out, reference in zip(outs, expected):
            if out is not None:  # else unfit (an edge value): the typed path writes it
                assert type(out) is encoding.Outgoing
                assert tuple(out) == tuple(reference), (twin, out.body, reference.body)
        taken.append([out is not None for out in outs])
    assert taken[0] == taken[-1] and sum(taken[0]) >= len(taken[0]) // 2
    assert any(out and out.id.startswith("relabelled-") for out in outs)


HOSTILE = """
CREATE TABLE hostile (k1 text, k2 int8, t text, v varchar, c char(4), j json, jb jsonb,
                      PRIMARY KEY (k1, k2));
CREATE PUBLICATION pub FOR TABLE hostile;
"""
NASTY = ['"', "\\", "\x01\x1f\x7f", "\b\f\n\r\t", "😀 é ✓", "\u2028\u2029", "</script>",
         "quote\"d back\\slash", "", " ", "ünï \x7f\x08", "\U0010ffff"]


def test_hostile_text_and_composite_keys(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(HOSTILE)
    slot(admin)
    for n, text in enumerate(NASTY):
        doc = psycopg.types.json.Json({text: [text, n, 1.5, None, True]})
        admin.execute("INSERT INTO hostile VALUES (%s, %s, %s, %s, %s, %s, %s)",
                      (text, 2**53 + n if n % 2 else n, text, text, text[:4], doc, doc))
    admin.execute("UPDATE hostile SET t = 'x' WHERE k2 = 0")
    admin.execute("DELETE FROM hostile WHERE k2 = 0")
    events = raw_events(admin, dsn)
    bodies = [encode_event(e).body for e in events]
    assert any(b'\\u0001' in b for b in bodies) and any("\u2028".encode() in b for b in bodies)
    assert check(events) == len(NASTY) + 2


def test_text_with_an_escape_or_a_wide_character_at_every_offset(
        admin: psycopg.Connection, dsn: str) -> None:
    """The compiled twin writes text eight bytes at a time while they need no escape: a
    character to escape, DEL or a multi-byte one at every offset of texts longer than
    two words, and plain texts of every length up to three, as the reference writes them."""
    admin.execute("CREATE TABLE words (t text PRIMARY KEY, u text); "
                  "CREATE PUBLICATION pub FOR TABLE words")
    slot(admin)
    texts = ["x" * n for n in range(25)]
    for special in ['"', "\\", "\x01", "\x1f", "\x7f", " ", "~", "é", "€", "😀", "\u2028"]:
        texts += [f"{'a' * at}{special}{'b' * (19 - at)}" for at in range(20)]
    for n, text in enumerate(texts):
        admin.execute("INSERT INTO words VALUES (%s, %s)", (f"{n:03d}{text}", text * 3))
    events = raw_events(admin, dsn)
    assert check(events) == len(texts)


KEYS = """
CREATE TABLE keyed (a int, b text, c uuid, d date, n numeric, v text, PRIMARY KEY (a, b));
CREATE TABLE by_uuid (c uuid PRIMARY KEY, v text);
CREATE TABLE by_date (d date PRIMARY KEY, v text);
CREATE TABLE by_num (n numeric PRIMARY KEY, v text);
CREATE TABLE by_big (n bigint PRIMARY KEY, v text);
CREATE TABLE by_float (f float8 PRIMARY KEY, v text);
CREATE TABLE by_jsonb (j jsonb PRIMARY KEY, v text);
CREATE TABLE full_keyed (a int PRIMARY KEY, v text);
ALTER TABLE full_keyed REPLICA IDENTITY FULL;
CREATE TABLE unkeyed (v text);
ALTER TABLE unkeyed REPLICA IDENTITY FULL;
CREATE TABLE idx (a int NOT NULL, b text NOT NULL, v text);
CREATE UNIQUE INDEX idx_ab ON idx (b, a);
ALTER TABLE idx REPLICA IDENTITY USING INDEX idx_ab;
CREATE PUBLICATION pub FOR ALL TABLES;
"""


def test_keys_of_every_kind_and_replica_identities(admin: psycopg.Connection, dsn: str) -> None:
    """The subject and partition key: one-column keys of each writer (an int beyond 2**53,
    a uuid or date quoted, a numeric as its text, a float and a jsonb key through their
    loaders), keys of several columns, REPLICA IDENTITY FULL (whose old row has every
    column) and DEFAULT and USING INDEX (old row: the key), updates that change the key
    and deletes, a table without a key."""
    admin.execute(KEYS)
    slot(admin)
    admin.execute("""
        INSERT INTO keyed VALUES (1, 'x"y', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-01-01', 1.50, 'v');
        INSERT INTO by_uuid VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'v');
        INSERT INTO by_date VALUES ('2024-01-01', 'v'), ('infinity', 'w');
        INSERT INTO by_num VALUES (1.50, 'v'), ('NaN', 'w');
        INSERT INTO by_big VALUES (9007199254740993, 'v'), (-9007199254740991, 'w');
        INSERT INTO by_float VALUES (1.5, 'v'), ('NaN', 'w');
        INSERT INTO by_jsonb VALUES ('{"n": 9007199254740993}', 'v'), ('"s"', 'w');
        INSERT INTO full_keyed VALUES (1, 'v');
        INSERT INTO unkeyed VALUES ('v');
        INSERT INTO idx VALUES (1, 'b', 'v');
        UPDATE keyed SET v = 'w';
        UPDATE keyed SET a = 2;
        UPDATE full_keyed SET v = 'w';
        UPDATE full_keyed SET a = 2;
        UPDATE unkeyed SET v = 'w';
        UPDATE idx SET v = 'w';
        UPDATE idx SET a = 2;
        UPDATE by_big SET n = 5 WHERE v = 'v';
        DELETE FROM keyed; DELETE FROM by_uuid; DELETE FROM by_date; DELETE FROM by_num;
        DELETE FROM by_big; DELETE FROM by_float; DELETE FROM by_jsonb; DELETE FROM full_keyed;
        DELETE FROM unkeyed; DELETE FROM idx;
    """)
    events = raw_events(admin, dsn)
    subjects = {encode_event(e).subject for e in events}
    assert {'[1,"x\\"y"]', '"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"', '"2024-01-01"', "1.50",
            "9007199254740993", "-9007199254740991", "NaN", "infinity", '[1,"b"]'} <= subjects
    taken = check(events, (1, 3, 7))
    assert taken >= len(events) - 2  # all but the jsonb key beyond 2**53 (insert, delete)


@pytest.fixture
def numeric_as_float() -> Iterator[None]:
    """numeric loaded as float (psycopg's own FloatLoader), registered by the user."""
    saved = psycopg.adapters.get_loader(1700, psycopg.pq.Format.TEXT)
    psycopg.adapters.register_loader("numeric", FloatLoader)
    try:
        yield
    finally:
        psycopg.adapters.register_loader("numeric", saved)


def test_a_loader_the_user_registered_is_honoured(
        admin: psycopg.Connection, dsn: str, numeric_as_float: None) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, n numeric, m numeric);"
                  "CREATE PUBLICATION pub FOR TABLE t")
    slot(admin)
    admin.execute("INSERT INTO t VALUES (1, 1.50, 'NaN'), (2, 0.1, 1e20)")
    events = raw_events(admin, dsn)
    assert direct.plan_of(events[0], events[0].raw[0]).kinds[1] == direct.GENERIC
    bodies = [encode_event(e).body for e in events]
    assert b'"n":1.5,' in bodies[0] and b'"m":"NaN"' in bodies[0]  # floats, not Decimal text
    assert check(events) == 2


W1 = """
CREATE TABLE bench_rows (id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric, e jsonb);
CREATE PUBLICATION pub FOR TABLE bench_rows;
"""


def test_ordinary_rows_are_encoded_without_typing_them(admin: psycopg.Connection, dsn: str) -> None:
    """W1's rows through ``encode`` (and ``encode_event``): the rows are never typed (no
    Table.load call), the RawEvents stay untyped, and the bytes are the reference's."""
    admin.execute(W1)
    slot(admin)
    admin.execute("INSERT INTO bench_rows SELECT i, i, 'row ' || i, '2025-01-01'::timestamptz "
                  "+ i * interval '1.5 second', i * 1.2345, jsonb_build_object('k', i, 'tag', 'x') "
                  "FROM generate_series(1, 50) i")
    admin.execute("UPDATE bench_rows SET a = a + 1 WHERE id <= 10")
    admin.execute("DELETE FROM bench_rows WHERE id > 40")
    events = raw_events(admin, dsn)
    assert len(events) == 70
    expected = [encode_event_reference(event.typed(), 3) for event in events]
    table = events[0].raw[0]
    loads = 0
    original = type(table).load

    def counting(self: Any, *args: Any) -> Any:
        nonlocal loads
        loads += 1
        return original(self, *args)

    type(table).load = counting  # type: ignore[method-assign]
    try:
        assert encode(events, 3) == expected
        assert [encode_event(event, 3) for event in events] == expected
    finally:
        type(table).load = original  # type: ignore[method-assign]
    assert loads == 0
    assert all(event.raw is not None for event in events)
    assert check(events, (3,)) == len(events)


GENERATED = """
CREATE TABLE gen (id int PRIMARY KEY, i8 int8, i4 int4, n numeric, d date, ts timestamp,
                  tz timestamptz, t text, f float8, b bool, u uuid);
CREATE PUBLICATION pub FOR TABLE gen;
INSERT INTO gen SELECT i,
    CASE WHEN i % 3 = 0 THEN (9007199254740991 + (i % 7) - 3) * (1 - 2 * (i % 2))
         ELSE ((random() - 0.5) * 2 ^ 63)::int8 END,
    ((random() - 0.5) * 2 ^ 32)::int4,
    round(((random() - 0.5) * 10 ^ (i % 40 - 10))::numeric, i % 25),
    date '0001-01-01' + (random() * 3652058)::int,
    timestamp '0001-01-01' + random() * interval '9998 years' + (i % 1000000) * interval '1 microsecond',
    timestamptz '1900-01-01 00:00+00' + random() * interval '300 years',
    (SELECT string_agg(chr(c), '') FROM (SELECT CASE WHEN random() < 0.5 THEN 1 + (random() * 126)::int
            ELSE 160 + (random() * 55000)::int END AS c FROM generate_series(0, i % 12 + g * 0)) x),
    random() * 10 ^ (i % 50 - 25), i % 2 = 0, gen_random_uuid()
FROM generate_series(1, 400) i, LATERAL (SELECT 0 AS g) z;
"""


def test_generated_values(admin: psycopg.Connection, dsn: str) -> None:
    """Values PostgreSQL made at random (integers about 2**53 and 2**63, numerics of every
    scale, dates and timestamps over years 1 to 9999 with microseconds, text of any
    character), all direct and the reference's."""
    admin.execute(GENERATED.split("INSERT")[0])
    slot(admin)
    admin.execute("INSERT" + GENERATED.split("INSERT", 1)[1])
    events = raw_events(admin, dsn)
    assert len(events) == 400
    assert check(events, (1, 16)) == 400


def test_raw_events_a_walex_app_streams(admin: psycopg.Connection, dsn: str) -> None:
    """The RawEvents a WalEx app with ``raw_rows`` hands on (from its replication session,
    by the compiled hot path or the pure one): the type matrix, the edge values and the bench's columns."""
    admin.execute(MATRIX_SCHEMA.replace("CREATE PUBLICATION pub FOR TABLE typed;", ""))
    admin.execute(EDGE_SCHEMA.replace("CREATE PUBLICATION pub FOR TABLE edge;", ""))
    admin.execute(PLAIN_SCHEMA.replace("CREATE PUBLICATION pub FOR TABLE plain;", ""))
    admin.execute("CREATE PUBLICATION pub FOR TABLE typed, edge, plain")
    edge = edge_rows(admin)  # one change each
    statements = [f"INSERT INTO typed VALUES {ROW_VALUES}",
                  "UPDATE typed SET c_int4 = 5, c_text = 'x' WHERE id IN (1, 2)",
                  "DELETE FROM typed WHERE id = 4", *edge,
                  "UPDATE edge SET c_ts = '-infinity' WHERE id = 7", f"INSERT INTO plain VALUES {PLAIN_ROWS}",
                  "UPDATE plain SET f = 'Infinity', d = 2 WHERE id = 1", "DELETE FROM plain WHERE id = 3"]
    count = 5 + 2 + 1 + len(edge) + 1 + 5 + 1 + 1
    events: list[Any] = []

    async def main() -> None:  # returns nothing: asyncio's debug mode would repr (type) them
        async with collecting(dsn, raw_rows=True) as rec:
            for statement in statements:
                admin.execute(statement)
            events.extend(await rec.wait_for(count))

    run(main())
    raws = [e for e in events if type(e) is RawEvent and e.raw is not None]
    assert len(raws) == len(events)
    assert check(raws, (1, 3)) >= len(raws) - 1  # the huge jsonb number: orjson refuses it


JSONB_VALUES = [
    '{"k": 1, "tag": "x", "even": true}', '{}', '[]', 'null', 'true', '0', '-7', '"s"',
    '123456789012345', '1234567890123456', '-999999999999999', '9007199254740993',
    '1180591620717411303425', '1.50', '0.1', '1e5', '-0', '2.5e-7', '100.0',
    '{"a": {"b": [1, -2, 0, {"c": "\\\\ \\" \\/ \\u00e9 é ✓ 🎉"}]}, "": null}',
    '"\\u0001\\u001f\\b\\t\\n\\f\\r\\u007f"', '{"k\\"ey": "v\\\\al", "n": [1, [2, [3]]]}',
    '"' + 'x' * 5000 + '"', '"1234567890123456789012"', '{"b": 1, "a": 2, "aa": 3, "a": 4}',
    '[' * 70 + ']' * 70, '[' * 60 + '1' + ']' * 60, '{"u": "\\u2028\\u2029"}',
]


def test_jsonb_written_from_its_text(admin: psycopg.Connection, dsn: str) -> None:
    """jsonb as PostgreSQL writes it (hostile strings, escapes, numbers of every form,
    nesting past 64 levels, duplicate keys it drops): compacted from its text where that is
    certain (integers of up to 15 digits, PostgreSQL's escapes), through the loader
    otherwise; both twins give the reference's bytes, and agree on which text they take."""
    admin.execute("CREATE TABLE j (id int PRIMARY KEY, doc jsonb, plain json, "
                  "arr jsonb[]); CREATE PUBLICATION pub FOR TABLE j")
    slot(admin)
    for i, value in enumerate(JSONB_VALUES):
        admin.execute("INSERT INTO j VALUES (%s, %s::jsonb, %s::json, ARRAY[%s::jsonb])",
                      (i, value, value, value))
    admin.execute("UPDATE j SET doc = '{\"k\": 2}' WHERE id < 3")
    events = raw_events(admin, dsn)
    assert len(events) == len(JSONB_VALUES) + 3
    assert check(events, (1, 4)) >= len(events) - 2  # beyond 64 bits: unfit in the reference
    texts = [row_values(event.raw[1])[1] for event in events]
    assert texts[0] == b'{"k": 1, "tag": "x", "even": true}'  # as PostgreSQL sent it
    compact = [direct.jsonb_compact(text) for text in texts]
    assert compact[0] == b'{"k":1,"tag":"x","even":true}'
    assert sum(piece is not None for piece in compact) >= 15  # the ordinary ones go direct
    if direct.compiled_direct_event is not None:
        from walex.destinations import _direct

        assert [_direct.jsonb_compact(text) for text in texts] == compact
    from walex.pgtypes import py_json_loads

    for text, piece in zip(texts, compact):
        if piece is not None:
            assert piece == orjson.dumps(py_json_loads(text)), text


def test_a_wide_row_and_rows_that_are_not_raw_rows(admin: psycopg.Connection, dsn: str) -> None:
    """A row of 70 columns (the compiled twin keeps the places of 64 on its stack) with
    NULLs, updated and deleted, goes direct; the same events with a row cut short,
    lengthened, of another column count or holding a value not text (walex.rawrow) are
    unfit in both twins."""
    wide = ", ".join(f"c{i} text" for i in range(70))
    admin.execute(f"CREATE TABLE wide (id int PRIMARY KEY, {wide}); "
                  "ALTER TABLE wide REPLICA IDENTITY FULL; CREATE PUBLICATION pub FOR TABLE wide")
    slot(admin)
    values = ", ".join("NULL" if i % 7 == 3 else f"'v{i}'" for i in range(70))
    admin.execute(f"INSERT INTO wide VALUES (1, {values})")
    admin.execute("UPDATE wide SET c3 = 'set', c4 = NULL, c5 = 'é'")
    admin.execute("DELETE FROM wide")
    events = raw_events(admin, dsn)
    assert len(events) == 3
    assert check(events) == 3
    update = events[1]
    table, new, old, old_kind, lsn = update.raw
    first = 2 + 5 + len(row_values(new)[0])  # after the count and the id
    broken = [new[:-1], new + b"n", new[:1], b"", b"\x00\x48" + new[2:], b"\x00\x46" + new[2:],
              new[:2] + b"u" + new[first:], new[:2] + b"b" + new[3:], new[:2] + b"x" + new[3:],
              new[:3] + (first - 6).to_bytes(4, "big") + new[7:],  # the id one byte longer
              new[:3] + b"\x7f\xff\xff\xff" + new[7:], (b"1",) * 71]
    for row in broken:
        for raw in ((table, row, old, old_kind, lsn), (table, new, row, old_kind, lsn)):
            event = RawEvent.of(update.name, update.type, update.source, raw, COMMIT, update.lsn,
                                update.id)
            assert [twin(event, 1) for twin in TWINS] == [None] * len(TWINS), row[:12]
