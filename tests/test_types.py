"""The type matrix: every value walex delivers equals what psycopg returns from a SELECT.

One table has a column of each type below; rows of ordinary values, of
edge values (NaN, infinities, values needing quoting) and of NULLs are
inserted, then updated under REPLICA IDENTITY FULL. Each value of each
``new_record`` / ``old_record`` is compared with a ``SELECT`` of the same row
on a psycopg connection where the non-built-in types are registered like
this (what makes the SELECT comparable):

- ``hstore``: :func:`psycopg.types.hstore.register_hstore` (else a ``str``);
- ``mood[]`` (enum array): :func:`psycopg.types.array.register_array` with
  the enum's ``TypeInfo`` (else the array's text ``'{sad,ok}'``); the enum
  itself loads as ``str`` with no registration, as walex delivers it;
- ``pair`` (composite): :func:`psycopg.types.composite.register_composite`
  (else the row's text); walex's named tuple class differs from the one the
  SELECT builds, so composites are compared as plain tuples plus field names;
- domains and ``citext`` need nothing: a SELECT result describes a domain
  column by its base type, and ``citext`` loads as ``str``.
"""

from __future__ import annotations

import math
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types import TypeInfo
from psycopg.types.array import register_array
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.hstore import register_hstore
from support import collecting, run

from walex import Change, EventType

SCHEMA = r"""
CREATE EXTENSION hstore;
CREATE EXTENSION citext;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'very "happy", {yes}');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN mood_d AS mood;
CREATE TYPE pair AS (a int, b text, m mood);
CREATE TABLE typed (
    id int PRIMARY KEY,
    c_bool bool, c_int2 int2, c_int4 int4, c_int8 int8,
    c_float4 float4, c_float8 float8, c_numeric numeric, c_money money,
    c_text text, c_varchar varchar(20), c_char char(5),
    c_uuid uuid, c_date date, c_time time, c_timetz timetz,
    c_timestamp timestamp, c_timestamptz timestamptz, c_interval interval,
    c_json json, c_jsonb jsonb, c_bytea bytea,
    c_inet inet, c_cidr cidr, c_macaddr macaddr,
    c_int4range int4range, c_tsrange tsrange,
    c_int_arr int[], c_text_arr text[],
    c_enum mood, c_enum_arr mood[], c_domain posint, c_domain_enum mood_d,
    c_hstore hstore, c_citext citext, c_composite pair
);
ALTER TABLE typed REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR TABLE typed;
"""

COLUMNS = {
    "id": "int4", "c_bool": "bool", "c_int2": "int2", "c_int4": "int4", "c_int8": "int8",
    "c_float4": "float4", "c_float8": "float8", "c_numeric": "numeric", "c_money": "money",
    "c_text": "text", "c_varchar": "varchar", "c_char": "bpchar",
    "c_uuid": "uuid", "c_date": "date", "c_time": "time", "c_timetz": "timetz",
    "c_timestamp": "timestamp", "c_timestamptz": "timestamptz", "c_interval": "interval",
    "c_json": "json", "c_jsonb": "jsonb", "c_bytea": "bytea",
    "c_inet": "inet", "c_cidr": "cidr", "c_macaddr": "macaddr",
    "c_int4range": "int4range", "c_tsrange": "tsrange",
    "c_int_arr": "int4[]", "c_text_arr": "text[]",
    "c_enum": "mood", "c_enum_arr": "mood[]", "c_domain": "posint", "c_domain_enum": "mood_d",
    "c_hstore": "hstore", "c_citext": "citext", "c_composite": "pair",
}
DATA_COLUMNS = [c for c in COLUMNS if c != "id"]

