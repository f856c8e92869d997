"""Rows typed in C by the compiled hot path (``walex._hotpath``, ``_hotpath_values.pxi``)
give exactly what the table's psycopg loaders give (``Table.load``, the reference).

For bool, int2/4/8, text/varchar, float4/8, numeric, timestamptz, timestamp and date the
compiled path types the text PostgreSQL sent itself; for any other type it calls the
column's loader. Every value it gives must equal the loader's in type and ``repr`` (NaN,
-0.0, the timezone object); a value it is not sure of sends the whole row back to
``Table.load`` (``_typed_row`` then gives None). Values: the forms PostgreSQL writes under
walex's session settings, their edges (infinity, BC, year 10000, 24:00, NaN, -0, the int
limits, non-UTF-8 text), and hypothesis texts near those forms. The live type matrix and
edge rows go through both paths in ``test_hotpath.py`` (``test_type_matrix``,
``test_values_python_cannot_hold``), whose typed tables now take this path.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walex import hotpath
from walex.pgoutput.messages import Column, Relation, TupleData
from walex.pgtypes import TypeCatalog
from walex.relations import Table

pytestmark = pytest.mark.skipif(
    not hotpath.compiled_available(), reason="walex._hotpath (the compiled hot path) is not built"
)

BOOL, INT2, INT4, INT8, TEXT, VARCHAR, BPCHAR = 16, 21, 23, 20, 25, 1043, 1042
FLOAT4, FLOAT8, NUMERIC, TSTZ, TS, DATE = 700, 701, 1700, 1184, 1114, 1082
JSONB, UUID, TIME, INT4_ARRAY = 3802, 2950, 1083, 1007

# texts PostgreSQL writes (DateStyle=ISO, TimeZone=UTC), which the C code must type itself
TYPED_IN_C: dict[int, list[bytes]] = {
    BOOL: [b"t", b"f"],
    INT2: [b"0", b"-32768", b"32767", b"7"],
    INT4: [b"-2147483648", b"2147483647", b"-1", b"10"],
    INT8: [b"-999999999999999999", b"999999999999999999", b"123456789012"],
    TEXT: [b"", b"row 5d41402abc4b2a76b9719d911017c592", "caf\u00e9 \u2028 \U0001f600".encode(), b"a\tb\\n"],
    VARCHAR: [b"x", b" padded "],
    FLOAT4: [b"1.10000002", b"-0", b"NaN", b"Infinity", b"-Infinity", b"3.40282347e+38", b"1e-45"],
    FLOAT8: [b"0.1", b"-0", b"NaN", b"Infinity", b"-Infinity", b"1.7976931348623157e+308",
             b"5e-324", b"2.2250738585072014e-308", b"123456789.123456789"],
    NUMERIC: [b"0", b"-0", b"NaN", b"Infinity", b"-Infinity", b"1234.5678", b"-0.0000",
              b"1" + b"0" * 200 + b".5", b"0.000000000000000000000000001"],
    TSTZ: [b"2025-01-01 00:16:40+00", b"2025-01-01 00:16:40.5+00", b"0001-01-01 00:00:00+00",
           b"9999-12-31 23:59:59.999999+00", b"2024-02-29 12:00:00.000001+00",
           b"2000-01-01 00:00:00.12+00"],
    TS: [b"2025-01-01 00:16:40", b"2025-01-01 00:16:40.123456", b"0001-01-01 00:00:00",
         b"9999-12-31 23:59:59.999999", b"2000-02-29 00:00:00.5"],
    DATE: [b"2025-01-01", b"0001-01-01", b"9999-12-31", b"2000-02-29"],
}

# texts the C code must not type (the loader, or the tolerant path, decides)
NOT_IN_C: dict[int, list[bytes]] = {
    BOOL: [b"true", b"x", b""],
    INT2: [b"+5", b" 5", b"", b"-"],
    INT8: [b"-9223372036854775808", b"9223372036854775807", b"99999999999999999999999"],
    TEXT: [b"\xff\xfe", b"ab\xc3"],
    FLOAT8: [b"1e400", b"-1e400", b" 1", b"1x", b"", b"x" * 80],
    NUMERIC: [b"1\xc3\xa9"],
    TSTZ: [b"infinity", b"-infinity", b"0044-03-15 00:00:00+00 BC", b"10000-01-01 00:00:00+00",
           b"2025-01-01 00:00:00+05:30", b"2025-01-01 00:00:00", b"2025-01-01 24:00:00+00",
           b"2025-02-30 00:00:00+00", b"2025-01-01 00:00:60+00", b"2025-01-01 00:00:00.+00",
           b"2025-01-01 00:00:00.1234567+00", b"2025-01-01T00:00:00+00", b"2025-13-01 00:00:00+00",
           b"0000-01-01 00:00:00+00", b"2023-02-29 00:00:00+00"],
    TS: [b"infinity", b"-infinity", b"0044-03-15 00:00:00 BC", b"2025-01-01 00:00:00+00",
         b"2025-01-01 24:00:00", b"2025-01-01"],
    DATE: [b"infinity", b"-infinity", b"0001-01-01 BC", b"10000-01-01", b"2025-04-31",
           b"2025-01-01 00:00:00", b"1900-02-29"],
    TIME: [b"24:00:00"],  # its loader raises: the tolerant path gives the text
}

# types the C code leaves to the column's loader
BY_LOADER: dict[int, list[bytes]] = {
    JSONB: [b'{"k": 1, "big": 123456789012345678901234567890, "f": 1.5e300}', b"[1, 2.5, null]", b'"s"'],
    UUID: [b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
    TIME: [b"12:34:56.5", b"00:00:00"],
    INT4_ARRAY: [b"{1,NULL,-3}", b"{}"],
    BPCHAR: [b"ab  "],
}


def table_of(oids: list[int]) -> Table:
    columns = [Column(f"c{i}", oid, -1, i == 0) for i, oid in enumerate(oids)]
    return Table(Relation(7, "public", "t", "d", columns), TypeCatalog(), "db", True)


def tuple_data(values: list[bytes | None]) -> bytes:
    out = struct.pack("!H", len(values))
    for value in values:
        out += b"n" if value is None else b"t" + struct.pack("!i", len(value)) + value
    return out


def reference(table: Table, values: list[bytes | None]) -> Any:
    """What Table.load gives the row (values), or the error it raises."""
    try:
        return list(table.load(TupleData(list(values), True), "Insert", 0))
    except Exception as exc:  # noqa: BLE001 - the error is the outcome
        return exc


def same(a: Any, b: Any) -> bool:
    """Equal in type and value: NaN, -0.0 and the timezone object count."""
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    return getattr(a, "tzinfo", None) is getattr(b, "tzinfo", None)


def check(oids: list[int], values: list[bytes | None], *, in_c: bool | None = None) -> None:
    """The C path's record of the row against the reference; ``in_c``: whether the C path
    must (True) or must not (False) type the row itself."""
    from walex._hotpath import _typed_row

    table = table_of(oids)
    expected = reference(table, values)
    got = _typed_row(tuple_data(values), table)
    if in_c is not None:
        assert (got is not None) == in_c, (oids, values, got, expected)
    if got is None:
        return
    assert not isinstance(expected, Exception), (oids, values, got, expected)
    assert list(got) == table.column_names
    for name, value, want in zip(table.column_names, got.values(), expected):
        assert same(value, want), (name, values, value, want)


@pytest.mark.parametrize("oid", list(TYPED_IN_C))
def test_texts_postgresql_writes_are_typed_in_c_as_the_loaders_type_them(oid: int) -> None:
    for text in TYPED_IN_C[oid]:
        check([oid], [text], in_c=True)
    check([oid], [None], in_c=True)


@pytest.mark.parametrize("oid", list(NOT_IN_C))
def test_texts_the_c_code_is_not_sure_of_go_back_to_the_loaders(oid: int) -> None:
    for text in NOT_IN_C[oid]:
        check([oid], [text], in_c=False)


# texts PostgreSQL does not write: whatever the C path does with them, it must agree
ODD = [b"1e-400", b"-1e-400", b"2.4703282292062328e-324", b"0.1e1", b"1E5", b"inf", b"-nan",
       b"+1.5", b"1_0", b"1_000", "\u0661\u0662".encode(), b"0x10", b" 1", b"1 ", b"00012", b"-0"]


@pytest.mark.parametrize("oid", [FLOAT4, FLOAT8, NUMERIC, INT2, INT8, BOOL])
def test_texts_postgresql_does_not_write(oid: int) -> None:
    for text in ODD:
        check([oid], [text])


@pytest.mark.parametrize("oid", list(BY_LOADER))
def test_other_types_are_typed_by_their_loader(oid: int) -> None:
    for text in BY_LOADER[oid]:
        check([oid, INT4], [text, b"1"], in_c=True)


def test_rows_of_many_columns_nulls_and_one_unsure_value() -> None:
    oids = [INT8, INT4, TEXT, TSTZ, NUMERIC, JSONB, BOOL, FLOAT8, DATE, TS, UUID, INT4_ARRAY]
    row: list[bytes | None] = [b"1", b"2", b"row", b"2025-01-01 00:00:00+00", b"1.2345",
                               b'{"k": 1, "tag": "x"}', b"t", b"0.5", b"2025-01-01",
                               b"2025-01-01 00:00:00", b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", b"{1}"]
    check(oids, row, in_c=True)
    check(oids, [None] * len(oids), in_c=True)
    for i in range(len(oids)):  # one NULL anywhere
        check(oids, row[:i] + [None] + row[i + 1:], in_c=True)
    check(oids, row[:3] + [b"infinity"] + row[4:], in_c=False)  # typed by the tolerant path
    check(oids, row[:5] + [b"{not json"] + row[6:], in_c=False)  # the loader's error, as before


def test_a_user_loader_is_used_for_its_type() -> None:
    """A loader registered for int4 (a subclass of psycopg's) is called, not the C code."""
    from psycopg.adapt import Loader

    class Doubled(Loader):
        def load(self, data: Any) -> Any:
            return int(bytes(data)) * 2

    catalog = TypeCatalog()
    catalog.adapters.register_loader(INT4, Doubled)
    columns = [Column("a", INT4, -1, True), Column("b", INT8, -1, False)]
    table = Table(Relation(7, "public", "t", "d", columns), catalog, "db", True)
    from walex._hotpath import _typed_row

    assert _typed_row(tuple_data([b"21", b"5"]), table) == {"a": 42, "b": 5}


_NEAR = st.text(alphabet="0123456789-+:. eE_xnaINF", max_size=32).map(str.encode)
_STAMPS = st.builds(
    lambda y, mo, d, h, mi, s, frac, tail: (
        f"{y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}{frac}{tail}").encode(),
    st.integers(0, 10000), st.integers(0, 13), st.integers(0, 32), st.integers(0, 24),
    st.integers(0, 60), st.integers(0, 60),
    st.sampled_from(["", ".5", ".123456", ".000001", ".1234567", "."]),
    st.sampled_from(["", "+00", "+01", " BC", "+00 BC"]))
_DATES = st.builds(lambda y, mo, d, tail: f"{y:04d}-{mo:02d}-{d:02d}{tail}".encode(),
                   st.integers(0, 10000), st.integers(0, 13), st.integers(0, 32),
                   st.sampled_from(["", " BC"]))
_INTS = st.integers(-(2**70), 2**70).map(lambda i: str(i).encode())
_FLOATS = st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).encode())


