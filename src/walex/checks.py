"""Checks that PostgreSQL is ready for CDC as configured, before any slot exists.

Each failed check raises :class:`~walex.errors.SetupError` naming what is
wrong and the SQL or setting that fixes it. Nothing here changes the
database; ``walex setup`` is where fixes are applied on request.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from .errors import SetupError
from .handlers import table_matcher
from .records import Record

# seconds the server has to answer the checks (a silent network counts as a lost connection)
CHECK_TIMEOUT = 30.0

__all__ = ["Preflight", "preflight", "quote_ident"]


@dataclass(slots=True, repr=False, eq=False)
class Preflight(Record):
    """What the checks at the start of a session found out about the server."""

    database: str
    server_version: int
    published: set[tuple[str, str]]  # (schema, table) in the publication
    all_tables: bool
    wal_sender_timeout: float = 60.0  # seconds; 0: the server never times out a walsender
    # (wal_status, confirmed_flush_lsn) of the slot asked about; None when it does not exist
    slot: tuple[str | None, str | None] | None = None
    store_exists: bool = True  # whether the backfill progress store asked about exists


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# Every check in one statement (one round trip), in the simple query protocol with the
# values bound by the client: it runs on a replication connection before START_REPLICATION
# as well as on a normal one. On a replication connection the role's REPLICATION attribute
# is not looked up: the server admits no walsender without it (nor superuser). The
# timeout is read from current_setting (shown with its unit, "1min", "500ms", "0"), not
# the pg_settings view, which builds a row for every setting (~1 ms on a new backend).
_CHECKS = (
    "SELECT current_setting('wal_level'), current_database(), {role}, current_user, "
    "(SELECT puballtables FROM pg_publication WHERE pubname = %(pub)s), "
    "ARRAY(SELECT ARRAY[schemaname::text, tablename::text] FROM pg_publication_tables "
    "WHERE pubname = %(pub)s), "
    "extract(epoch FROM current_setting('wal_sender_timeout')::interval)::float8, "
    "(SELECT ARRAY[wal_status, confirmed_flush_lsn::text] FROM pg_replication_slots "
    "WHERE slot_name = %(slot)s), "
    "%(store)s::text IS NULL OR to_regclass(%(store)s::text) IS NOT NULL"
)
_CHECKS_NORMAL = _CHECKS.format(
    role="(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)")
_CHECKS_WALSENDER = _CHECKS.format(role="true")


async def preflight(
    conn: psycopg.AsyncConnection, publication: str, subscriptions: list[str], *,
    slot: str | None = None, store: str | None = None, walsender: bool = False,
) -> Preflight:
    """Check the setup for streaming ``publication``; raises SetupError naming the fix.

    Also reads, in the same round trip, the state of replication slot ``slot``
    and whether the relation ``store`` (a regclass text) exists, when given.
    ``walsender``: ``conn`` is a replication connection (its role may replicate).
    """
    cur = psycopg.AsyncClientCursor(conn)
    await cur.execute(_CHECKS_WALSENDER if walsender else _CHECKS_NORMAL,
                      {"pub": publication, "slot": slot, "store": store})
    row = await cur.fetchone()
    assert row is not None
    wal_level, database, can_replicate, user, all_tables, tables, timeout, slot_state, store_exists = row
    if wal_level != "logical":
        raise SetupError(
            f"wal_level is {wal_level!r}, logical replication needs 'logical'. Fix: run "
            "ALTER SYSTEM SET wal_level = 'logical'; then restart PostgreSQL "
            "(on a managed service, set the parameter group, e.g. rds.logical_replication = 1)."
        )
    if not can_replicate:
        raise SetupError(
            f"role {user!r} may not start replication. Fix: ALTER ROLE {quote_ident(user)} REPLICATION;"
        )
    if all_tables is None:
        raise SetupError(
            f"publication {publication!r} does not exist in database {database!r}. Fix: "
            f"CREATE PUBLICATION {quote_ident(publication)} FOR ALL TABLES; "
            f"(or FOR TABLE with the tables to stream)"
        )
    published = {(s, t) for s, t in tables}
    for spec in subscriptions:
        if spec == "*":
            continue
        matches = table_matcher(spec)
        if any(matches(s, t) for s, t in published):
            continue
        schema, _, table = spec.rpartition(".")
        await cur.execute(
            "SELECT n.nspname, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = %s AND c.relkind IN ('r', 'p') AND (%s = '' OR n.nspname = %s)",
            (table, schema, schema),
        )
        found = await cur.fetchall()
        if not found:
            quoted = (
                "Names are written unquoted, as PostgreSQL stores them (case matters): "
                f"{spec.replace(chr(34), '')!r}, not {spec!r}. " if '"' in spec else ""
            )
            raise SetupError(
                f"subscribed table {spec!r} does not exist in database {database!r}. {quoted}"
                "Fix: create it, or remove it from subscriptions."
            )
        await _check_partitions(cur, spec, found[0][1], publication, published)
        qualified = f"{quote_ident(found[0][0])}.{quote_ident(table)}"
        raise SetupError(
            f"subscribed table {spec!r} is not in publication {publication!r}, so PostgreSQL "
            f"will never send its changes. Fix: ALTER PUBLICATION {quote_ident(publication)} "
            f"ADD TABLE {qualified};"
        )
    return Preflight(
        database, conn.info.server_version, published, bool(all_tables),
        float(timeout) if timeout else 0.0,
        (slot_state[0], slot_state[1]) if slot_state is not None else None, bool(store_exists),
    )


async def _check_partitions(
    cur: psycopg.AsyncCursor, spec: str, oid: int, publication: str,
    published: set[tuple[str, str]],
) -> None:
    """Explain a partitioned table or a partition whose changes go out under another name."""
    pub = quote_ident(publication)
    await cur.execute(
        "SELECT n.nspname, c.relname, t.relid = %s::regclass FROM pg_partition_tree(%s::regclass) t "
        "JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE t.isleaf ORDER BY c.relname",
        (oid, oid),
    )
    leaves = [(s, t) for s, t, itself in await cur.fetchall() if not itself]
    published_leaves = [f"{s}.{t}" for s, t in leaves if (s, t) in published]
    if published_leaves:
        raise SetupError(
            f"subscribed table {spec!r} is partitioned, and publication {publication!r} sends "
            f"its changes under the names of its partitions ({', '.join(published_leaves)}) "
            "because its publish_via_partition_root is false. Fix: ALTER PUBLICATION "
            f"{pub} SET (publish_via_partition_root = true); or subscribe to the partitions."
        )
    await cur.execute(
        "SELECT n.nspname, c.relname FROM pg_partition_ancestors(%s::regclass) a "
        "JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE a.relid <> %s::regclass",
        (oid, oid),
    )
    ancestors = [f"{s}.{t}" for s, t in await cur.fetchall() if (s, t) in published]
    if ancestors:
        raise SetupError(
            f"subscribed table {spec!r} is a partition, and publication {publication!r} sends "
            f"its changes as those of {ancestors[0]!r} because its publish_via_partition_root "
            f"is true. Fix: subscribe to {ancestors[0]!r} instead, or ALTER PUBLICATION {pub} "
            "SET (publish_via_partition_root = false);"
        )
