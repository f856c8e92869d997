"""Databases whose encoding is not UTF-8: walex starts, streams and reports on them.

Concern: psycopg returns ``bytes`` for text read from a ``SQL_ASCII``
connection, so a setting such as ``wal_level`` would read as ``b'logical'``
and a catalog name as bytes; walex's own connections ask for UTF-8 whatever
the database's encoding (as its replication connection does), so checks,
type lookups, ``walex status`` and the events all see ``str``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql

from walex import Event, Events, WalEx

if TYPE_CHECKING:
    from conftest import PgServer

SCRIPT = os.path.join(os.path.dirname(sys.executable), "walex")
WALEX = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "walex.cli"]


@pytest.fixture(params=["SQL_ASCII", "LATIN1"])
def encoded_dsn(request: pytest.FixtureRequest, pg_cluster: PgServer,
                drop_database: Callable[[str], None]) -> Iterator[str]:
    """A fresh database in the encoding of the parameter, with a table, an enum and a publication."""
    dbname = f"walex_enc_{request.param.lower()}_{os.getpid()}"
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL(
            "CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ).format(sql.Identifier(dbname), sql.Literal(request.param)))
    dsn = pg_cluster.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('ok', 'bad')")
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, label text, m mood)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE item")
    try:
        yield dsn
    finally:  # its slots first: a stopped app's walsender may still be exiting
        drop_database(dbname)


def test_app_streams_from_a_database_in_another_encoding(encoded_dsn: str) -> None:
    got: list[Event] = []
    events = Events()
    events.on_insert("item")(got.extend)

    async def main() -> None:
        async with WalEx(encoded_dsn, publication="pub", subscriptions=["item"], modules=[events]):
            with psycopg.connect(encoded_dsn, autocommit=True, client_encoding="UTF8") as conn:
                conn.execute("INSERT INTO item VALUES (1, 'café', 'bad')")
            for _ in range(1500):
                if got:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(main())
    [event] = got
    assert event.new_record == {"id": 1, "label": "café", "m": "bad"}
    assert event.source.columns == {"id": "int4", "label": "text", "m": "mood"}
    assert isinstance(event.source.db, str)


def test_status_on_a_database_in_another_encoding(encoded_dsn: str) -> None:
    proc = subprocess.run([*WALEX, "status", "--url", encoded_dsn, "-p", "pub"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert "wal_level logical" in proc.stdout, proc.stdout + proc.stderr
    assert "b'" not in proc.stdout + proc.stderr
    assert "public.item" in proc.stdout
    assert "ready" in proc.stdout


def test_setup_names_a_table_name_that_is_not_utf8(
    pg_cluster: PgServer, drop_database: Callable[[str], None]
) -> None:
    """A SQL_ASCII database holding a table named in LATIN1 bytes: setup says the name is
    not UTF-8 and how to rename it (main: 'unknown', run as a role allowed to read this),
    and the SQL of its fix, run as given, lets setup through."""
    dbname = f"walex_enc_names_{os.getpid()}"
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL(
            "CREATE DATABASE {} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0").format(sql.Identifier(dbname)))
    dsn = pg_cluster.dsn(dbname)
    try:
        with psycopg.connect(dsn, autocommit=True, client_encoding="SQL_ASCII") as conn:
            conn.execute(b'CREATE TABLE "caf\xe9" (id int PRIMARY KEY)')  # LATIN1 bytes
            conn.execute("CREATE PUBLICATION pub FOR ALL TABLES")

        def setup() -> subprocess.CompletedProcess[str]:
            return subprocess.run([*WALEX, "setup", "--url", dsn, "-p", "pub", "--json"],
                                  capture_output=True, text=True, timeout=60)

        proc = setup()
        assert proc.returncode == 1, proc.stdout + proc.stderr  # a problem, not "unknown"
        findings = {f["check"]: f for f in json.loads(proc.stdout)["findings"]}
        [finding] = [f for f in findings.values() if f["status"] != "ok"]
        assert finding["status"] == "problem" and finding["blocking"], finding
        assert "not valid UTF-8" in finding["detail"] and "SQL_ASCII" in finding["detail"]
        assert "0xe9" in finding["detail"] and "role" not in finding["fix"], finding
        status = subprocess.run([*WALEX, "status", "--url", dsn, "-p", "pub"],
                                capture_output=True, text=True, timeout=60)
        assert "name is not valid UTF-8" in status.stderr and "rename it" in status.stderr, (
            status.stdout + status.stderr)
        find, _, rest = finding["fix"].partition("escaped: ")[2].partition("; then")
        rename = "DO $$" + rest.partition("DO $$")[2].partition("END $$;")[0] + "END $$;"
        with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as conn:
            rows = conn.execute(find).fetchall()
            [(oid, shown)] = rows
            assert shown == "public.caf\\351", shown
            conn.execute(rename.replace("OID", str(oid)).replace("new_name", "cafe"))
        proc = setup()
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        drop_database(dbname)