@settings(max_examples=300, deadline=None)
@given(oid=st.sampled_from([INT2, INT4, INT8, FLOAT4, FLOAT8, NUMERIC, TSTZ, TS, DATE, BOOL]),
       text=st.one_of(_NEAR, _STAMPS, _DATES, _INTS, _FLOATS, st.binary(max_size=12)))
def test_texts_near_the_forms(oid: int, text: bytes) -> None:
    check([oid], [text])
    check([TEXT, oid], [text, text])


# -- live: what PostgreSQL writes, through both paths ---------------------------------------

LIVE_SCHEMA = r"""
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN stamp AS timestamptz;
CREATE TABLE fast (
    id bigserial PRIMARY KEY, c_bool bool, c_int2 int2, c_int4 int4, c_int8 int8,
    c_float4 float4, c_float8 float8, c_numeric numeric, c_text text, c_varchar varchar(20),
    c_tstz timestamptz, c_ts timestamp, c_date date, c_jsonb jsonb, c_posint posint,
    c_stamp stamp, c_mood mood, c_arr int[]
);
CREATE PUBLICATION pub FOR TABLE fast;
"""
LIVE_COLUMNS = ("c_bool, c_int2, c_int4, c_int8, c_float4, c_float8, c_numeric, c_text, c_varchar, "
                "c_tstz, c_ts, c_date, c_jsonb, c_posint, c_stamp, c_mood, c_arr")
