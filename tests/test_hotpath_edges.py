"""The compiled hot path at the edges, through a real PostgreSQL: both paths give the same.

Rows of values at the edges of every type typed in C (``_hotpath_values.pxi``: int limits,
float NaN/Infinity/-0/denormals, numeric NaN/Infinity/huge precision, infinite, BC and
far-future dates and timestamps, text JSON escapes, U+2028/U+2029), NULLs in every
position; inserts and updates without an old row (the rows typed in C) and with one;
unchanged TOAST values; a table altered mid-stream (columns added, dropped, retyped with
the same count: a new Relation message each time); a table of 1,600 columns; values past
1 MB. ``test_hotpath.both`` replays each stream through the pure and the compiled path.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from destinations.test_direct_edges import EDGES, _rows
from test_hotpath import both

from walex import hotpath

pytestmark = pytest.mark.skipif(not hotpath.compiled_available(),
                                reason="walex._hotpath (the compiled hot path) is not built")


def _stream(admin: psycopg.Connection) -> list[tuple[int, bytes]]:
    found = admin.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('hot', NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'pub')").fetchall()
    return [(int(lsn.split("/")[0], 16) << 32 | int(lsn.split("/")[1], 16), bytes(data))
            for lsn, data in found]


def _both(dsn: str, stream: list[tuple[int, bytes]], **options: Any) -> tuple[str, int]:
    async def main() -> tuple[list[Any], int]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await both(stream, conn=conn, **options)

    out, handled = asyncio.run(main())
    assert not any(isinstance(item, tuple) for item in out), out[-1]  # no error
    return "".join(item for item in out if isinstance(item, str)), handled


def _slot(admin: psycopg.Connection) -> None:
    admin.execute("SELECT pg_create_logical_replication_slot('hot', 'pgoutput')")


def test_values_at_the_edges_of_every_type(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EDGES)
    _slot(admin)
    rows = _rows()
    for statement in rows:
        admin.execute(statement)
    admin.execute("UPDATE e SET b = NOT coalesce(b, false) WHERE id % 3 = 0")  # FULL: old rows
    admin.execute("ALTER TABLE e REPLICA IDENTITY DEFAULT")
    admin.execute("UPDATE e SET b = coalesce(b, false) WHERE id % 2 = 0")  # no old row
    admin.execute("DELETE FROM e WHERE id % 5 = 0")
    text, handled = _both(dsn, _stream(admin))
    assert handled >= len(rows)
    for value in ("Decimal('NaN')", "Decimal('-Infinity')", "-0.0", "5e-324", "'infinity'",
                  "'0001-01-01 BC'", "'10000-01-01'", "\\u2028", "-9223372036854775808"):
        assert value in text, value


def test_a_table_altered_mid_stream(admin: psycopg.Connection, dsn: str) -> None:
    """Each change of the definition sends a new Relation: a column added, dropped, retyped
    (the same count: the kinds planned for the old definition must not serve)."""
    admin.execute("CREATE TABLE m (id int PRIMARY KEY, a int, b text); CREATE PUBLICATION pub FOR TABLE m")
    _slot(admin)
    steps = ["INSERT INTO m VALUES (1, 10, 'x')",
             "ALTER TABLE m ALTER COLUMN a TYPE text", "INSERT INTO m VALUES (2, '20', 'y')",
             "ALTER TABLE m ALTER COLUMN b TYPE numeric USING 5", "INSERT INTO m VALUES (3, '30', 7.5)",
             "ALTER TABLE m ADD COLUMN c timestamptz DEFAULT '2020-01-01'", "INSERT INTO m (id) VALUES (4)",
             "UPDATE m SET a = 'changed' WHERE id = 1",
             "ALTER TABLE m DROP COLUMN a", "INSERT INTO m VALUES (5, 1.5, 'infinity')",
             "ALTER TABLE m ALTER COLUMN b TYPE float8", "INSERT INTO m VALUES (6, 'NaN', NULL)",
             "ALTER TABLE m ALTER COLUMN b TYPE int8 USING 9223372036854775807",
             "INSERT INTO m VALUES (7, -9223372036854775808, now())",
             "UPDATE m SET c = '1999-12-31 23:59:59.5'"]
    for statement in steps:
        admin.execute(statement)
    text, handled = _both(dsn, _stream(admin))
    assert handled >= 10
    for value in ("'a': '20'", "'b': Decimal('7.5')", "'b': nan", "'b': 9223372036854775807"):
        assert value in text, value


def test_unchanged_toast_and_values_past_a_megabyte(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("CREATE TABLE big (id int PRIMARY KEY, n int, t text, j jsonb); "
                  "CREATE PUBLICATION pub FOR TABLE big")
    _slot(admin)
    admin.execute("INSERT INTO big SELECT g, g, repeat(md5(g::text), 40000), "
                  "jsonb_build_object('k', repeat(md5(g::text), 40000)) FROM generate_series(1, 3) g")
    admin.execute("UPDATE big SET n = n + 1")  # t, j unchanged TOAST: 'u', typed as before
    admin.execute("UPDATE big SET t = 'short' WHERE id = 1")
    admin.execute("UPDATE big SET id = id + 10 WHERE id = 2")  # the key: an old row 'K'
    admin.execute("DELETE FROM big")
    text, handled = _both(dsn, _stream(admin))
    assert handled >= 10 and len(text) > 3_000_000


def test_a_table_of_1600_columns(admin: psycopg.Connection, dsn: str) -> None:
    columns = ", ".join(f"c{i} {('int', 'text', 'float8', 'date')[i % 4]}" for i in range(1599))
    admin.execute(f"CREATE TABLE w (id int PRIMARY KEY, {columns}); CREATE PUBLICATION pub FOR TABLE w")
    _slot(admin)
    values = ", ".join(("7", "'t'", "'-0'", "'infinity'")[i % 4] if i % 5 else "NULL" for i in range(1599))
    admin.execute(f"INSERT INTO w VALUES (1, {values})")
    admin.execute("INSERT INTO w (id) VALUES (2)")
    admin.execute("UPDATE w SET c1596 = 1")
    admin.execute("DELETE FROM w")
    text, handled = _both(dsn, _stream(admin))
    assert handled >= 5 and "'c1598': None" in text


@pytest.mark.parametrize("session", [
    "SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Kolkata'; SET extra_float_digits = 0",
    "SET DateStyle = 'German'; SET TimeZone = 'America/St_Johns'; SET extra_float_digits = -15",
    "SET DateStyle = 'Postgres, MDY'; SET TimeZone = 'Europe/Amsterdam'",
    "SET DateStyle = 'ISO, YMD'; SET TimeZone = '+14'",
])
def test_text_written_under_other_session_settings(admin: psycopg.Connection, dsn: str,
                                                    session: str) -> None:
    """walex's replication session fixes DateStyle, TimeZone and extra_float_digits; text
    written under others (a stream decoded elsewhere) is never typed in C as something
    else: both paths give the same (the C path refuses what is not its forms), an error
    included (extra_float_digits=0 rounds the largest float8 past its range)."""
    admin.execute(EDGES)
    _slot(admin)
    for statement in _rows():
        admin.execute(statement)
    admin.execute("ALTER TABLE e REPLICA IDENTITY DEFAULT")
    admin.execute("UPDATE e SET b = coalesce(b, false) WHERE id % 2 = 0")
    admin.execute(session)
    stream = _stream(admin)

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await both(stream, conn=conn)  # the same outcome, error or not

    asyncio.run(main())


def test_a_table_of_no_columns(admin: psycopg.Connection, dsn: str) -> None:
    """A table with no column (or none left after DROP COLUMN): empty rows, both paths."""
    admin.execute("CREATE TABLE z (); CREATE TABLE y (a int); ALTER TABLE z REPLICA IDENTITY FULL; "
                  "CREATE PUBLICATION pub FOR TABLE z, y")
    _slot(admin)
    admin.execute("INSERT INTO z DEFAULT VALUES; INSERT INTO y VALUES (1)")
    admin.execute("ALTER TABLE y DROP COLUMN a; INSERT INTO y DEFAULT VALUES")
    admin.execute("DELETE FROM z")
    for raw in (False, True):
        text, handled = _both(dsn, _stream(admin), raw=raw)
        assert handled >= 4 and "new_record={}" in text
