"""The target walex names in messages is the one libpq used, ``PG*`` variables included.

Concern: ``user@host:port/database`` in a connection error, in ``walex status``
and in the log line at start: the parts the configuration does not give come
from libpq's environment variables (``PGHOST``, ``PGPORT``, ``PGUSER``,
``PGDATABASE``) and defaults, and once connected from the connection itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from walex import SetupError, WalEx
from walex.embedded import free_port

SCRIPT = os.path.join(os.path.dirname(sys.executable), "walex")
WALEX = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "walex.cli"]


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens there


def test_failed_connect_names_what_libpq_tried(monkeypatch: pytest.MonkeyPatch,
                                               closed_port: int) -> None:
    for name, value in {"PGHOST": "127.0.0.1", "PGPORT": str(closed_port), "PGUSER": "alice",
                        "PGDATABASE": "shop"}.items():
        monkeypatch.setenv(name, value)
    app = WalEx(publication="pub")
    with pytest.raises(SetupError) as info:
        asyncio.run(app.start())
    assert str(info.value).startswith(f"cannot connect to alice@127.0.0.1:{closed_port}/shop: ")
    assert f"alice@127.0.0.1:{closed_port}/shop" in repr(app)

    # explicit options win over the variables; the database defaults to the user name
    monkeypatch.delenv("PGDATABASE")
    app = WalEx(publication="pub", username="bob")
    with pytest.raises(SetupError, match=f"^cannot connect to bob@127.0.0.1:{closed_port}/bob: "):
        asyncio.run(app.start())


def test_walex_status_names_what_libpq_tried(closed_port: int) -> None:
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(closed_port), "PGUSER": "alice",
           "PGDATABASE": "shop", "COLUMNS": "200"}
    proc = subprocess.run([*WALEX, "status", "-p", "pub"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 3  # could not check
    assert f"cannot connect to alice@127.0.0.1:{closed_port}/shop: " in proc.stderr, proc.stderr


def test_streaming_log_line_names_the_connection(admin: psycopg.Connection, dsn: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE item")
    params = conninfo_to_dict(dsn)
    monkeypatch.setenv("PGHOST", params["host"])
    monkeypatch.setenv("PGPORT", params["port"])
    monkeypatch.setenv("PGUSER", params["user"])
    monkeypatch.setenv("PGDATABASE", params["dbname"])
    target = f"{params['user']}@{params['host']}:{params['port']}/{params['dbname']}"

    async def main() -> None:
        async with WalEx(publication="pub", name="target_app") as app:
            assert target in repr(app)

    with caplog.at_level(logging.INFO, logger="walex"):
        asyncio.run(main())
    [line] = [r.getMessage() for r in caplog.records if "streaming publication" in r.getMessage()]
    assert f"from {target} via" in line, line