# rows PostgreSQL writes the text of: canonical ones (typed in C) and edges (not all)
LIVE_ROWS = [
    "i % 2 = 0, i, i * 1000, i * 1000000000000, i / 3.0, i / 7.0, round(i * 1.2345, 4), "
    "'row ' || md5(i::text), 'v' || i, timestamptz '2025-01-01 00:00:00+00' + i * interval '1.25 second', "
    "timestamp '1999-12-31 23:59:59' + i * interval '0.001 second', date '2000-02-27' + i, "
    "jsonb_build_object('k', i, 'big', 123456789012345678901234567890, 'f', 1.5e300), i, "
    "now(), 'ok', ARRAY[i, NULL]",
    "NULL, -32768, -2147483648, -999999999999999999, '-0', '-0', '-0', '', 'caf\u00e9 \U0001f600', "
    "'0001-01-01 00:00:00+00', '0001-01-01 00:00:00', '0001-01-01', '[]', 1, "
    "'9999-12-31 23:59:59.999999+00', 'sad', '{}'",
    "true, 32767, 2147483647, 999999999999999999, 'NaN', 'Infinity', 'NaN', ' ', 'x', "
    "'9999-12-31 23:59:59.999999+00', '9999-12-31 23:59:59.999999', '9999-12-31', 'null', 2, "
    "'2000-01-01 00:00:00.000001+00', NULL, NULL",
]
LIVE_EDGES = [
    "false, 0, 0, -9223372036854775808, '-Infinity', '1e-320', 'Infinity', 'a', 'b', "
    "'infinity', '-infinity', 'infinity', '1', 3, '-infinity', 'ok', '{1}'",
    "false, 0, 0, 9223372036854775807, '3.4e38', '1.7976931348623157e308', '-Infinity', 'a', 'b', "
    "'0044-03-15 12:00:00+00 BC', '0044-03-15 12:00:00 BC', '0044-03-15 BC', '1', 3, "
    "'10000-01-01 00:00:00+00', 'ok', '{1}'",
]