ROW_VALUES = r"""
(1, true, -32768, 2147483647, -9223372036854775808,
 1.5, 3.141592653589793, '12345678901234567890.123456789012345678901234567890', '-1234.56',
 'héllo ☃ wörld', 'varchar', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29',
 '12:34:56.789', '12:34:56.789+02:30', '2024-02-29 23:59:59.999999',
 '2024-02-29 23:59:59.999999+05', '1 year 2 mons 3 days 04:05:06.789',
 '{"a": [1, 2.5, null], "b": "x\"y", "c": {}}', '{"k": [true, false], "n": 1e3}',
 '\x00ff10de'::bytea, '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
 '[1,10)', '[2024-01-01 00:00, 2024-01-02 12:30)',
 '{{1,NULL,3},{4,5,NULL}}',
 ARRAY['a,b', 'quote"d', '{brace}', 'back\slash', 'with space', 'NULL', NULL, '', ' lead '],
 'happy', ARRAY['sad', 'very "happy", {yes}', NULL]::mood[], 42, 'ok',
 'a=>1, "b c"=>NULL, "q\"uote"=>"x,y", "{}"=>""', 'MiXeD Case', ROW(7, 'x, "y" (z)', 'ok')),
(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL),
(3, false, 0, 0, 0, 'NaN', 'NaN', 'NaN', '0', '', '', '', '00000000-0000-0000-0000-000000000000',
 '0001-01-01', '00:00', '00:00-12', '0001-01-01 00:00', '1970-01-01 00:00+00', '-1 days -00:00:01',
 '"just a string"', '[]', ''::bytea, '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff',
 'empty', '(,)', '{}', '{}', 'sad', '{}', 1, 'very "happy", {yes}', '', '', ROW(NULL, NULL, NULL)),
(4, true, 1, 1, 1, 'Infinity', '-Infinity', '-0.000000000000000000001', '0.01', 'x', 'x', 'x',
 'ffffffff-ffff-ffff-ffff-ffffffffffff', '9999-12-31', '23:59:59.999999', '23:59:59+14',
 '9999-12-31 23:59:59', '2000-06-15 12:00:00-09:30', '0', 'null', '{"deep": {"x": [[]]}}',
 '\x5c'::bytea, '255.255.255.255', '0.0.0.0/0', '00:00:00:00:00:00',
 '(,5]', '[2024-01-01 00:00,)', '{{{1}}}', ARRAY[NULL, NULL]::text[], 'ok', ARRAY['ok']::mood[], 2147483647,
 'sad', 'x=>NULL', '💡', ROW(-1, '', NULL)),
(5, NULL, NULL, NULL, NULL, '-Infinity', 'Infinity', 'Infinity', NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL)
"""
ROW_IDS = [1, 2, 3, 4, 5]


def register_for_select(conn: psycopg.Connection) -> None:
    """Register the non-built-in types so a SELECT types values like walex does."""
    hstore = TypeInfo.fetch(conn, "hstore")
    assert hstore is not None
    register_hstore(hstore, conn)
    mood = TypeInfo.fetch(conn, "mood")
    assert mood is not None
    register_array(mood, conn)  # mood[] -> list of str
    pair = CompositeInfo.fetch(conn, "pair")
    assert pair is not None
    register_composite(pair, conn)


def same(a: Any, b: Any) -> bool:
    """Equality that also requires equal types, with NaN equal to NaN."""
    if isinstance(a, tuple) and hasattr(a, "_fields"):  # composite
        return (
            isinstance(b, tuple) and getattr(b, "_fields", None) == a._fields
            and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, Decimal) and a.is_nan():
        return b.is_nan()
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_record(record: dict[str, Any] | None, expected: dict[str, Any], what: str) -> None:
    assert record is not None, what
    assert list(record) == list(expected), what
    wrong = {
        col: (record[col], expected[col])
        for col in expected if not same(record[col], expected[col])
    }
    assert not wrong, f"{what}: walex value != SELECT value for {wrong}"


def select_rows(conn: psycopg.Connection, table: str = "typed") -> dict[int, dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(table)))
        return {row["id"]: row for row in cur.fetchall()}


