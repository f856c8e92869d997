"""The progress store: one row per app and table, in a table of the database itself.

The table (option ``backfill_table``, default ``walex_backfill`` in the first
schema of the ``search_path``) is created on first use. Operators can read
it; ``walex status`` shows it. A row is a request and its progress:

- ``state``: ``pending`` (requested), ``running``, ``done`` or ``failed``
  (``error`` says why);
- ``last_key``: the key (text forms, in ``chunk_key`` order) of the last row
  of the last chunk whose events every handler finished; a restart resumes
  after it;
- ``rows_done`` of about ``rows_estimated`` (the planner's estimate when the
  backfill started), ``chunks_done``, ``rate`` (rows per second of the
  current run).

Crash consistency: a chunk is marked done only after its events were
handled, so a crash re-reads at most the chunks handled since the last mark
(at-least-once), and never skips one. The store's own changes reach the
stream when the publication is ``FOR ALL TABLES``; walex never delivers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import SetupError

__all__ = ["Job", "store_name", "CREATE", "REQUEST", "SELECT_ALL"]


def store_name(option: str) -> sql.Identifier:
    return sql.Identifier(*option.split(".", 1))


CREATE = """
CREATE TABLE IF NOT EXISTS {store} (
    app text NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    condition text,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'done', 'failed')),
    chunk_key text[],
    last_key text[],
    rows_done bigint NOT NULL DEFAULT 0,
    rows_estimated bigint,
    chunks_done integer NOT NULL DEFAULT 0,
    rate double precision,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    error text,
    PRIMARY KEY (app, table_schema, table_name)
)
"""

# a new request starts from the beginning, unless one for the table is unfinished
REQUEST = """
INSERT INTO {store} AS s (app, table_schema, table_name, condition, state, chunk_key)
VALUES (%(app)s, %(schema)s, %(table)s, %(condition)s, 'pending', %(key)s)
ON CONFLICT (app, table_schema, table_name) DO UPDATE
SET condition = excluded.condition, state = 'pending', chunk_key = excluded.chunk_key,
    last_key = NULL, rows_done = 0, rows_estimated = NULL, chunks_done = 0, rate = NULL,
    requested_at = now(), started_at = NULL, updated_at = now(), finished_at = NULL, error = NULL
WHERE s.state IN ('done', 'failed') OR %(restart)s
RETURNING state
"""

SELECT_ALL = """
SELECT app, table_schema, table_name, condition, state, chunk_key, last_key, rows_done,
       rows_estimated, chunks_done, rate, requested_at, started_at, updated_at, finished_at, error
FROM {store}
"""


@dataclass(slots=True)
class Job:
    """One row of the store."""

    app: str
    schema: str
    table: str
    condition: str | None
    state: str
    chunk_key: list[str] | None
    last_key: list[str] | None
    rows_done: int
    rows_estimated: int | None
    chunks_done: int
    rate: float | None
    requested_at: datetime
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None
    error: str | None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


def _q(template: str, option: str) -> sql.Composed:
    return sql.SQL(template).format(store=store_name(option))  # type: ignore[arg-type]


class Store:
    """The store's operations for one app, on an async connection."""

    def __init__(self, option: str, app: str) -> None:
        self.option = option
        self.app = app

    def excludes(self, schema: str, table: str) -> bool:
        """Whether ``schema.table`` is the store (its changes are never delivered)."""
        want_schema, dot, want_table = self.option.rpartition(".")
        return table == want_table and (not dot or schema == want_schema)

    async def exists(self, conn: psycopg.AsyncConnection) -> bool:
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self.regclass(),))
        row = await cur.fetchone()
        return bool(row and row[0])

    def regclass(self) -> str:
        """The store's name as ``to_regclass`` takes it."""
        return ".".join(f'"{part}"' for part in self.option.split(".", 1))

    async def request(
        self, conn: psycopg.AsyncConnection, schema: str, table: str, condition: str | None,
        key: list[str], restart: bool = False,
    ) -> bool:
        """Ask for a backfill; False when an unfinished one of the table is kept instead."""
        try:
            await conn.execute(_q(CREATE, self.option))
            cur = await conn.execute(_q(REQUEST, self.option), {
                "app": self.app, "schema": schema, "table": table, "condition": condition,
                "key": key, "restart": restart,
            })
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.InvalidSchemaName) as exc:
            raise SetupError(
                f"cannot write the backfill progress store {self.option!r}: "
                f"{str(exc).strip().splitlines()[0]}. Fix: let walex's role create the table "
                "(GRANT CREATE ON SCHEMA ...), or set backfill_table to 'schema.table' in a "
                "schema it may write"
            ) from None
        return await cur.fetchone() is not None

    async def jobs(self, conn: psycopg.AsyncConnection, unfinished: bool = True) -> list[Job]:
        """This app's jobs (unfinished ones only by default), oldest request first."""
        if not await self.exists(conn):
            return []
        query = _q(SELECT_ALL + " WHERE app = %s" + (
            " AND state IN ('pending', 'running')" if unfinished else ""
        ) + " ORDER BY requested_at, table_schema, table_name", self.option)
        cur = await conn.execute(query, (self.app,))
        return [Job(*row) for row in await cur.fetchall()]

    async def job(self, conn: psycopg.AsyncConnection, schema: str, table: str) -> Job | None:
        query = _q(SELECT_ALL + " WHERE app = %s AND table_schema = %s AND table_name = %s",
                   self.option)
        cur = await conn.execute(query, (self.app, schema, table))
        row = await cur.fetchone()
        return Job(*row) if row else None

    async def update(self, conn: psycopg.AsyncConnection, job: Job, **fields: Any) -> None:
        """Set ``fields`` (and ``updated_at``) on the job's row, and on ``job``."""
        for name, value in fields.items():
            setattr(job, name, value)
        columns = {("table_name" if k == "table" else k): v for k, v in fields.items()}
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in columns
        )
        query = sql.SQL(
            "UPDATE {} SET {}, updated_at = now() WHERE app = %(app)s AND table_schema = %(schema)s "
            "AND table_name = %(table)s"
        ).format(store_name(self.option), assignments)
        await conn.execute(query, {**columns, "app": self.app, "schema": job.schema, "table": job.table})


def read_all(conn: psycopg.Connection, option: str) -> list[Job] | None:
    """Every app's jobs, for ``walex status`` (``None`` when the store does not exist)."""
    regclass = ".".join(f'"{part}"' for part in option.split(".", 1))
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (regclass,)).fetchone()
    if not (row and row[0]):
        return None
    query = _q(SELECT_ALL + " ORDER BY app, requested_at, table_schema, table_name", option)
    return [Job(*r) for r in conn.execute(query).fetchall()]
