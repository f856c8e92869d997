"""The direct encoder's twins at the edges of every type, through a real PostgreSQL.

Values PostgreSQL writes at the limits of each plain writer (int limits, float
NaN/Infinity/-0/denormals, numeric NaN/Infinity/huge precision, infinite, BC and
far-future dates and timestamps, text with every character JSON escapes, U+2028/U+2029),
NULLs in every position, texts and jsonb sized around the compiled writers' buffer sizes
(the 2,048-byte stack buffer and its doublings) and past 1 MB (TOASTed), a table of 1,600
columns: both twins give the reference's bytes (``test_direct.check``) or leave the event.
(Text not UTF-8 of a ``SQL_ASCII`` database never reaches them: the walsender of a
session whose client_encoding is UTF8, as walex's, refuses to convert it.)
"""

from __future__ import annotations

import psycopg

from destinations.test_direct import check, raw_events, slot

EDGES = """
CREATE TABLE e (id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
                n numeric, t text, v varchar, b bool, d date, ts timestamp, tz timestamptz,
                j jsonb, u uuid);
ALTER TABLE e REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR TABLE e;
"""

COLUMNS = ["i2", "i4", "i8", "f4", "f8", "n", "t", "v", "b", "d", "ts", "tz", "j", "u"]

EDGE_VALUES: dict[str, list[str]] = {
    "i2": ["-32768", "32767", "0", "-1"],
    "i4": ["-2147483648", "2147483647"],
    "i8": ["-9223372036854775808", "9223372036854775807", "9007199254740991",
           "9007199254740992", "-9007199254740991", "-9007199254740992", "999999999999999",
           "1000000000000000"],
    "f4": ["'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "1e-45", "3.4028235e38", "1.17549435e-38"],
    "f8": ["'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "5e-324", "2.2250738585072014e-308",
           "1.7976931348623157e308", "0.1", "1e22", "1e21", "123456789012345680000"],
    "n": ["'NaN'", "'Infinity'", "'-Infinity'", "0", "-0.0", "0.0000000001", "1e-100",
          "repeat('9', 1000)::numeric", "('1' || repeat('0', 130000))::numeric",
          "(repeat('1', 1000) || '.' || repeat('2', 16383))::numeric", "1e20", "-1.50"],
    "t": ["''", "E'\\x01\\x02\\x1f\\x7f\"\\\\/'", "E'\\u2028\\u2029'", "E'\\U0001F600 caf\\u00e9'",
          "E'\\b\\f\\n\\r\\t'", "repeat('x', 2000)", "repeat('\"', 1500)"],
    "v": ["''", "E'\\u0080\\u07ff\\u0800\\uffff\\U00010000\\U0010FFFF'"],
    "b": ["true", "false"],
    "d": ["'infinity'", "'-infinity'", "'0001-01-01 BC'", "'4713-01-01 BC'", "'5874897-12-31'",
          "'10000-01-01'", "'9999-12-31'", "'0001-01-01'"],
    "ts": ["'infinity'", "'-infinity'", "'0001-01-01 00:00:00 BC'", "'294276-12-31 23:59:59.999999'",
           "'10000-01-01 00:00:00'", "'9999-12-31 23:59:59.999999'", "'2000-01-01 00:00:00.000001'",
           "'2000-01-01 00:00:00.1'"],
    "tz": ["'infinity'", "'-infinity'", "'0001-01-01 00:00:00+00 BC'", "'294276-12-31 23:59:59.999999+00'",
           "'10000-01-01 00:00:00+00'", "'9999-12-31 23:59:59.999999+00'", "'1901-12-13 20:45:52+00'",
           "'2000-01-01 00:00:00.5+05:30'"],
    "j": ["'{}'", "'[]'", "'\"\"'", "'null'", "'{\"a\": \"\\u0001\\u001f\\b\\f\\n\\r\\t\\\\\\\"/\"}'",
          "E'{\"\\u2028\": \"\\u2029\"}'", "'[-0, 0, 1e2, 1.5, 123456789012345, 1234567890123456]'",
          "'[9007199254740993]'", "(repeat('[', 64) || repeat(']', 64))::jsonb",
          "(repeat('[', 65) || repeat(']', 65))::jsonb"],
    "u": ["'00000000-0000-0000-0000-000000000000'", "'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF'"],
}


def _rows() -> list[str]:
    """One row per edge value, the other columns NULL; then rows of every column set."""
    rows = []
    for column in COLUMNS:
        for value in EDGE_VALUES[column]:
            rows.append(f"INSERT INTO e (id, {column}) VALUES ({len(rows) + 1}, {value})")
    first = {c: EDGE_VALUES[c][0] for c in COLUMNS}
    last = {c: EDGE_VALUES[c][-1] for c in COLUMNS}
    for values in (first, last):
        rows.append(f"INSERT INTO e VALUES ({len(rows) + 1}, {', '.join(values[c] for c in COLUMNS)})")
    return rows


def test_values_at_the_edges_of_every_type(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EDGES)
    slot(admin)
    rows = _rows()
    for statement in rows:
        admin.execute(statement)
    admin.execute("UPDATE e SET b = NOT coalesce(b, false) WHERE id % 3 = 0")
    admin.execute("DELETE FROM e WHERE id % 5 = 0")
    events = raw_events(admin, dsn)
    assert len(events) == len(rows) + len(rows) // 3 + len(rows) // 5
    assert check(events, (1, 3)) >= len(events) - 20


def test_values_sized_around_the_buffers(admin: psycopg.Connection, dsn: str) -> None:
    """text and jsonb of sizes near the writers' buffer sizes (the 2,048-byte stack buffer,
    256 for keys, and their doublings), past 1 MB, escaped or not, as values and keys."""
    admin.execute("CREATE TABLE s (k text PRIMARY KEY, t text, j jsonb); "
                  "ALTER TABLE s REPLICA IDENTITY FULL; CREATE PUBLICATION pub FOR TABLE s")
    slot(admin)
    sizes = sorted({n + d for n in (256, 512, 1024, 2048, 4096, 8192, 1 << 20)
                    for d in (-300, -200, -40, -2, -1, 0, 1, 2) if n + d > 0})
    for i, n in enumerate(sizes):
        admin.execute("INSERT INTO s VALUES (%s, repeat(%s, %s), jsonb_build_object('x', repeat(%s, %s)))",
                      (f"{i}" + "k" * min(n, 2000), "a" if i % 2 else "\n", n, "b" if i % 3 else "\"", n))
    admin.execute("UPDATE s SET t = t || 'z'")
    events = raw_events(admin, dsn)
    # (an update of a row whose jsonb is TOASTed sends it unchanged: no RawEvent)
    assert len(events) >= len(sizes) + 40
    assert check(events, (1,)) == len(events)


def test_a_table_of_1600_columns(admin: psycopg.Connection, dsn: str) -> None:
    columns = ", ".join(f"c{i} int" for i in range(1599))
    admin.execute(f"CREATE TABLE w (id int PRIMARY KEY, {columns}); "
                  "ALTER TABLE w REPLICA IDENTITY FULL; CREATE PUBLICATION pub FOR TABLE w")
    slot(admin)
    admin.execute(f"INSERT INTO w VALUES (1, {', '.join(str(i) for i in range(1599))})")
    admin.execute("INSERT INTO w (id) VALUES (2)")
    admin.execute("UPDATE w SET c1598 = -1")
    admin.execute("DELETE FROM w")
    events = raw_events(admin, dsn)
    assert len(events) == 6
    assert check(events, (1,)) == 6


def test_a_table_of_no_columns(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("CREATE TABLE z (); ALTER TABLE z REPLICA IDENTITY FULL; "
                  "CREATE PUBLICATION pub FOR TABLE z")
    slot(admin)
    admin.execute("INSERT INTO z DEFAULT VALUES; INSERT INTO z DEFAULT VALUES")
    admin.execute("DELETE FROM z")
    events = raw_events(admin, dsn)
    assert len(events) == 4
    check(events, (1, 3))
