"""The event loop walex creates: uvloop when installed, asyncio on request, a clear error.

Concern: :mod:`walex.lifecycle`. ``WalEx.run()`` (so ``walex run``) runs the
app on uvloop when it is installed (``walex[fast]``, part of the test extra)
and on asyncio's loop when ``loop="asyncio"`` or ``WALEX_LOOP=asyncio`` says
so, or when uvloop is missing; asking for uvloop without it is a
:class:`~walex.errors.ConfigError` naming the fix. The loop is read inside a
handler of an app streaming from a real server. A missing uvloop is
simulated the way Python itself allows: ``sys.modules["uvloop"] = None``
makes ``import uvloop`` fail as if it were not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from walex import Events, WalEx
from walex.errors import ConfigError
from walex.workers import Worker

SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]
NO_UVLOOP = "import sys; sys.modules['uvloop'] = None  # as if walex[fast] were not installed\n"
FIX = "pip install 'walex[fast]'"

HANDLERS = """
import asyncio, os, signal
from walex import Events
events = Events()

@events.on_insert("item")
async def record(items):
    loop = type(asyncio.get_running_loop())
    with open("loop.txt", "w") as f:
        f.write(f"{loop.__module__}.{loop.__qualname__}")
    os.kill(os.getpid(), signal.SIGINT)  # a clean stop, as Ctrl-C
"""


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("WALEX_")},
            "COLUMNS": "200", **extra}


def stream_once(admin: psycopg.Connection, tmp_path: Path, command: list[str],
                **env: str) -> tuple[str, str]:
    """Run ``command`` until its app streams, insert a row; the handler's loop type, stderr."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE item")
    (tmp_path / "handlers.py").write_text(HANDLERS)
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env(PYTHONPATH=str(tmp_path), **env))
    try:
        deadline = time.monotonic() + 30
        while not admin.execute("SELECT count(*) FROM pg_replication_slots WHERE active "
                                "AND database = current_database()").fetchone()[0]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the app never streamed"
            time.sleep(0.05)
        admin.execute("INSERT INTO item VALUES (1)")
        out, errors = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, errors)
    return (tmp_path / "loop.txt").read_text(), errors


def run_script(admin: psycopg.Connection, dsn: str, tmp_path: Path, options: str = "",
               prelude: str = "", **env: str) -> tuple[str, str]:
    """A script calling ``app.run()`` (logging at DEBUG): the handler's loop type, stderr."""
    script = tmp_path / "script.py"
    script.write_text(prelude + textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        from walex import WalEx
        from handlers import events
        app = WalEx({dsn!r}, publication="pub", modules=[events], name="loop_test"{options})
        app.run()
        print("stopped")
    """))
    return stream_once(admin, tmp_path, [sys.executable, str(script)], **env)


def test_run_streams_on_uvloop_when_installed(admin: psycopg.Connection, dsn: str,
                                              tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    loop, errors = run_script(admin, dsn, tmp_path)
    assert loop == "uvloop.Loop", errors
    assert "walex: event loop uvloop " in errors and "(loop='auto')" in errors


@pytest.mark.parametrize("how", ["option", "WALEX_LOOP"])
def test_asyncio_on_request(admin: psycopg.Connection, dsn: str, tmp_path: Path, how: str) -> None:
    if how == "option":
        loop, errors = run_script(admin, dsn, tmp_path, options=', loop="asyncio"')
    else:
        loop, errors = run_script(admin, dsn, tmp_path, WALEX_LOOP="asyncio")
    assert loop.startswith("asyncio.") and "uvloop" not in loop, errors
    assert "walex: event loop asyncio (loop='asyncio')" in errors


def test_auto_without_uvloop_runs_on_asyncio_and_says_how_to_get_it(
        admin: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    loop, errors = run_script(admin, dsn, tmp_path, prelude=NO_UVLOOP)
    assert loop.startswith("asyncio."), errors
    assert f"walex: event loop asyncio (loop='auto'; uvloop is not installed: {FIX})" in errors


def test_walex_run_uses_uvloop_and_takes_loop_option(admin: psycopg.Connection, dsn: str,
                                                     tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    (tmp_path / "cdc.py").write_text(
        f"from walex import WalEx\nfrom handlers import events\n"
        f"app = WalEx({dsn!r}, publication='pub', modules=[events], name='loop_cli')\n")
    loop, errors = stream_once(admin, tmp_path, [*WALEX, "run", "cdc:app", "--log-level", "DEBUG"])
    assert loop == "uvloop.Loop", errors
    admin.execute("DROP PUBLICATION pub; DROP TABLE item")
    loop, errors = stream_once(admin, tmp_path, [*WALEX, "run", "cdc:app", "--loop", "asyncio"])
    assert loop.startswith("asyncio."), errors


def test_asking_for_uvloop_without_it_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.delenv("WALEX_LOOP", raising=False)
    url = "postgresql://u@h/db"
    with pytest.raises(ConfigError, match=r"loop='uvloop' needs uvloop, which is not installed: "
                                          r"pip install 'walex\[fast\]'"):
        WalEx(url, publication="p", loop="uvloop")
    events = Events()
    events.on_event("item")(lambda batch: None)
    source = "nats://127.0.0.1:4222?stream=S"
    with pytest.raises(ConfigError, match=r"pip install 'walex\[fast\]'"):
        Worker(source, [events], loop="uvloop")
    monkeypatch.setenv("WALEX_LOOP", "uvloop")
    with pytest.raises(ConfigError, match=r"pip install 'walex\[fast\]'"):
        WalEx(url, publication="p")
    with pytest.raises(ConfigError, match=r"pip install 'walex\[fast\]'"):
        Worker(source, [events])
    monkeypatch.setenv("WALEX_LOOP", "trio")
    with pytest.raises(ConfigError, match=r"loop must be one of auto, asyncio, uvloop, got 'trio' "
                                          r"\(from WALEX_LOOP\)"):
        Worker(source, [events])
    with pytest.raises(ConfigError, match="loop: Input should be 'auto', 'asyncio' or 'uvloop'"):
        WalEx(url, publication="p")
    monkeypatch.delenv("WALEX_LOOP")
    assert WalEx(url, publication="p").settings.loop == "auto"  # uvloop or not: auto is fine
    assert Worker(source, [events]).loop == "auto"


def test_walex_run_asking_for_uvloop_without_it(tmp_path: Path) -> None:
    """One line naming the fix, exit 1, no traceback (uvloop hidden from the command)."""
    (tmp_path / "cdc.py").write_text(
        "from walex import WalEx\napp = WalEx('postgresql://u@h/db', publication='p')\n")
    command = [sys.executable, "-c", NO_UVLOOP + "from walex.cli import app; app(prog_name='walex')",
               "run", "cdc:app", "--loop", "uvloop"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=clean_env())
    assert done.returncode == 1, done
    assert FIX in done.stderr and "Traceback" not in done.stderr, done.stderr
