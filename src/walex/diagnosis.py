"""What ``walex setup`` finds, and the SQL it would run to create what is missing.

:func:`diagnose` only reads. It checks every prerequisite of logical
replication for a publication, its tables and (optionally) a slot, and
returns a :class:`Plan`: one :class:`Finding` per check, with the exact fix,
and the :class:`Action` list walex itself can carry out (create or extend the
publication, set replica identity, create the slot, ``ALTER SYSTEM`` for
``wal_level`` on request). :func:`apply_plan` runs those actions.

A finding's ``status`` is one of:

- ``ok``;
- ``fix``: missing, and one of the plan's actions creates it;
- ``warning``: works, with a limitation (the fix is optional);
- ``problem``: walex cannot stream until someone applies the fix;
- ``unknown``: the check itself could not run (its error is the detail), so
  nothing is known either way.

Invariants:

- a plan with a blocking finding (a ``problem``, or an ``unknown`` about a
  prerequisite) applies nothing: no half-done setup;
- the only exception is ``ALTER SYSTEM SET wal_level``, asked for with
  ``wal_level=True``: it is then the one action applied, as everything else
  waits for the restart it needs;
- actions are derived from the state diagnosed, so running a plan twice
  changes nothing the second time;
- the publication and replica identity changes run in one transaction (all or
  none), the slot after it (PostgreSQL creates a slot only outside a
  transaction that wrote).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .admin import name_encoding_problem

__all__ = ["Finding", "Action", "Plan", "diagnose", "apply_plan"]

OK, FIX, WARNING, PROBLEM, UNKNOWN = "ok", "fix", "warning", "problem", "unknown"


@dataclass(slots=True)
class Finding:
    check: str
    status: str
    detail: str
    fix: str = ""
    blocking: bool = False  # walex cannot stream (or setup cannot apply) until fixed


@dataclass(slots=True)
class Action:
    phase: str  # "system" (ALTER SYSTEM, alone), "ddl" (one transaction), "slot"
    sql: str
    done: str  # what it did, for the report


@dataclass(slots=True)
class Plan:
    publication: str
    findings: list[Finding] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    platform: str = "postgresql"

    @property
    def blocked(self) -> bool:
        return any(f.blocking for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 ready (once applied), 1 a blocking problem, 3 a blocking check could not run."""
        if any(f.blocking and f.status != UNKNOWN for f in self.findings):
            return 1
        if any(f.blocking for f in self.findings):
            return 3
        return 0

    def runnable(self) -> list[Action]:
        """The actions to apply: none when blocked, except a requested ALTER SYSTEM."""
        system = [a for a in self.actions if a.phase == "system"]
        if system:
            return system
        return [] if self.blocked else list(self.actions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "publication": self.publication, "platform": self.platform,
            "exit_code": self.exit_code, "blocked": self.blocked,
            "findings": [asdict(f) for f in self.findings],
            "sql": [a.sql for a in self.runnable()],
        }


def _q(conn: psycopg.Connection, *names: str) -> str:
    return sql.Identifier(*names).as_string(conn)


class _Checker:
    def __init__(self, conn: psycopg.Connection, plan: Plan) -> None:
        self.conn = conn
        self.plan = plan

    def one(self, query: str, params: Any = None) -> Any:
        row = self.conn.execute(query, params).fetchone()
        return row[0] if row is not None and len(row) == 1 else row

    def add(self, *args: Any, **kwargs: Any) -> Finding:
        finding = Finding(*args, **kwargs)
        self.plan.findings.append(finding)
        return finding

    def unknown(self, check: str, exc: BaseException, blocking: bool = True) -> None:
        encoding = name_encoding_problem(self.conn, exc)
        if encoding is not None:  # not a privilege: a name walex cannot read (nor stream)
            self.add(check, PROBLEM, *encoding, blocking=True)
            return
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.add(check, UNKNOWN, f"could not check: {message}",
                 "run walex setup as a role allowed to read this, or check it by hand",
                 blocking=blocking)


