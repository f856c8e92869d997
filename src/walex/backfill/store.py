"""The progress store: one row per app and table, in a table of the database itself.

The table (option ``backfill_table``, default ``walex_backfill`` in the first
schema of the ``search_path``) is created on first use. Operators can read
it; ``walex status`` shows it. A row is a request and its progress:

- ``state``: ``pending`` (requested), ``running``, ``done``, ``failed``
  (``error`` says why) or ``cancelled``;
- ``last_key``: the key (text forms, in ``chunk_key`` order) of the last row
  of the last chunk whose events every handler finished; a restart resumes
  after it, unless ``key_signature`` (the key columns' types, type modifiers
  and collations, which decide their order) changed meanwhile;
- ``rows_done`` (read events delivered, each row once) of about
  ``rows_estimated`` (the planner's estimate when the backfill started),
  ``chunks_done``, ``rate`` (rows per second of the current run);
- ``read_ids``: the event ids of the rows emitted in chunks not yet marked
  done (:class:`ReadIds`), written before those reads are queued: the next
  run of the job gives a row it reads again, unchanged, the id it had (see
  :mod:`.watermarks`).

The table is created, or brought up to date from an earlier walex, under an
advisory lock, so apps asking at the same moment do not race.

Crash consistency: a chunk is marked done only after its events were
handled, so a crash re-reads at most the chunks handled since the last mark
(at-least-once), and never skips one. The store's own changes reach the
stream when the publication is ``FOR ALL TABLES``; walex never delivers them.
"""

from __future__ import annotations

import struct
from binascii import unhexlify
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import ConfigError, SetupError
from ..records import Record

__all__ = ["Job", "ReadIds", "decode_ids", "store_name", "CREATE", "REQUEST", "SELECT_ALL",
           "STATES"]

STATES = ("pending", "running", "done", "failed", "cancelled")


def store_name(option: str) -> sql.Identifier:
    return sql.Identifier(*option.split(".", 1))


CREATE = """
CREATE TABLE IF NOT EXISTS {store} (
    app text NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    condition text,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
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
    key_signature text,
    read_ids bytea,
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
    requested_at = now(), started_at = NULL, updated_at = now(), finished_at = NULL, error = NULL,
    key_signature = NULL, read_ids = NULL
WHERE s.state IN ('done', 'failed', 'cancelled') OR %(restart)s
RETURNING state
"""

# key_signature and read_ids read through to_jsonb (bytea as its hex text form): a store
# made by an earlier walex has no such columns
_FIELDS = """app, table_schema, table_name, condition, state, chunk_key, last_key, rows_done,
       rows_estimated, chunks_done, rate, requested_at, started_at, updated_at, finished_at, error,
       to_jsonb(s) ->> 'key_signature', decode(substr(to_jsonb(s) ->> 'read_ids', 3), 'hex')"""
SELECT_ALL = "SELECT " + _FIELDS + " FROM {store} s "

# a store made by an earlier walex: the key signature, the read ids' LSN, the state 'cancelled'
_UPGRADE = [
    "ALTER TABLE {store} ADD COLUMN IF NOT EXISTS key_signature text",
    "ALTER TABLE {store} ADD COLUMN IF NOT EXISTS read_ids bytea",
    "ALTER TABLE {store} DROP CONSTRAINT IF EXISTS {check}",
    "ALTER TABLE {store} ADD CONSTRAINT {check} CHECK (state IN ('pending', 'running', 'done', "
    "'failed', 'cancelled'))",
]


@dataclass(slots=True, repr=False, eq=False)
class Job(Record):
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
    key_signature: str | None = None  # the key's types and collations when it was last read
    read_ids: bytes | None = None  # ids of reads emitted, not marked done (ReadIds)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


# read_ids: groups of a high watermark's commit LSN and its number of entries n, then the
# n version digests (8 bytes each), then the n indexes (4 bytes each): 12 bytes a row
_GROUP = struct.Struct(">QI")


def decode_ids(blob: bytes | None, most: int) -> dict[bytes, str]:
    """The ids ``read_ids`` holds, by version digest (16 hex digits): the last ``most``."""
    ids: dict[bytes, str] = {}
    pos, end = 0, len(blob or b"")
    while blob and pos + _GROUP.size <= end:
        lsn, count = _GROUP.unpack_from(blob, pos)
        pos += _GROUP.size
        if pos + 12 * count > end:
            break  # cut short: what it holds is not read
        digests = blob[pos:pos + 8 * count].hex().encode()
        indexes = blob[pos + 8 * count:pos + 12 * count].hex().upper()
        pos += 12 * count
        prefix = f"{lsn:016X}-R"
        for j in range(count):
            ids[digests[16 * j:16 * j + 16]] = prefix + indexes[8 * j + 1:8 * j + 8]
    if len(ids) > most:
        ids = dict(list(ids.items())[-most:])
    return ids


