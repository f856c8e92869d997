"""``walex backfill`` and the backfills in ``walex status``, run as real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg

WALEX = [sys.executable, "-m", "walex.cli"]
ENV = {**os.environ, "COLUMNS": "200"}


def _app(tmp_path: Path, dsn: str, durable: bool) -> tuple[Path, Path]:
    """A handler module writing every read event's id to a file, and its walex.toml."""
    log = tmp_path / "reads.txt"
    (tmp_path / "shop_events.py").write_text(textwrap.dedent(f"""
        from walex import Events
        events = Events()

        @events.on_read("item")
        def record(items):
            with open({str(log)!r}, "a") as f:
                for e in items:
                    f.write(f"{{e.new_record['id']}} {{e.id}}\\n")
    """))
    config = tmp_path / "walex.toml"
    config.write_text(textwrap.dedent(f"""
        url = {dsn!r}
        publication = "pub"
        name = "shop"
        modules = ["shop_events:events"]
        durable_slot = {str(durable).lower()}
        backfill_chunk_size = 50
    """))
    return log, config


def _ids(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []


def test_backfill_runs_the_app_when_it_is_not_running_then_status_shows_it(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 300) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    log, config = _app(tmp_path, dsn, durable=False)
    proc = subprocess.run([*WALEX, "backfill", "item", "--where", "id % 3 = 0", "--config",
                           str(config)], capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not running: running it until public.item is read" in proc.stderr
    assert "backfilled public.item: 100 rows" in proc.stdout
    assert sorted(_ids(log)) == list(range(3, 301, 3))
    assert all("-R" in line.split()[1] for line in log.read_text().splitlines())  # read ids

    status = subprocess.run([*WALEX, "status", "--config", str(config)], capture_output=True,
                            text=True, timeout=60, env=ENV, cwd=tmp_path)
    assert "backfills" in status.stdout, status.stdout
    assert "public.item where id % 3 = 0" in status.stdout
    assert "done" in status.stdout and "100 rows" in status.stdout


def test_backfill_asks_the_running_app_and_follows_its_progress(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 500) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    log, config = _app(tmp_path, dsn, durable=True)
    service = subprocess.Popen([*WALEX, "run", "--config", str(config)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not admin.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name = 'shop_walex'"
        ).fetchone()[0]:
            time.sleep(0.1)
        proc = subprocess.run([*WALEX, "backfill", "item", "--config", str(config)],
                              capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "is running: it reads public.item" in proc.stderr
        assert "backfilled public.item: 500 rows" in proc.stdout
        assert sorted(_ids(log)) == list(range(1, 501))  # the service's handler got them
        service.send_signal(signal.SIGINT)
        out, _ = service.communicate(timeout=30)
    finally:
        if service.poll() is None:
            service.kill()
    assert service.returncode == 0, out
    assert "backfill of public.item done: 500 rows" in out


def test_backfill_errors_name_the_problem_and_the_fix(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("CREATE TABLE nokey (label text)")
    admin.execute("CREATE TABLE hidden (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item, nokey")
    _, config = _app(tmp_path, dsn, durable=False)

    def backfill(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*WALEX, "backfill", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60, env=ENV, cwd=tmp_path)

    nokey = backfill("nokey")
    assert nokey.returncode == 1
    assert "has no primary key" in nokey.stderr and "ADD PRIMARY KEY" in nokey.stderr
    hidden = backfill("hidden")
    assert hidden.returncode == 1 and "ALTER PUBLICATION" in hidden.stderr
    bad = backfill("item", "--where", "label = ")
    assert bad.returncode == 1 and "is not a valid condition on public.item" in bad.stderr
    for proc in (nokey, hidden, bad):
        assert "Traceback" not in proc.stderr
