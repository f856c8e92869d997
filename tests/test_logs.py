"""What a plain script calling ``app.run()`` shows, with no logging configured.

Concern: :mod:`walex.logs`. A script that configured no logging sees one INFO
line on stderr saying what it streams from where (as uvicorn does), the
password scrubbed; a script that configured logging gets no handler added
(so no line twice).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SECRET = "pw-Secret-2718"


def run_script(admin: psycopg.Connection, dsn: str, tmp_path: Path, prelude: str) -> str:
    """Run a script calling ``app.run()`` until it streams, SIGINT it; its stderr."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE item")
    script = tmp_path / "script.py"
    script.write_text(prelude + textwrap.dedent(f"""
        from walex import WalEx
        app = WalEx({make_conninfo(dsn, password=SECRET)!r}, publication="pub", name="plain_script")
        app.run()
        print("stopped")
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if not k.startswith("WALEX_")})
    try:
        deadline = time.monotonic() + 30
        while not admin.execute("SELECT count(*) FROM pg_replication_slots WHERE active "
                                "AND database = current_database()").fetchone()[0]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the script never streamed"
            time.sleep(0.05)
        time.sleep(0.2)  # the line is logged right after the slot became active
        proc.send_signal(signal.SIGINT)
        out, errors = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out == "stopped\n", (out, errors)
    assert SECRET not in errors
    return errors


def test_script_without_logging_shows_what_it_streams(admin: psycopg.Connection, dsn: str,
                                                      tmp_path: Path) -> None:
    errors = run_script(admin, dsn, tmp_path, "")
    p = conninfo_to_dict(dsn)
    target = f"{p['user']}@{p['host']}:{p['port']}/{p['dbname']}"
    lines = [line for line in errors.splitlines() if "streaming publication" in line]
    assert len(lines) == 1, errors
    assert " INFO walex: walex 'plain_script' streaming publication 'pub' " in lines[0]
    assert f" from {target} via temporary slot " in lines[0]


def test_script_with_logging_gets_no_second_handler(admin: psycopg.Connection, dsn: str,
                                                    tmp_path: Path) -> None:
    errors = run_script(admin, dsn, tmp_path, textwrap.dedent("""
        import logging
        logging.basicConfig(level=logging.INFO, format="mine %(name)s %(message)s")
    """))
    lines = [line for line in errors.splitlines() if "streaming publication" in line]
    assert len(lines) == 1 and lines[0].startswith("mine walex "), errors