def diagnose(
    conn: psycopg.Connection,
    publication: str,
    tables: list[str] | None = None,
    *,
    replica_identity_full: bool = False,
    slot: str | None = None,
    wal_level: bool = False,
) -> Plan:
    """Check everything walex needs; ``tables``: subscribed tables (None or ["*"]: all)."""
    plan = Plan(publication)
    c = _Checker(conn, plan)
    user = c.one("SELECT current_user")
    superuser = bool(c.one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
    plan.platform = _platform(c)
    _check_wal_level(c, superuser, wal_level)
    _check_capacity(c, slot)
    _check_role(c, user, superuser)
    published, all_tables = _check_publication(c, tables, superuser)
    _check_tables(c, tables, published, all_tables, replica_identity_full)
    if slot:
        _check_slot(c, slot)
    _check_standby(c)
    return plan


def _check_standby(c: _Checker) -> None:
    """A standby (in recovery) is read-only: what setup would change there cannot be done."""
    try:
        if not c.one("SELECT pg_is_in_recovery()"):
            return
    except psycopg.Error as exc:
        c.unknown("server", exc)
        return
    ddl = [a.sql for a in c.plan.actions if a.phase == "ddl"]
    if ddl:
        c.add("server", PROBLEM,
              "a standby (in recovery, read-only): the publication and replica identity "
              "are changed on the primary, and replicated to its standbys",
              "run walex setup against the primary; then here, if walex streams from this "
              "standby, walex setup --slot NAME (PostgreSQL 16+)", blocking=True)
    elif c.conn.info.server_version < 160000 and any(a.phase == "slot" for a in c.plan.actions):
        c.add("server", PROBLEM,
              "a standby (in recovery): PostgreSQL before 16 has no logical slot on a standby",
              "stream from the primary: walex setup --slot NAME against it", blocking=True)
    else:
        c.add("server", OK, "a standby (in recovery)")


def _platform(c: _Checker) -> str:
    try:
        names = {r[0] for r in c.conn.execute(
            "SELECT name FROM pg_settings WHERE name IN "
            "('rds.logical_replication', 'cloudsql.logical_decoding', 'azure.replication_support')"
        )}
    except psycopg.Error:
        return "postgresql"
    if "rds.logical_replication" in names:
        return "rds"
    if "cloudsql.logical_decoding" in names:
        return "cloudsql"
    if "azure.replication_support" in names:
        return "azure"
    return "postgresql"


_RESTART = ("then restart PostgreSQL (sudo systemctl restart postgresql, or "
            "pg_ctl restart -D <data directory>)")


def _setting_fix(platform: str, name: str, value: str) -> str:
    if platform == "rds":
        return (f"in the instance's DB parameter group set {name} = {value}, then reboot the "
                "instance (RDS and Aurora do not allow ALTER SYSTEM)")
    if platform == "cloudsql":
        return f"gcloud sql instances patch INSTANCE --database-flags={name}={value} (restarts it)"
    return f"ALTER SYSTEM SET {name} = {value}; {_RESTART}"


def _check_wal_level(c: _Checker, superuser: bool, apply: bool) -> None:
    plan = c.plan
    try:
        level, pending = c.conn.execute(
            "SELECT setting, pending_restart FROM pg_settings WHERE name = 'wal_level'"
        ).fetchone()  # type: ignore[misc]
    except psycopg.Error as exc:
        c.unknown("wal_level", exc)
        return
    if level == "logical":
        c.add("wal_level", OK, "logical")
        return
    if plan.platform == "rds":
        fix = ("in the instance's DB parameter group set rds.logical_replication = 1, then reboot "
               "the instance (this sets wal_level = logical)")
    elif plan.platform == "cloudsql":
        fix = ("gcloud sql instances patch INSTANCE --database-flags=cloudsql.logical_decoding=on "
               "(restarts it)")
    elif plan.platform == "azure":
        fix = ("az postgres flexible-server parameter set --name wal_level --value logical ..., "
               "then restart the server")
    else:
        fix = f"ALTER SYSTEM SET wal_level = 'logical'; {_RESTART}"
        if not apply:
            fix += " (walex setup --wal-level runs the ALTER SYSTEM)"
    try:  # what ALTER SYSTEM or the files say (readable by superusers only)
        configured = c.one("SELECT setting FROM pg_file_settings WHERE name = 'wal_level' "
                           "ORDER BY seqno DESC LIMIT 1")
    except psycopg.Error:
        configured = None
    if pending or configured == "logical":
        c.add("wal_level", PROBLEM,
              f"{level!r}; 'logical' is configured and waits for a restart",
              "restart PostgreSQL to apply it (sudo systemctl restart postgresql, or "
              "pg_ctl restart -D <data directory>)", blocking=True)
        return
    c.add("wal_level", PROBLEM, f"{level!r}: logical replication needs 'logical'", fix,
          blocking=True)
    if apply and plan.platform == "postgresql":
        if not superuser:
            c.add("wal_level change", PROBLEM, "--wal-level needs a superuser (ALTER SYSTEM)",
                  "run walex setup --wal-level as a superuser, or apply the fix above by hand",
                  blocking=True)
        else:
            plan.actions.append(Action(
                "system", "ALTER SYSTEM SET wal_level = 'logical'",
                "ALTER SYSTEM SET wal_level = 'logical': restart PostgreSQL to apply it, "
                "then run walex setup again",
            ))


def _check_capacity(c: _Checker, slot: str | None) -> None:
    platform = c.plan.platform
    try:
        max_slots = int(c.one("SELECT current_setting('max_replication_slots')"))
        used = int(c.one("SELECT count(*) FROM pg_replication_slots"))
        exists = bool(slot) and c.one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)) > 0
    except psycopg.Error as exc:
        c.unknown("max_replication_slots", exc)
    else:
        needed = used + (0 if exists else 1)
        detail = f"{used} of {max_slots} in use"
        if needed > max_slots:
            c.add("max_replication_slots", PROBLEM,
                  detail + ": no room for walex's slot",
                  _setting_fix(platform, "max_replication_slots", str(max(10, used + 4))) +
                  " (or drop an unused slot: walex drop-slot NAME)", blocking=True)
        elif needed == max_slots:
            c.add("max_replication_slots", WARNING, detail + ": walex's slot takes the last one",
                  _setting_fix(platform, "max_replication_slots", str(max(10, used + 4))))
        else:
            c.add("max_replication_slots", OK, detail)
    try:
        max_senders = int(c.one("SELECT current_setting('max_wal_senders')"))
        senders = int(c.one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"))
    except psycopg.Error as exc:
        c.unknown("max_wal_senders", exc)
        return
    detail = f"{senders} of {max_senders} in use"
    if senders + 1 > max_senders:
        c.add("max_wal_senders", PROBLEM, detail + ": no walsender left for walex",
              _setting_fix(platform, "max_wal_senders", str(max(10, senders + 4))), blocking=True)
    else:
        c.add("max_wal_senders", OK, detail)


def _check_role(c: _Checker, user: str, superuser: bool) -> None:
    try:
        can = bool(c.one("SELECT rolreplication FROM pg_roles WHERE rolname = current_user"))
    except psycopg.Error as exc:
        c.unknown("role", exc)
        return
    if superuser or can:
        c.add("role", OK, f"{user!r} may replicate" + (" (superuser)" if superuser else ""))
        return
    if c.plan.platform == "rds":
        fix = f"GRANT rds_replication TO {_q(c.conn, user)}; (as the master user)"
    else:
        fix = f"ALTER ROLE {_q(c.conn, user)} REPLICATION; (as a superuser)"
    c.add("role", PROBLEM, f"{user!r} has no REPLICATION attribute", fix, blocking=True)


def _resolve(c: _Checker, spec: str) -> tuple[str, str] | None:
    """(schema, table) of an unquoted name, 'schema.table' or a table on the search path."""
    schema, _, table = spec.rpartition(".")
    row = c.conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND c.relkind IN ('r', 'p') "
        "AND (CASE WHEN %s = '' THEN pg_table_is_visible(c.oid) ELSE n.nspname = %s END)",
        (table, schema, schema),
    ).fetchone()
    return (row[0], row[1]) if row else None