def test_type_matrix(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    register_for_select(admin)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["typed"]) as rec:
            admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
            inserted = select_rows(admin)
            # Every data column of rows 1 and 2 swaps values: each changes, and
            # old_record / new_record of both rows hold every type.
            assignments = ", ".join(DATA_COLUMNS)
            admin.execute(
                f"UPDATE typed t SET ({assignments}) = "
                f"(SELECT {assignments} FROM typed s WHERE s.id = 3 - t.id) WHERE t.id IN (1, 2)"
            )
            # Row 3 changes one column only: the others are unchanged NaN, '', {} ...
            admin.execute("UPDATE typed SET c_int4 = 5 WHERE id = 3")
            updated = select_rows(admin)
            events = await rec.wait_for(len(ROW_IDS) + 3)

        assert [e.type for e in events] == [EventType.INSERT] * len(ROW_IDS) + [EventType.UPDATE] * 3
        for event in events:
            assert event.source.columns == COLUMNS
        for event in events[: len(ROW_IDS)]:
            assert event.old_record is None and event.changes is None
            row_id = event.new_record["id"]  # type: ignore[index]
            assert_record(event.new_record, inserted[row_id], f"insert of row {row_id}")
        assert [e.new_record["id"] for e in events[: len(ROW_IDS)]] == ROW_IDS  # type: ignore[index]

        swapped = events[len(ROW_IDS): len(ROW_IDS) + 2]
        for event in swapped:
            row_id = event.new_record["id"]  # type: ignore[index]
            assert_record(event.old_record, inserted[row_id], f"old_record of row {row_id}")
            assert_record(event.new_record, updated[row_id], f"new_record of row {row_id}")
            assert event.changes is not None
            assert list(event.changes) == DATA_COLUMNS
            for col, change in event.changes.items():
                assert isinstance(change, Change)
                assert same(change.old_value, inserted[row_id][col]), col
                assert same(change.new_value, updated[row_id][col]), col

        last = events[-1]
        assert_record(last.old_record, inserted[3], "old_record of row 3")
        assert_record(last.new_record, updated[3], "new_record of row 3")
        assert last.changes == {"c_int4": Change(0, 5)}

    run(main())


def test_nulls_are_none_and_values_not_strings(admin: psycopg.Connection, dsn: str) -> None:
    """Spot checks independent of psycopg: the Python types walex delivers."""
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["typed"]) as rec:
            admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
            events = await rec.wait_for(len(ROW_IDS))
        by_id = {e.new_record["id"]: e.new_record for e in events}  # type: ignore[index]
        assert all(v is None for k, v in by_id[2].items() if k != "id")
        one = by_id[1]
        assert one["c_int_arr"] == [[1, None, 3], [4, 5, None]]
        assert one["c_text_arr"] == [
            "a,b", 'quote"d', "{brace}", "back\\slash", "with space", "NULL", None, "", " lead ",
        ]
        assert one["c_enum"] == "happy" and one["c_domain"] == 42 and one["c_domain_enum"] == "ok"
        assert one["c_enum_arr"] == ["sad", 'very "happy", {yes}', None]
        assert one["c_hstore"] == {"a": "1", "b c": None, 'q"uote': "x,y", "{}": ""}
        assert one["c_char"] == "ab   " and one["c_citext"] == "MiXeD Case"
        assert tuple(one["c_composite"]) == (7, 'x, "y" (z)', "ok")
        assert one["c_composite"]._fields == ("a", "b", "m")
        assert one["c_numeric"] == Decimal("12345678901234567890.123456789012345678901234567890")
        assert one["c_bytea"] == b"\x00\xff\x10\xde"
        assert one["c_json"] == {"a": [1, 2.5, None], "b": 'x"y', "c": {}}
        assert math.isnan(by_id[3]["c_float8"]) and by_id[3]["c_numeric"].is_nan()
        assert by_id[4]["c_float4"] == math.inf and by_id[4]["c_float8"] == -math.inf
        assert by_id[5]["c_numeric"] == Decimal("Infinity")
        assert by_id[3]["c_composite"] == (None, None, None)

    run(main())


