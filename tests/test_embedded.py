"""Tests for walex.embedded: throwaway clusters, per-version, and the test fixtures."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import psycopg
import pytest

from walex.embedded import Cluster, ClusterError, free_port

if TYPE_CHECKING:
    from conftest import PgServer


def _cluster(pg_cluster: PgServer) -> Cluster:
    if pg_cluster.cluster is None:
        pytest.skip("external server (WALEX_TEST_DSN): no cluster to control")
    return pg_cluster.cluster


def test_wal_level_is_logical(pg_cluster: PgServer, admin: psycopg.Connection) -> None:
    assert admin.execute("SHOW wal_level").fetchone() == ("logical",)
    assert admin.info.server_version // 10000 == pg_cluster.major_version
    row = admin.execute("SELECT current_database()").fetchone()
    assert row is not None and row[0].startswith("walex_test_")


def test_cluster_settings(pg_cluster: PgServer, admin: psycopg.Connection) -> None:
    cluster = _cluster(pg_cluster)
    assert admin.execute("SHOW max_replication_slots").fetchone() == ("20",)
    assert admin.execute("SHOW port").fetchone() == (str(cluster.port),)
    assert cluster.port != 5432
    assert cluster.datadir.is_dir() and cluster.logfile.is_file()
    if os.geteuid() == 0:  # PostgreSQL refuses root: the data dir belongs to another user
        assert cluster.datadir.stat().st_uid != 0


def test_restart_immediate_keeps_data(pg_cluster: PgServer, dsn: str) -> None:
    cluster = _cluster(pg_cluster)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The cluster runs with synchronous_commit=off: make this commit durable
        # before the simulated crash, or it could be lost.
        conn.execute("SET synchronous_commit = on")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
    port = cluster.port
    cluster.restart(mode="immediate")
    assert cluster.running and cluster.port == port
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id, v FROM t ORDER BY id").fetchall() == [
            (1, "one"), (2, "two")]
    cluster.restart()  # fast mode
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_hstore_extension(admin: psycopg.Connection) -> None:
    admin.execute("CREATE EXTENSION hstore")
    assert admin.execute("SELECT 'a=>1, b=>2'::hstore -> 'b'").fetchone() == ("2",)


def test_cleanup_removes_everything(pg_cluster: PgServer) -> None:
    bindir = _cluster(pg_cluster).bindir
    cluster = Cluster(bindir, settings={"max_connections": "30"})
    with cluster:
        datadir, port = cluster.datadir, cluster.port
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("30",)
        assert cluster.major_version == pg_cluster.major_version
    assert not datadir.exists() and not datadir.parent.exists()
    assert not cluster.running
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    cluster.cleanup()  # idempotent


def test_start_failure_reports_server_log(pg_cluster: PgServer) -> None:
    cluster = Cluster(_cluster(pg_cluster).bindir, settings={"shared_buffers": "bogus"})
    with pytest.raises(ClusterError, match=r"(?s)server log.*shared_buffers"):
        cluster.start()
    cluster.cleanup()


def test_free_port() -> None:
    port = free_port()
    assert 0 < port < 65536 and port != 5432
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
