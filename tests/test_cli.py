"""The ``walex`` command run as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from walex.demo import EXPECTED_EVENTS, SCRIPT

WALEX = [sys.executable, "-m", "walex.cli"]


def test_demo_prints_every_scripted_event() -> None:
    proc = subprocess.run(
        [*WALEX, "demo"], capture_output=True, text=True, timeout=180,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for description, _, _ in SCRIPT:
        assert description in out
    assert f"{EXPECTED_EVENTS} events received and acknowledged" in out
    for kind, count in {"INSERT": 4, "UPDATE": 4, "DELETE": 1, "TRUNCATE": 2}.items():
        assert out.count(kind + " ") >= count, (kind, out)
    assert "Ada Lovelace" in out


def test_run_streams_until_sigint(dsn: str, admin: psycopg.Connection, tmp_path: Path) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    log = tmp_path / "events.txt"
    (tmp_path / "cli_app.py").write_text(textwrap.dedent(f"""
        from walex import WalEx, Events
        events = Events()

        @events.on_insert("item")
        def record(items):
            with open({str(log)!r}, "a") as f:
                for e in items:
                    f.write(e.new_record["label"] + "\\n")

        app = WalEx({dsn!r}, publication="pub", subscriptions=["item"], modules=[events])
    """))
    proc = subprocess.Popen(
        [*WALEX, "run", "cli_app:app"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the slot exists once the app streams
            if admin.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE active"
                " AND database = current_database()"
            ).fetchone()[0]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("walex run never started streaming")
        admin.execute("INSERT INTO item VALUES (1, 'first'), (2, 'second')")
        while time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n") == 2):
            time.sleep(0.1)
        assert log.read_text().split() == ["first", "second"]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output


def test_run_reports_import_errors_precisely(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*WALEX, "run", "no_such_module_xyz:app"], capture_output=True, text=True,
        timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "no_such_module_xyz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_setup_then_status(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    env = {**os.environ, "COLUMNS": "200"}
    before = subprocess.run([*WALEX, "status", "--url", dsn, "-p", "pub"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert before.returncode == 1, before.stdout + before.stderr
    assert "publication 'pub' does not exist" in before.stdout
    assert "walex setup --publication pub" in before.stdout

    setup = subprocess.run(
        [*WALEX, "setup", "--url", dsn, "-p", "pub", "--table", "item",
         "--replica-identity-full", "--slot", "ops_slot"],
        capture_output=True, text=True, timeout=60, env=env)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "created publication 'pub' for item" in setup.stdout
    assert "set REPLICA IDENTITY FULL on public.item" in setup.stdout
    assert "created durable slot 'ops_slot'" in setup.stdout

    after = subprocess.run([*WALEX, "status", "--url", dsn, "-p", "pub"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "public.item" in after.stdout and "full" in after.stdout
    assert "ops_slot" in after.stdout and "not in use" in after.stdout  # a warning only
    assert "ready" in after.stdout


def test_version_and_short_help() -> None:
    from walex.event import WALEX_VERSION

    version = subprocess.run([*WALEX, "--version"], capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"walex {WALEX_VERSION}\n")
    for args in (["-h"], ["status", "-h"], ["run", "-h"]):
        proc = subprocess.run([*WALEX, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Usage: " in proc.stdout, (args, proc.stderr)


def test_help_at_80_columns_shows_every_option_whole() -> None:
    import typer.main

    from walex.cli import app

    group = typer.main.get_command(app)
    env = {**os.environ, "COLUMNS": "80"}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        proc = subprocess.run([*WALEX, name, "--help"], capture_output=True, text=True,
                              timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "…" not in proc.stdout, proc.stdout
        for param in command.params:
            for option in param.opts + param.secondary_opts:
                if option.startswith("-"):
                    assert option in proc.stdout, (name, option, proc.stdout)


def test_piped_status_prints_each_fix_on_one_line(dsn: str, admin: psycopg.Connection) -> None:
    table = "a_table_with_a_name_long_enough_to_wrap_at_eighty_columns"
    admin.execute(f"CREATE TABLE {table} (v text)")  # no key: a fatal problem with a fix
    admin.execute(f"CREATE PUBLICATION pub FOR TABLE {table}")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([*WALEX, "status", "--url", dsn, "-p", "pub"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fix = f'ALTER TABLE "public"."{table}" REPLICA IDENTITY FULL;'
    assert any(line.endswith(f"fix: {fix}") for line in proc.stdout.splitlines()), proc.stdout


def test_setup_without_publication_says_how_to_give_it(tmp_path: Path) -> None:
    # (walex status works without one: tests/test_status.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALEX_")}
    proc = subprocess.run([*WALEX, "setup", "--url", "postgresql://127.0.0.1:1/db"],
                          capture_output=True, text=True, timeout=60, env={**env, "COLUMNS": "200"})
    assert proc.returncode == 1
    assert proc.stderr == (
        "walex: invalid walex configuration (1 problem):\n"
        "  - publication: required: give -p/--publication or set WALEX_PUBLICATION\n"
    )


def test_status_hides_the_password(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*WALEX, "status", "--url", "postgresql://u:s3cret-pw@127.0.0.1:1/db", "-p", "pub"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3  # could not check
    assert "cannot connect" in proc.stderr
    assert "s3cret-pw" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("url", [
    "postgresql://app:50%offHush!@db.example/app",  # the example of issue 9
    "postgresql://app:Hu@sh@127.0.0.1:1/app",  # '@' in the password, read as part of the host
    "postgresql://db/app?password=Hush&Kumquat=1",
    "host=db password=Hush Kumquat",
])
def test_malformed_url_never_shows_its_password(url: str) -> None:
    proc = subprocess.run([*WALEX, "status", "--url", url, "-p", "events"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not a valid database url" in proc.stderr
    for word in ("Hush", "Kumquat", "sh@"):
        assert word not in proc.stdout + proc.stderr


def test_tail_prints_committed_changes(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("CREATE TABLE other (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    proc = subprocess.Popen(
        [*WALEX, "tail", "--url", dsn, "-p", "pub", "--table", "item", "--limit", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not admin.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE active AND database = current_database()"
        ).fetchone()[0]:
            time.sleep(0.1)
        admin.execute("INSERT INTO other VALUES (1)")  # not tailed
        admin.execute("INSERT INTO item VALUES (1, 'first')")
        admin.execute("UPDATE item SET label = 'second'")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "INSERT   public.item" in out and "'first'" in out
    assert "UPDATE   public.item" in out
    assert "public.other" not in out
    # a temporary slot: nothing left behind
    assert admin.execute("SELECT count(*) FROM pg_replication_slots "
                         "WHERE database = current_database()").fetchone()[0] == 0


@pytest.mark.parametrize("args", [
    ["status", "--timeout", "inf"], ["status", "--timeout", "nan"],
    ["setup", "-p", "pub", "--timeout", "1e9"], ["drop-slot", "no_slot", "--timeout", "inf"],
    ["status", "--watch", "nan"], ["status", "--watch", "inf"],
    ["tail", "-p", "pub", "--limit", "0"], ["tail", "-p", "pub", "--limit", "-1"],
])
def test_numbers_no_command_can_use_are_usage_errors(dsn: str, args: list[str]) -> None:
    """inf / nan seconds (a traceback), a timeout past statement_timeout's range (a server
    error), a tail that can never reach its --limit (waits forever): exit 2 at once."""
    proc = subprocess.run([*WALEX, *args, "--url", dsn], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Invalid value for" in proc.stderr, proc.stderr