def test_what_postgresql_writes_is_typed_in_c_as_by_the_pure_path(admin: Any, dsn: str) -> None:
    import asyncio

    import psycopg
    from test_hotpath import both

    from walex._hotpath import _typed_row
    from walex.lookups import LookupConnection
    from walex.pgoutput import Decoder
    from walex.relations import RelationCache

    admin.execute(LIVE_SCHEMA)
    admin.execute("SELECT pg_create_logical_replication_slot('hot', 'pgoutput')")
    for values in LIVE_ROWS:
        admin.execute(f"INSERT INTO fast ({LIVE_COLUMNS}) SELECT {values} FROM generate_series(1, 20) i")
    for values in LIVE_EDGES:
        admin.execute(f"INSERT INTO fast ({LIVE_COLUMNS}) VALUES ({values})")
    admin.execute("UPDATE fast SET c_int2 = 1 WHERE id % 10 = 0")  # 'N' only: typed in C too
    # the text forms walex's replication session fixes (walex.replication.stream)
    for setting in ("DateStyle = ISO", "IntervalStyle = postgres", "extra_float_digits = 3",
                    "TimeZone = UTC"):
        admin.execute(f"SET {setting}")
    found = admin.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('hot', NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'pub')").fetchall()
    stream = [(int(lsn.split("/")[0], 16) << 32 | int(lsn.split("/")[1], 16), bytes(data))
              for lsn, data in found]

    async def main() -> tuple[list[Any], int, int]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            out, handled = await both(stream, conn=conn)
            lookups = LookupConnection()
            lookups.use(conn, None, None)
            relations = RelationCache(TypeCatalog(lookups), "db", lambda schema, table: True)
            typed = rows = 0
            for lsn, payload in stream:
                if payload[:1] == b"R":
                    table = await relations.update(Decoder().decode(payload, lsn))
                elif payload[:1] in (b"I", b"U") and payload[5:6] == b"N":
                    rows += 1
                    typed += _typed_row(payload[6:], table) is not None
            return out, typed, rows

    out, typed, rows = asyncio.run(main())
    assert not any(isinstance(item, tuple) for item in out), out[-1]
    assert rows == 3 * 20 + 2 + 6
    assert typed == 3 * 20 + 6  # every row but the two of edges
    text = "".join(item for item in out if isinstance(item, str))
    for value in ("Decimal('NaN')", "-0.0", "'infinity'", "'0044-03-15 BC'", "123456789012345678901234567890"):
        assert value in text, value