def test_quoted_names_and_nested_user_types(admin: psycopg.Connection, dsn: str) -> None:
    """Types whose names need quoting, arrays of user types, domains over arrays."""
    admin.execute(r'''
        CREATE SCHEMA "My Schema";
        CREATE TYPE "My Schema"."Mood ""x""" AS ENUM ('a', 'b,c');
        CREATE TYPE "My Schema"."we""ird" AS (x int, "y z" text);
        CREATE DOMAIN "My Schema".intlist AS int[];
        CREATE DOMAIN posint AS int CHECK (VALUE > 0);
        CREATE TABLE "My Schema"."T" (
            id int PRIMARY KEY, m "My Schema"."Mood ""x""", ma "My Schema"."Mood ""x"""[],
            w "My Schema"."we""ird", wa "My Schema"."we""ird"[], il "My Schema".intlist,
            pa posint[], mr int4multirange);
        CREATE PUBLICATION pub FOR ALL TABLES;
    ''')

    async def main() -> None:
        async with collecting(dsn) as rec:
            admin.execute(r'''INSERT INTO "My Schema"."T" VALUES (1, 'b,c', '{a,"b,c"}',
                ROW(1, 'q'), ARRAY[ROW(2, 'r')]::"My Schema"."we""ird"[], '{1,2}', '{3,4}',
                '{[1,3),[5,7)}')''')
            [event] = await rec.wait_for(1)
        assert event.source.schema == "My Schema" and event.source.table == "T"
        assert event.source.columns == {
            "id": "int4", "m": 'My Schema.Mood "x"', "ma": 'My Schema.Mood "x"[]',
            "w": 'My Schema.we"ird', "wa": 'My Schema.we"ird[]', "il": "My Schema.intlist",
            "pa": "posint[]", "mr": "int4multirange",
        }
        record = event.new_record
        assert record is not None
        assert record["m"] == "b,c" and record["ma"] == ["a", "b,c"]
        assert tuple(record["w"]) == (1, "q") and record["w"]._fields == ("x", "y_z")
        assert [tuple(w) for w in record["wa"]] == [(2, "r")]
        assert record["il"] == [1, 2] and record["pa"] == [3, 4]
        assert [(r.lower, r.upper) for r in record["mr"]] == [(1, 3), (5, 7)]

    run(main())


