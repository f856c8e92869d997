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


def test_service_file_target_is_the_services(dsn: str, tmp_path: os.PathLike[str]) -> None:
    """``--url service=svc``: messages name the host, port, user and database of the
    service's entry (main: ``root@[local]:5432/root``), explicit keys over it, and never
    its password."""
    params = conninfo_to_dict(dsn)
    entry = "\n".join(f"{k}={params[k]}" for k in ("host", "port", "user"))
    services = os.path.join(tmp_path, "services.conf")
    with open(services, "w") as fh:
        fh.write(f"# services\n[other]\nhost=wrong.invalid\ndbname=wrong\n\n"
                 f"[svc]\n{entry}\ndbname={params['dbname']}\npassword=Hush\n\n"
                 f"[nodb]\n{entry}\ndbname=no_such_db\npassword=Hush\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGSERVICEFILE=services, COLUMNS="200")
    target = f"{params['user']}@{params['host']}:{params['port']}"

    def walex(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*WALEX, *args], capture_output=True, text=True, timeout=60,
                              env=env, stdin=subprocess.DEVNULL)
        assert "Hush" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
        return proc

    missing = walex("drop-slot", "no_slot", "--yes", "--url", "service=svc")
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert f"does not exist on {target}/{params['dbname']}" in missing.stderr, missing.stderr
    refused = walex("status", "-p", "pub", "--url", "service=nodb")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert f"cannot connect to {target}/no_such_db: " in refused.stderr, refused.stderr
    assert '"no_such_db" does not exist' in refused.stderr, refused.stderr
    explicit = walex("status", "-p", "pub", "--url", "service=svc dbname=no_such_db")
    assert f"cannot connect to {target}/no_such_db: " in explicit.stderr, explicit.stderr
    unknown = walex("status", "-p", "pub", "--url", "service=nosuch")
    assert "cannot connect to service 'nosuch': " in unknown.stderr, unknown.stderr