class ReadIds:
    """A job's ids of reads emitted and not marked done, as ``read_ids`` stores them: those
    an earlier run left (``inherited``: kept for a run after this one until this run marks
    a chunk done, or emits the same version again), then this run's, chunk by chunk."""

    def __init__(self, inherited: dict[bytes, str]) -> None:
        self.inherited = inherited
        self.chunks: dict[int, dict[bytes, str]] = {}  # by the high watermark's end

    def emitted(self, end_lsn: int, ids: dict[bytes, str]) -> None:
        self.chunks[end_lsn] = ids
        inherited = self.inherited
        if inherited:
            for digest in ids:
                inherited.pop(digest, None)

    def done(self, end_lsn: int) -> None:
        """The chunks whose high watermarks end at or before ``end_lsn`` were marked done."""
        for end in [e for e in self.chunks if e <= end_lsn]:
            del self.chunks[end]
        self.inherited.clear()  # the stream is past them: they are not replayed any more

    def encoded(self) -> bytes | None:
        groups: dict[str, tuple[list[bytes], list[str]]] = {}
        for ids in (self.inherited, *self.chunks.values()):
            for digest, rid in ids.items():
                group = groups.get(rid[:16])
                if group is None:
                    group = groups[rid[:16]] = ([], [])
                group[0].append(digest)
                group[1].append(rid[18:])  # 7 hex digits
        parts = []
        for lsn, (digests, indexes) in groups.items():
            parts.append(_GROUP.pack(int(lsn, 16), len(digests)))
            parts.append(unhexlify(b"".join(digests)))
            parts.append(bytes.fromhex("0" + "0".join(indexes)))
        return b"".join(parts) or None


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

    async def ensure(self, conn: psycopg.AsyncConnection) -> None:
        """Create the store, or bring one made by an earlier walex up to date.

        Under a transaction-scoped advisory lock on the store's name: two apps (or
        ``walex backfill`` commands) asking at the same moment do not race to
        create it (``CREATE TABLE IF NOT EXISTS`` alone is not safe against that)."""
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '30s'")  # an upgrade waits no longer
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                   (f"walex.backfill:{self.regclass()}",))
                await conn.execute(_q(CREATE, self.option))
                cur = await conn.execute(
                    "SELECT count(*) = 2 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                    "AND attname IN ('key_signature', 'read_ids') AND NOT attisdropped",
                    (self.regclass(),))
                row = await cur.fetchone()
                if not (row and row[0]):
                    check = sql.Identifier(f"{self.option.rpartition('.')[2]}_state_check"[:63])
                    for statement in _UPGRADE:
                        await conn.execute(sql.SQL(statement).format(  # type: ignore[arg-type]
                            store=store_name(self.option), check=check))
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.InvalidSchemaName) as exc:
            raise SetupError(
                f"cannot write the backfill progress store {self.option!r}: "
                f"{str(exc).strip().splitlines()[0]}. Fix: let walex's role create the table "
                "(GRANT CREATE ON SCHEMA ...), or set backfill_table to 'schema.table' in a "
                "schema it may write"
            ) from None

    async def request(
        self, conn: psycopg.AsyncConnection, schema: str, table: str, condition: str | None,
        key: list[str], restart: bool = False,
    ) -> bool:
        """Ask for a backfill; False when an unfinished one of the table is kept instead."""
        await self.ensure(conn)
        cur = await conn.execute(_q(REQUEST, self.option), {
            "app": self.app, "schema": schema, "table": table, "condition": condition,
            "key": key, "restart": restart,
        })
        return await cur.fetchone() is not None

    async def cancel(self, conn: psycopg.AsyncConnection, spec: str) -> Job | None:
        """Mark this app's pending or running backfill of ``spec`` (``"t"`` or ``"s.t"``)
        cancelled; the job, or None when none was under way."""
        from ..handlers import table_matcher

        if not isinstance(spec, str) or not spec or spec.count(".") > 1:
            raise ConfigError(f"cancelling a backfill needs one table, 'name' or 'schema.name'; "
                              f"got {spec!r}")
        matches = table_matcher(spec)
        found = [j for j in await self.jobs(conn) if matches(j.schema, j.table)]
        if len(found) > 1:
            names = ", ".join(j.qualified for j in found)
            raise ConfigError(f"table {spec!r} is ambiguous ({names}); name it as 'schema.table'")
        if not found:
            return None
        query = _q(
            "UPDATE {store} AS s SET state = 'cancelled', error = 'cancelled', finished_at = now(), "
            "updated_at = now() WHERE app = %s AND table_schema = %s AND table_name = %s "
            "AND state IN ('pending', 'running') RETURNING " + _FIELDS, self.option)
        cur = await conn.execute(query, (self.app, found[0].schema, found[0].table))
        row = await cur.fetchone()
        return Job(*row) if row else None

    async def state(self, conn: psycopg.AsyncConnection, job: Job) -> str | None:
        """The job's state in the store now (a cancel comes from elsewhere)."""
        cur = await conn.execute(_q(
            "SELECT state FROM {store} WHERE app = %s AND table_schema = %s AND table_name = %s",
            self.option), (self.app, job.schema, job.table))
        row = await cur.fetchone()
        return row[0] if row else None

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

    async def update(self, conn: psycopg.AsyncConnection, job: Job, *, if_state: str | None = None,
                     **fields: Any) -> bool:
        """Set ``fields`` (and ``updated_at``) on the job's row, and on ``job``; with
        ``if_state``, only while the row is in that state (False when it was not)."""
        columns = {("table_name" if k == "table" else k): v for k, v in fields.items()}
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in columns
        )
        query = sql.SQL(
            "UPDATE {} SET {}, updated_at = now() WHERE app = %(app)s AND table_schema = %(schema)s "
            "AND table_name = %(table)s" + (" AND state = %(if_state)s" if if_state else "")
        ).format(store_name(self.option), assignments)
        cur = await conn.execute(query, {**columns, "app": self.app, "schema": job.schema,
                                         "table": job.table, "if_state": if_state})
        if if_state and not cur.rowcount:
            return False
        for name, value in fields.items():
            setattr(job, name, value)
        return True


def read_all(conn: psycopg.Connection, option: str) -> list[Job] | None:
    """Every app's jobs, for ``walex status`` (``None`` when the store does not exist)."""
    regclass = ".".join(f'"{part}"' for part in option.split(".", 1))
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (regclass,)).fetchone()
    if not (row and row[0]):
        return None
    query = _q(SELECT_ALL + " ORDER BY app, requested_at, table_schema, table_name", option)
    return [Job(*r) for r in conn.execute(query).fetchall()]