def test_domains_and_arrays_over_user_types(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("""
        CREATE EXTENSION hstore;
        CREATE TYPE pr AS (a int, b text);
        CREATE TYPE e AS ENUM ('x', 'y');
        CREATE DOMAIN dpr AS pr; CREATE DOMAIN dh AS hstore; CREATE DOMAIN de AS e;
        CREATE DOMAIN dd AS de; CREATE DOMAIN darr AS pr[];
        CREATE TABLE t (id int PRIMARY KEY, a dpr, b dh, c de[], d dd, f hstore[], g darr, h dpr[]);
        CREATE PUBLICATION pub FOR ALL TABLES;
    """)

    async def main() -> None:
        async with collecting(dsn) as rec:
            admin.execute("""INSERT INTO t VALUES (1, ROW(1, 'q'), 'a=>b', '{x,y}', 'y',
                ARRAY['a=>1'::hstore, 'b=>NULL'], ARRAY[ROW(2, 'z')::pr], ARRAY[ROW(3, 'w')::dpr])""")
            [event] = await rec.wait_for(1)
        assert event.source.columns == {
            "id": "int4", "a": "dpr", "b": "dh", "c": "de[]", "d": "dd", "f": "hstore[]",
            "g": "darr", "h": "dpr[]",
        }
        record = event.new_record
        assert record is not None
        assert tuple(record["a"]) == (1, "q") and record["b"] == {"a": "b"}
        assert record["c"] == ["x", "y"] and record["d"] == "y"
        assert record["f"] == [{"a": "1"}, {"b": None}]
        assert [tuple(v) for v in record["g"]] == [(2, "z")]
        assert [tuple(v) for v in record["h"]] == [(3, "w")]

    run(main())


def test_type_created_while_streaming(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> None:
        async with collecting(dsn, subscriptions=["t"]) as rec:
            admin.execute("INSERT INTO t VALUES (1)")
            await rec.wait_for(1)
            admin.execute("""
                CREATE TYPE late AS (a int, b text);
                CREATE TYPE color AS ENUM ('red', 'green');
                ALTER TABLE t ADD COLUMN l late, ADD COLUMN c color[];
                INSERT INTO t VALUES (2, ROW(5, 'x'), '{green,red}');
            """)
            events = await rec.wait_for(2)
        assert events[0].source.columns == {"id": "int4"}
        assert events[1].source.columns == {"id": "int4", "l": "late", "c": "color[]"}
        record = events[1].new_record
        assert record is not None and tuple(record["l"]) == (5, "x") and record["c"] == ["green", "red"]

    run(main())


MORE_BUILTINS = {  # column type: a value; each compared with a SELECT like the matrix
    "tsvector": "'a fat cat'", "tsquery": "'fat & rat'", "pg_lsn": "'16/B374D848'",
    "point": "'(1,2)'", "box": "'((0,0),(1,1))'", "bit(4)": "B'1010'", "varbit": "B'101'",
    "oid": "42", "name": "'nm'", '"char"': "'x'", "regclass": "'pg_class'",
    "int2vector": "'1 2 3'", "txid_snapshot": "'10:20:10,14,15'", "numrange": "'[1.5,2.5]'",
    "datemultirange": "'{[2024-01-01,2024-02-01)}'", "pg_lsn[]": "'{0/1,1/2}'",
    "money[]": "'{1.5,2}'", "uuid[]": "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}'",
    "json[]": """ARRAY['{"a": 1}'::json, NULL]""", "jsonb[]": """ARRAY['{"a": [1]}', 'null']::jsonb[]""",
    "timestamptz[]": """'{"2024-01-01 00:00+02",NULL}'""", "int4range[]": """'{"[1,2)",empty}'""",
    "inet[]": "'{10.0.0.1,::1/64}'", "bytea[]": r"ARRAY['\x00'::bytea, NULL]",
    "bool[]": "'{t,f,NULL}'", "float8[]": "'{NaN,Infinity,-Infinity,1.5}'",
    "numeric[]": "'{NaN,1.10}'", "interval[]": "'{1 day,-00:00:01}'", "date[]": "'{2024-01-01,NULL}'",
    "timetz[]": "'{12:00+02}'", "char(3)[]": """'{a,bc,"d e"}'""",
}


def test_more_builtin_types_match_select(admin: psycopg.Connection, dsn: str) -> None:
    columns = {f"c{i}": t for i, t in enumerate(MORE_BUILTINS)}
    admin.execute(
        "CREATE TABLE more (id int PRIMARY KEY, "
        + ", ".join(f"{c} {t}" for c, t in columns.items()) + "); CREATE PUBLICATION pub FOR TABLE more"
    )

    async def main() -> None:
        async with collecting(dsn, subscriptions=["more"]) as rec:
            admin.execute(f"INSERT INTO more VALUES (1, {', '.join(MORE_BUILTINS.values())})")
            [event] = await rec.wait_for(1)
        assert_record(event.new_record, select_rows(admin, "more")[1], "more builtin types")

    run(main())


def test_value_a_user_loader_refuses_is_a_clear_error(admin: psycopg.Connection, dsn: str) -> None:
    """A loader the user registered raises (walex gives values psycopg's own loaders cannot
    hold as text, tests/workers/test_edge_values.py): the app stops with a DecodeError naming
    the column and the way out, not a bare exception of the loader."""
    from psycopg.adapt import Loader

    from walex import DecodeError

    admin.execute("""
        CREATE TABLE t (id int PRIMARY KEY, valid_until timestamptz);
        CREATE PUBLICATION pub FOR TABLE t;
    """)
    psycopgs = psycopg.adapters.get_loader(1184, psycopg.pq.Format.TEXT)
    assert psycopgs is not None

    class Refusing(Loader):
        def load(self, data: Any) -> Any:
            raise ValueError(f"no {bytes(data).decode()} here")

    async def main() -> str:
        try:
            async with collecting(dsn, subscriptions=["t"]) as rec:
                admin.execute("INSERT INTO t VALUES (1, 'infinity')")
                await rec.wait_for(1)
        except DecodeError as exc:
            return str(exc)
        raise AssertionError("no DecodeError")

    psycopg.adapters.register_loader("timestamptz", Refusing)
    try:
        message = run(main())
    finally:
        psycopg.adapters.register_loader("timestamptz", psycopgs)
    assert "column 'valid_until' (timestamptz) of a Insert row of public.t" in message
    assert "no infinity here" in message and "make it take this value" in message


@pytest.mark.parametrize("setting, value", [
    ("DateStyle", "SQL, DMY"),
    ("IntervalStyle", "sql_standard"),
    ("extra_float_digits", "-3"),
])
def test_database_output_settings_do_not_change_values(
    admin: psycopg.Connection, dsn: str, setting: str, value: str
) -> None:
    admin.execute(
        sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(admin.info.dbname), sql.Identifier(setting), sql.Literal(value))
    )
    admin.execute("""
        CREATE TABLE t (id int PRIMARY KEY, d date, i interval, f float8);
        CREATE PUBLICATION pub FOR TABLE t;
    """)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["t"]) as rec:
            admin.execute("INSERT INTO t VALUES (1, '2024-02-03', '1 year 2 days 03:04:05', pi())")
            [event] = await rec.wait_for(1, timeout=5)
        assert event.new_record == {
            "id": 1, "d": date(2024, 2, 3), "i": timedelta(days=367, seconds=11045), "f": math.pi,
        }

    run(main())
