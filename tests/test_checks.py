"""The checks at the start of a session (walex.checks.preflight), on a replication
connection as ``start()`` runs them and on a normal one as the diagnosis does."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from walex import SetupError
from walex.checks import preflight

# wal_sender_timeout as set, shown by the server in its largest exact unit
TIMEOUTS = ["0", "500ms", "1500ms", "90s", "1min", "1h", "1d", "2147483647ms"]


async def _checks(dsn: str, timeout: str, walsender: bool) -> tuple[float, float]:
    """(what the checks read, what pg_settings says) with wal_sender_timeout = timeout."""
    options = f"-c wal_sender_timeout={timeout}"
    kwargs = {"replication": "database"} if walsender else {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, options=options,
                                                     **kwargs) as conn:
        found = await preflight(conn, "pub", ["*"], walsender=walsender)
        cur = await conn.execute("SELECT setting::float / 1000 FROM pg_settings "
                                 "WHERE name = 'wal_sender_timeout'")
        row = await cur.fetchone()
        assert row is not None
        return found.wal_sender_timeout, row[0]


@pytest.mark.parametrize("walsender", [True, False])
def test_the_walsender_timeout_in_every_unit(admin: psycopg.Connection, dsn: str,
                                             walsender: bool) -> None:
    """The checks read wal_sender_timeout from current_setting (its text has a unit), in
    seconds as the pg_settings view gives it, whatever unit the server shows."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t")
    for timeout in TIMEOUTS:
        read, expected = asyncio.run(_checks(dsn, timeout, walsender))
        assert read == expected, timeout


def test_a_role_without_replication_fails_the_checks_on_a_normal_connection(
        admin: psycopg.Connection, dsn: str) -> None:
    """The role's REPLICATION attribute is looked up on a normal connection (the
    diagnosis of a refused walsender); a walsender has it, or could not have started."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t; "
                  "CREATE ROLE walex_checks_plain LOGIN; "
                  "GRANT SELECT ON ALL TABLES IN SCHEMA public TO walex_checks_plain")

    async def main() -> None:
        conninfo = psycopg.conninfo.make_conninfo(dsn, user="walex_checks_plain")
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            with pytest.raises(SetupError, match="'walex_checks_plain' may not start replication"):
                await preflight(conn, "pub", ["*"], walsender=False)
            with pytest.raises(psycopg.OperationalError, match="WAL sender|walsender"):  # the role check
                await psycopg.AsyncConnection.connect(conninfo, replication="database")

    try:
        asyncio.run(main())
    finally:
        admin.execute("DROP OWNED BY walex_checks_plain; DROP ROLE walex_checks_plain")