def _check_publication(
    c: _Checker, tables: list[str] | None, superuser: bool
) -> tuple[set[tuple[str, str]] | None, bool]:
    """Returns the published tables (None when unknown) and whether it is FOR ALL TABLES."""
    plan, conn, name = c.plan, c.conn, c.plan.publication
    pub = _q(conn, name)
    wanted = [t for t in tables or [] if t != "*"]
    try:
        row = conn.execute(
            "SELECT puballtables, pg_get_userbyid(pubowner) = current_user "
            "FROM pg_publication WHERE pubname = %s", (name,)
        ).fetchone()
        published = {(s, t) for s, t in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,))}
        can_create = bool(c.one("SELECT has_database_privilege(current_database(), 'CREATE')"))
    except psycopg.Error as exc:
        c.unknown("publication", exc)
        return None, False
    resolved = []
    for spec in wanted:
        found = _resolve(c, spec)
        if found is None:
            c.add(f"table {spec}", PROBLEM, "does not exist in this database",
                  "create it, or leave it out of --table / subscriptions (names are unquoted, "
                  "as PostgreSQL stores them)", blocking=True)
        else:
            resolved.append(found)
    if not superuser:
        for schema, table in resolved:
            if (schema, table) not in published and not c.one(
                "SELECT pg_has_role(c.relowner, 'MEMBER') FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s", (schema, table)
            ):
                c.add(f"table {schema}.{table}", PROBLEM,
                      "only its owner can add it to a publication, and this role is not",
                      "run walex setup as its owner (or a superuser)", blocking=True)
    targets = ", ".join(_q(conn, s, t) for s, t in resolved)
    if row is None:
        if not wanted and not superuser:
            c.add("publication", PROBLEM,
                  f"{name!r} does not exist, and only a superuser can create it FOR ALL TABLES",
                  f"CREATE PUBLICATION {pub} FOR ALL TABLES; (as a superuser), or "
                  f"walex setup --table TABLE ... to create it FOR TABLE", blocking=True)
        elif not can_create:
            c.add("publication", PROBLEM,
                  f"{name!r} does not exist, and this role may not create one here",
                  f"GRANT CREATE ON DATABASE {_q(conn, str(c.one('SELECT current_database()')))} "
                  "TO <role>; or create it as the tables' owner", blocking=True)
        else:
            what = f"FOR TABLE {targets}" if wanted else "FOR ALL TABLES"
            statement = f"CREATE PUBLICATION {pub} {what}"
            c.add("publication", FIX, f"{name!r} does not exist", statement + ";" if resolved or
                  not wanted else f"CREATE PUBLICATION {pub} FOR TABLE ...; once the tables exist")
            if not wanted or resolved:
                plan.actions.append(Action(
                    "ddl", statement,
                    f"created publication {name!r} for "
                    f"{', '.join(wanted) if wanted else 'all tables'}"))
        return set(), not wanted
    all_tables, owner = bool(row[0]), bool(row[1])
    missing = [(s, t) for s, t in resolved if (s, t) not in published]
    if all_tables or not missing:
        c.add("publication", OK, f"{name!r} exists, " + (
            "FOR ALL TABLES" if all_tables else f"{len(published)} table(s)"))
        return published, all_tables
    listed = ", ".join(f"{s}.{t}" for s, t in missing)
    statement = f"ALTER PUBLICATION {pub} ADD TABLE " + ", ".join(_q(conn, s, t) for s, t in missing)
    if not owner and not superuser:
        c.add("publication", PROBLEM, f"{name!r} lacks {listed}, and this role does not own it",
              statement + "; (as its owner)", blocking=True)
        return published, all_tables
    c.add("publication", FIX, f"{name!r} lacks {listed}", statement + ";")
    plan.actions.append(Action("ddl", statement, f"added {listed} to publication {name!r}"))
    return published, all_tables


