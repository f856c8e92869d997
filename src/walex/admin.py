"""What ``walex status`` reports and what ``walex setup`` changes.

:func:`inspect_database` reads (never writes) everything an operator needs
to know before and while streaming: ``wal_level``, replication capacity,
the publication and the replica identity of its tables, every slot with its
client, lag and WAL status. Each problem comes with the SQL or setting that
fixes it. Without a publication (None) it reports the rest and checks none.
What ``walex setup`` checks and changes is :mod:`walex.diagnosis`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # psycopg is imported by the functions that query (the CLI imports
    import psycopg  # this module for human_size and Status, also for commands that never connect)

__all__ = ["Problem", "Status", "check_slot_name", "inspect_database", "human_size",
           "name_encoding_problem"]

# character_not_in_repertoire (invalid byte sequence), untranslatable_character
_ENCODING_ERRORS = ("22021", "22P05")
_FIND_NAMES = (
    "SELECT c.oid::int, encode(convert_to(n.nspname || '.' || c.relname, 'SQL_ASCII'), "
    "'escape') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND n.nspname || c.relname !~ '^[ -~]*$';")


def name_encoding_problem(conn: psycopg.Connection, exc: BaseException) -> tuple[str, str] | None:
    """(what, fix) when ``exc`` is the server unable to send a name as UTF-8, else None.

    walex's connections read UTF-8 (:meth:`walex.config.WalExSettings.conninfo`):
    a ``SQL_ASCII`` database keeps a name as the bytes it was written in, and
    the server refuses to send bytes that are not UTF-8 as UTF-8.
    """
    import psycopg

    if getattr(exc, "sqlstate", None) not in _ENCODING_ERRORS:
        return None
    message = str(exc).strip().splitlines()[0]
    try:
        row = conn.execute("SELECT current_setting('server_encoding')").fetchone()
        encoding = str(row[0]) if row else "?"
    except psycopg.Error:
        encoding = "?"
    why = ("which keeps a name as the bytes it was written in" if encoding == "SQL_ASCII"
           else "and a character of it has no UTF-8 form")
    what = (f"a table's or schema's name is not valid UTF-8 ({message}): the database's "
            f"encoding is {encoding}, {why}, and walex reads every name as UTF-8")
    fix = ("rename it to a UTF-8 name (or move the data to a UTF8 database); the names "
           f"that are not plain ASCII, their bytes escaped: {_FIND_NAMES} then rename one by "
           "its oid: DO $$ BEGIN EXECUTE format('ALTER TABLE %s RENAME TO new_name', "
           "OID::regclass); END $$; (ALTER SCHEMA for a schema)")
    return what, fix


@dataclass(slots=True)
class Problem:
    what: str
    fix: str
    fatal: bool = True


@dataclass(slots=True)
class Status:
    server_version: str
    wal_level: str
    database: str
    publication: str | None  # None: none was given, none was checked
    publication_exists: bool
    tables: list[dict[str, Any]] = field(default_factory=list)  # schema, table, replica_identity
    slots: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # the slot asked for (walex status --slot) when it is not one of ``slots`` (the logical
    # slots of this database) but exists: what it is, e.g. "a physical slot"
    slot_elsewhere: str | None = None

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# where the server's WAL is now: on a standby (in recovery, where pg_current_wal_lsn() fails)
# the last WAL replayed, which is what its logical slots decode up to
WAL_NOW = ("(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
           "ELSE pg_current_wal_lsn() END)")
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
_IDENTITY = {"d": "default", "f": "full", "i": "index", "n": "nothing"}


def human_size(size: int | None) -> str | None:
    """1536 -> '1.5 KiB' (None stays None)."""
    if size is None:
        return None
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def check_slot_name(name: str, option: str = "") -> None:
    """A ConfigError unless ``name`` is a name PostgreSQL gives a replication slot.

    Checked before asking the server: PostgreSQL cuts a longer name to 63 bytes,
    so a query for it would find (and drop) the slot of the first 63 bytes.
    """
    if not _SLOT_NAME.fullmatch(name):
        raise ConfigError(
            f"{option + ' ' if option else ''}{name!r} is not a replication slot name: one has "
            "1-63 characters among lower-case letters, digits and underscores")


def inspect_database(conn: psycopg.Connection, publication: str | None,
                     slot: str | None = None) -> Status:
    """What the server says; ``slot`` is looked for among every slot when it is not one of
    this database's logical slots (``Status.slot_elsewhere``)."""
    status = _inspect(conn, publication)
    if slot is not None and not any(s["slot"] == slot for s in status.slots):
        row = conn.execute("SELECT slot_type, database FROM pg_replication_slots "
                           "WHERE slot_name = %s", (slot,)).fetchone()
        if row is not None:
            kind, database = row
            status.slot_elsewhere = f"a {kind} slot" + (
                f" of database {database!r}" if database is not None else "")
    return status


