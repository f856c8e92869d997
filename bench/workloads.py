"""The benchmark's workloads: tables, SQL and their setup, for run.py (via harness.py) and replay.py.

W1 inserts rows of ``bench_rows`` in one transaction, W2 commits them one per
transaction, W3 updates every row of a filled ``bench_rows`` (REPLICA
IDENTITY FULL), W4 inserts rows of the 50-column ``bench_wide``, W5 is W1 at
5M rows. :func:`reset_tables`, :func:`prepare_rows` and :func:`workload_sql`
are the one definition both the runner and the replay set them up with.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

__all__ = ["PGBENCH_INSERT", "ROWS_DDL", "WORKLOADS", "Workload", "prepare_rows", "reset_tables",
           "row_insert_sql", "rows_insert_sql", "wide_ddl", "wide_insert_sql", "workload_sql"]

ROWS_DDL = """
CREATE TABLE bench_rows (
    id bigserial PRIMARY KEY,
    a  int,
    b  text,
    c  timestamptz,
    d  numeric,
    e  jsonb
)"""


def rows_insert_sql(n: int) -> str:
    return (
        "INSERT INTO bench_rows (a, b, c, d, e) "
        "SELECT i, 'row ' || md5(i::text), "
        "timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second', "
        "round(i * 1.2345, 4), jsonb_build_object('k', i, 'tag', 'x', 'even', i % 2 = 0) "
        f"FROM generate_series(1, {n}) AS i"
    )


# W2's transaction: one row of bench_rows made from {i}
_ROW_INSERT = ("INSERT INTO bench_rows (a, b, c, d, e) VALUES ({i}::int, 'row ' || md5({i}::int::text), "
               "now(), round({i}::int * 1.2345, 4), jsonb_build_object('k', {i}::int, 'tag', 'x', "
               "'even', {i}::int % 2 = 0))")


def row_insert_sql(i: int) -> str:
    """One W2 transaction, for ``i`` (what pgbench runs with a random ``i``)."""
    return _ROW_INSERT.format(i=int(i))


PGBENCH_INSERT = f"\\set i random(1, 100000000)\n{_ROW_INSERT.format(i=':i')};\n"

# (type, SQL expression of i and k) for the 49 data columns of the wide table
_WIDE_TYPES = [
    ("int", "(i + {k})"),
    ("bigint", "(i::bigint * 1000 + {k})"),
    ("text", "'v{k}-' || i"),
    ("numeric", "round((i + {k}) * 0.01, 2)"),
    ("timestamptz", "timestamptz '2025-01-01 00:00:00+00' + (i + {k}) * interval '1 minute'"),
    ("boolean", "(i + {k}) % 2 = 0"),
    ("double precision", "(i + {k}) / 7.0::float8"),
    ("jsonb", "jsonb_build_object('k', {k}, 'i', i)"),
    ("uuid", "md5(i::text || '{k}')::uuid"),
    ("date", "date '2025-01-01' + ((i + {k}) % 3650)"),
    ("varchar(32)", "substr(md5(i::text), 1, 16)"),
]
WIDE_COLUMNS = 50


def wide_ddl() -> str:
    cols = ["id bigserial PRIMARY KEY"]
    for k in range(1, WIDE_COLUMNS):
        cols.append(f"c{k:02d} {_WIDE_TYPES[k % len(_WIDE_TYPES)][0]}")
    return "CREATE TABLE bench_wide (\n    " + ",\n    ".join(cols) + "\n)"


def wide_insert_sql(n: int) -> str:
    names = [f"c{k:02d}" for k in range(1, WIDE_COLUMNS)]
    exprs = [_WIDE_TYPES[k % len(_WIDE_TYPES)][1].format(k=k) for k in range(1, WIDE_COLUMNS)]
    return (f"INSERT INTO bench_wide ({', '.join(names)}) SELECT {', '.join(exprs)} "
            f"FROM generate_series(1, {n}) AS i")


@dataclass(frozen=True)
class Workload:
    name: str
    base_rows: int
    table: str
    desc: str

    def rows(self, scale: float) -> int:
        return max(1, round(self.base_rows * scale))


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", 1_000_000, "bench_rows",
                   "{rows:,} rows INSERTed in one transaction (bigint, int, text, timestamptz, numeric, jsonb)"),
    "W2": Workload("W2", 100_000, "bench_rows",
                   "{rows:,} single-row INSERT transactions (pgbench -c 1 -M prepared)"),
    "W3": Workload("W3", 200_000, "bench_rows",
                   "{rows:,} rows UPDATEd in one transaction, REPLICA IDENTITY FULL"),
    "W4": Workload("W4", 100_000, "bench_wide",
                   "{rows:,} rows of a 50-column table (11 types) INSERTed in one transaction"),
    "W5": Workload("W5", 5_000_000, "bench_rows",
                   "{rows:,} rows INSERTed in one transaction (as W1; memory)"),
}


def reset_tables(conn: psycopg.Connection, table: str, publication: str,
                 marker: str | None = None) -> None:
    """Drop every slot, the publication and the bench tables; create ``table`` (and
    ``marker``) and the publication of them."""
    for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    conn.execute(f"DROP PUBLICATION IF EXISTS {publication}")
    conn.execute(f"DROP TABLE IF EXISTS bench_rows, bench_wide{f', {marker}' if marker else ''}")
    conn.execute(ROWS_DDL if table == "bench_rows" else wide_ddl())
    tables = table
    if marker:
        conn.execute(f"CREATE TABLE {marker} (id serial PRIMARY KEY, note text)")
        tables += f", {marker}"
    conn.execute(f"CREATE PUBLICATION {publication} FOR TABLE {tables}")


def prepare_rows(conn: psycopg.Connection, name: str, rows: int) -> None:
    """What a workload needs before the slots exist (W3: the rows it updates, sent whole)."""
    if name == "W3":
        conn.execute(rows_insert_sql(rows))
        conn.execute("ALTER TABLE bench_rows REPLICA IDENTITY FULL")
        conn.execute("VACUUM ANALYZE bench_rows")


def workload_sql(name: str, rows: int) -> str:
    """The one statement of a single-transaction workload (W1, W3, W4, W5); W2 is
    ``rows`` transactions of :func:`row_insert_sql` instead."""
    if name in ("W1", "W5"):
        return rows_insert_sql(rows)
    if name == "W3":
        return "UPDATE bench_rows SET a = a + 1, d = d + 1"
    if name == "W4":
        return wide_insert_sql(rows)
    raise ValueError(f"{name} is not a single-transaction workload")