_IDENTITY = {"d": "default", "f": "full", "i": "index", "n": "nothing"}


def _check_tables(
    c: _Checker, tables: list[str] | None, published: set[tuple[str, str]] | None,
    all_tables: bool, full: bool,
) -> None:
    """Replica identity and primary key of each table that will be streamed."""
    conn = c.conn
    wanted = [t for t in tables or [] if t != "*"]
    try:
        if wanted:
            targets = [r for r in (_resolve(c, t) for t in wanted) if r is not None]
        elif published is None:
            return  # the publication could not be read: reported as unknown
        elif all_tables:
            # FOR ALL TABLES (existing or to be created): every ordinary user table
            targets = [(s, t) for s, t in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%' "
                "ORDER BY 1, 2")]
        else:
            targets = sorted(published)
        rows = {}
        for schema, table in targets:
            rows[(schema, table)] = conn.execute(
                "SELECT c.relreplident, EXISTS (SELECT 1 FROM pg_index i "
                "WHERE i.indrelid = c.oid AND i.indisprimary), c.relkind, "
                "pg_has_role(c.relowner, 'MEMBER') FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                (schema, table)).fetchone()
    except psycopg.Error as exc:
        c.unknown("tables", exc)
        return
    for (schema, table), row in rows.items():
        if row is None:
            continue
        identity, has_pk, kind, owner = row
        check = f"table {schema}.{table}"
        qualified = _q(conn, schema, table)
        set_full = f"ALTER TABLE {qualified} REPLICA IDENTITY FULL"
        keyed = "primary key" if has_pk else "no primary key"
        if kind == "p" and identity in ("d", "n") and not has_pk:
            # a partitioned table's identity is its partitions'; they are checked on their own
            c.add(check, OK, f"partitioned ({keyed}); its partitions carry the replica identity")
            continue
        if identity in ("f", "i") or (identity == "d" and has_pk and not full):
            if identity == "d":
                c.add(check, WARNING,
                      f"replica identity default ({keyed}): updates carry no old values, "
                      "so Event.changes is None",
                      set_full + "; (walex setup --replica-identity-full)")
            else:
                c.add(check, OK, f"replica identity {_IDENTITY[identity]} ({keyed})")
            continue
        if identity == "d" and has_pk:  # --replica-identity-full asked for
            why = f"replica identity default ({keyed})"
        else:
            why = (f"replica identity {_IDENTITY.get(identity, identity)} ({keyed}): UPDATE and "
                   "DELETE on it fail while it is published")
        if not full:
            c.add(check, PROBLEM, why,
                  set_full + "; or add a primary key (walex setup --replica-identity-full)",
                  blocking=True)
        elif not owner:
            c.add(check, PROBLEM, why + "; this role does not own it", set_full + "; (as its owner)",
                  blocking=True)
        else:
            c.add(check, FIX, why, set_full + ";")
            c.plan.actions.append(Action("ddl", set_full, f"set REPLICA IDENTITY FULL on {schema}.{table}"))


def _check_slot(c: _Checker, slot: str) -> None:
    try:
        row = c.conn.execute(
            "SELECT plugin, database, slot_type, "
            + ("wal_status " if c.conn.info.server_version >= 130000 else "NULL ")
            + "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        database = c.one("SELECT current_database()")
    except psycopg.Error as exc:
        c.unknown(f"slot {slot}", exc)
        return
    check = f"slot {slot}"
    if row is None:
        statement = f"SELECT pg_create_logical_replication_slot({_literal(slot)}, 'pgoutput')"
        c.add(check, FIX, "does not exist", statement + ";")
        c.plan.actions.append(Action("slot", statement, f"created durable slot {slot!r}"))
        return
    plugin, slot_db, kind, wal_status = row
    drop = f"SELECT pg_drop_replication_slot({_literal(slot)}); (walex drop-slot {slot})"
    if kind != "logical" or plugin != "pgoutput" or slot_db != database:
        c.add(check, PROBLEM,
              f"exists but is a {kind} slot of plugin {plugin!r} in database {slot_db!r}",
              "choose another slot name, or " + drop, blocking=True)
    elif wal_status == "lost":
        c.add(check, PROBLEM, "was invalidated (wal_status = 'lost'): the WAL it needed is gone",
              drop + ", then resynchronise", blocking=True)
    else:
        c.add(check, OK, "exists (pgoutput)")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def apply_plan(conn: psycopg.Connection, plan: Plan, done: list[str] | None = None) -> list[str]:
    """Run the plan's runnable actions; returns what was done (empty when blocked).

    ``conn`` must be in autocommit mode. The DDL runs in one transaction: a
    failure (a concurrent change, a privilege the checks could not see)
    leaves it undone and raises :class:`psycopg.Error`. What ran before the
    failing step stays applied: ``done``, when given, receives each step's
    report as it completes, so the caller can say exactly what was applied.
    """
    actions = plan.runnable()
    done = [] if done is None else done
    for action in (a for a in actions if a.phase == "system"):
        conn.execute(action.sql)
        done.append(action.done)
    ddl = [a for a in actions if a.phase == "ddl"]
    if ddl:
        with conn.transaction():
            for action in ddl:
                conn.execute(action.sql)  # type: ignore[arg-type]
        done.extend(a.done for a in ddl)
    for action in (a for a in actions if a.phase == "slot"):
        conn.execute(action.sql)  # type: ignore[arg-type]
        done.append(action.done)
    return done