def _inspect(conn: psycopg.Connection, publication: str | None) -> Status:
    from psycopg import sql

    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('wal_level'), current_database()"
    ).fetchone()
    assert row is not None
    status = Status(row[0], row[1], row[2], publication, False)
    for name in ("max_replication_slots", "max_wal_senders", "max_slot_wal_keep_size",
                 "wal_sender_timeout", "logical_decoding_work_mem"):
        status.settings[name] = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
    if status.wal_level != "logical":
        status.problems.append(Problem(
            f"wal_level is {status.wal_level!r}, not 'logical'",
            "ALTER SYSTEM SET wal_level = 'logical'; then restart PostgreSQL "
            "(walex setup --wal-level does the ALTER SYSTEM)",
        ))
    can = conn.execute(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not (can and can[0]):
        status.problems.append(Problem(
            "the current role may not start replication",
            "ALTER ROLE <role> REPLICATION; (as a superuser)",
        ))
    if publication is None:
        _inspect_slots(conn, status)
        return status
    status.publication_exists = conn.execute(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone() is not None
    if not status.publication_exists:
        status.problems.append(Problem(
            f"publication {publication!r} does not exist",
            f"walex setup --publication {shlex.quote(publication)} (creates it FOR ALL "
            "TABLES), or "
            f"CREATE PUBLICATION {sql.Identifier(publication).as_string(conn)} FOR TABLE ...;",
        ))
    for schema, table, identity, has_pk in conn.execute(
        "SELECT p.schemaname, p.tablename, c.relreplident, "
        "  EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) "
        "FROM pg_publication_tables p "
        "JOIN pg_namespace n ON n.nspname = p.schemaname "
        "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename "
        "WHERE p.pubname = %s ORDER BY 1, 2",
        (publication,),
    ):
        status.tables.append({"schema": schema, "table": table,
                              "replica_identity": _IDENTITY.get(identity, identity)})
        qualified = f"{sql.Identifier(schema).as_string(conn)}.{sql.Identifier(table).as_string(conn)}"
        if identity == "n" or (identity == "d" and not has_pk):
            status.problems.append(Problem(
                f"table {schema}.{table} has no replica identity: UPDATE and DELETE on it fail "
                "while it is published",
                f"ALTER TABLE {qualified} REPLICA IDENTITY FULL;",
            ))
        elif identity == "d":
            status.problems.append(Problem(
                f"table {schema}.{table} has REPLICA IDENTITY DEFAULT: updates carry no old "
                "values, so Event.changes is None",
                f"ALTER TABLE {qualified} REPLICA IDENTITY FULL; (walex setup --replica-identity-full)",
                fatal=False,
            ))
    _inspect_slots(conn, status)
    return status


# pg_replication_slots.invalidation_reason (PostgreSQL 17+), said with the setting involved
_INVALIDATED = {
    "wal_removed": "its WAL was removed: over max_slot_wal_keep_size",
    "rows_removed": "rows it needed were vacuumed on the primary",
    "wal_level_insufficient": "wal_level on the primary went below 'logical'",
    "idle_timeout": "unused for longer than idle_replication_slot_timeout",
}


def _inspect_slots(conn: psycopg.Connection, status: Status) -> None:
    """Every logical slot of the database, with its client, lag and WAL status."""
    has_wal_status = conn.info.server_version >= 130000
    for slot in conn.execute(
        "SELECT s.slot_name, s.plugin, s.temporary, s.active, s.active_pid, "
        "  s.confirmed_flush_lsn::text, "
        f"  pg_wal_lsn_diff({WAL_NOW}, s.confirmed_flush_lsn)::bigint, "
        + ("s.wal_status, s.safe_wal_size, " if has_wal_status else "NULL, NULL, ")
        # the WAL kept for the slot: from restart_lsn (an invalidated slot keeps none)
        + f"CASE WHEN {'s.wal_status' if has_wal_status else 'NULL'} IS DISTINCT FROM 'lost' THEN "
        + f"pg_wal_lsn_diff({WAL_NOW}, s.restart_lsn)::bigint END, "
        # why PostgreSQL invalidated it (17+): wal_removed, rows_removed, idle_timeout, ...
        + ("s.invalidation_reason, " if conn.info.server_version >= 170000 else "NULL, ")
        # pg_stat_activity: a walsender's client, or a session reading the slot with SQL
        + "r.application_name, host(r.client_addr), r.client_port, r.backend_type "
        "FROM pg_replication_slots s LEFT JOIN pg_stat_activity r ON r.pid = s.active_pid "
        "WHERE s.database = current_database() AND s.slot_type = 'logical' ORDER BY s.slot_name"
    ):
        (name, plugin, temporary, active, pid, confirmed, lag, wal_status, safe, retained,
         reason, app, addr, port, kind) = slot
        client = None
        if pid is not None:
            # no address nor port: pg_stat_activity hides them from a role without the
            # privileges of the session's role or pg_read_all_stats
            where = "local socket" if addr is None and port == -1 else (
                f"{addr}:{port}" if addr is not None else "address hidden from this role"
                if port is None else None)
            session = f"{kind} session" if kind not in (None, "walsender") else None
            client = " ".join(p for p in (session, app, f"({where})" if where else None)
                              if p) or None
        status.slots.append({
            "slot": name, "plugin": plugin, "temporary": temporary, "active": active,
            "pid": pid, "client": client, "confirmed_flush_lsn": confirmed, "lag_bytes": lag,
            "lag": human_size(lag), "wal_status": wal_status, "safe_wal_size": safe,
            "retained_bytes": retained, "retained": human_size(retained),
            "invalidation_reason": reason,
        })
        if wal_status == "lost":
            status.problems.append(Problem(
                f"slot {name!r} was invalidated (wal_status = 'lost'"
                + (f", {_INVALIDATED.get(reason, reason)}" if reason else "")
                + f"): changes after {confirmed} are gone",
                f"SELECT pg_drop_replication_slot('{name}'); then resynchronise, or start the "
                "app with recreate_lost_slot=True",
            ))
        elif wal_status == "unreserved":
            status.problems.append(Problem(
                f"slot {name!r} is about to be invalidated (wal_status = 'unreserved'): the WAL "
                "it needs is past max_slot_wal_keep_size and is removed at the next checkpoint",
                "let its consumer catch up now, or raise max_slot_wal_keep_size: ALTER SYSTEM "
                "SET max_slot_wal_keep_size = '...'; SELECT pg_reload_conf();",
                fatal=False,
            ))
        if wal_status != "lost" and not active and not temporary:
            status.problems.append(Problem(
                f"durable slot {name!r} is not in use and holds {human_size(retained) or 'no'} "
                "WAL (from its restart_lsn)",
                f"start its consumer, or drop it: SELECT pg_drop_replication_slot('{name}');",
                fatal=False,
            ))
