"""``walex run`` as a real subprocess: app targets and TOML configs, logs, signals, errors.

Concern: the installed ``walex`` command runs an app named
``package.module:app`` (imported from the current folder, no PYTHONPATH
needed) or built from ``--config walex.toml`` (``WALEX_*`` variables override
the file); SIGINT and SIGTERM stop it with exit code 0, also before it
streams; ``--log-format json`` writes one JSON object per line; passwords
show nowhere; every mistake (imports, configuration, command line) is one
precise line on stderr with exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

SECRET = "pw-Secret-0815"
SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]

HANDLERS = """
from walex import Events
events = Events()

@events.on_insert("item")
def record(items):
    with open("events.txt", "a") as f:
        for e in items:
            f.write(f"{e.new_record['id']}\\n")
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without PYTHONPATH and WALEX_* (and COLUMNS wide, for one-line errors)."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("WALEX_")}
    return {**env, "COLUMNS": "200", **extra}


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*WALEX, "run", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(**env))


def wait_for(check: object, proc: subprocess.Popen[str], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if proc.poll() is not None:
            out, errors = proc.communicate()
            raise AssertionError(f"walex run exited ({proc.returncode}) before {what}:\n{out}{errors}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def streaming(admin: psycopg.Connection) -> bool:
    return bool(admin.execute("SELECT count(*) FROM pg_replication_slots WHERE active "
                              "AND database = current_database()").fetchone()[0])


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, errors = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, errors


def received(folder: Path) -> list[str]:
    path = folder / "events.txt"
    return path.read_text().split() if path.exists() else []


def setup_table(admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE item")


def test_run_from_toml_until_sigint(admin: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    setup_table(admin)
    (tmp_path / "cli_handlers.py").write_text(HANDLERS)
    (tmp_path / "walex.toml").write_text(textwrap.dedent(f"""
        url = "{make_conninfo(dsn, password=SECRET)}"
        publication = "pub"
        subscriptions = ["no_such_table"]   # WALEX_SUBSCRIPTIONS overrides this
        modules = ["cli_handlers:events"]
        name = "cli_toml"
        status_interval = 1
    """))
    proc = start(["--config", "walex.toml", "--log-level", "debug"], tmp_path,
                 WALEX_SUBSCRIPTIONS="public.item")
    wait_for(lambda: streaming(admin), proc, "streaming")
    admin.execute("INSERT INTO item VALUES (1), (2)")
    admin.execute("INSERT INTO item VALUES (3)")
    wait_for(lambda: received(tmp_path) == ["1", "2", "3"], proc, "3 events")
    code, errors = stop(proc, signal.SIGINT)
    assert code == 0, errors
    assert "walex 'cli_toml' streaming publication 'pub'" in errors
    assert " DEBUG walex" in errors and "Traceback" not in errors
    assert SECRET not in errors


def test_run_app_with_json_logs_until_sigterm(admin: psycopg.Connection, dsn: str,
                                              tmp_path: Path) -> None:
    setup_table(admin)
    (tmp_path / "cli_app.py").write_text(HANDLERS + textwrap.dedent(f"""
        from walex import WalEx
        app = WalEx({dsn!r}, password={SECRET!r}, publication="pub", subscriptions=["item"],
                    modules=[events], name="cli_json")
    """))
    # the installed script, no PYTHONPATH: the app is found in the current folder
    proc = start(["cli_app:app", "--log-format", "json", "--log-level", "DEBUG"], tmp_path)
    wait_for(lambda: streaming(admin), proc, "streaming")
    admin.execute("INSERT INTO item VALUES (7)")
    wait_for(lambda: received(tmp_path) == ["7"], proc, "the event")
    code, errors = stop(proc, signal.SIGTERM)
    assert code == 0, errors
    entries = [json.loads(line) for line in errors.splitlines()]
    assert entries and all(set(e) == {"time", "level", "logger", "message"} for e in entries)
    assert all(e["time"].endswith("+00:00") for e in entries)
    assert {e["level"] for e in entries} >= {"INFO", "DEBUG"}
    assert any(e["logger"] == "walex" and e["message"].startswith(
        "walex 'cli_json' streaming publication 'pub'") for e in entries)
    assert SECRET not in errors


def test_sigint_before_streaming_exits_0(tmp_path: Path) -> None:
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(30)
        (tmp_path / "walex.toml").write_text(textwrap.dedent(f"""
            hostname = "127.0.0.1"
            port = {server.getsockname()[1]}
            database = "x"
            publication = "pub"
        """))
        proc = start(["--config", "walex.toml"], tmp_path)
        try:
            connection, _ = server.accept()  # walex is connecting: start() has not returned
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"walex never connected: {proc.communicate()}") from None
        with connection:
            time.sleep(0.2)
            code, errors = stop(proc, signal.SIGINT)
    assert code == 0, errors
    assert "stopped by SIGINT while starting" in errors and "Traceback" not in errors, errors


# -- mistakes ------------------------------------------------------------------------------

MODULES = {
    "cli_mod.py": "X = 1\n",
    "cli_boom.py": "raise RuntimeError('[/boom] at import')\n",
    "cli_dep.py": "import missing_dep_xyz\n",
    "cli_notapp.py": "app = 42\n",
    "cli_handlers.py": HANDLERS,
    "cli_badhandlers.py": ("from walex import WalEx\n"
                           "app = WalEx('postgresql://localhost/x', publication='pub',"
                           " modules=['missing_handlers_xyz'])\n"),
}


@pytest.mark.parametrize(("args", "message"), [
    (["no_such_module_xyz:app"], "cannot import 'no_such_module_xyz': no module named "
     "'no_such_module_xyz' (is the package installed, or its folder on sys.path / PYTHONPATH?)"),
    (["cli_mod:app"], "module 'cli_mod' has no attribute 'app'"),
    (["cli_boom:app"], "importing 'cli_boom' failed: RuntimeError('[/boom] at import')"),
    (["cli_dep:app"], "importing 'cli_dep' failed: ModuleNotFoundError(\"No module named "
     "'missing_dep_xyz'\")"),
    (["cli_notapp:app"], "'cli_notapp:app' is not a walex.WalEx (its type is int)"),
    (["cli_handlers:events"], "'cli_handlers:events' is a handler module (walex.Events), not an "
     "app: run a walex.WalEx(..., modules=[...]) that uses it, or --config walex.toml with "
     "modules = ['cli_handlers:events']"),
    (["cli_mod"], "'cli_mod' names no app; use 'package.module:app'"),
    (["cli_badhandlers:app"], "importing 'cli_badhandlers' failed: cannot import "
     "'missing_handlers_xyz': no module named 'missing_handlers_xyz'"),
    (["--config", "missing.toml"], "configuration file 'missing.toml' does not exist"),
    (["--config", "broken.toml"], "configuration file 'broken.toml' is not valid TOML: "
     "Expected '=' after a key in a key/value pair (at line 1, column 13)"),
    (["--config", "wrong.toml"], "invalid walex configuration (3 problems):\n"
     "  - port: Input should be a valid integer, unable to parse string as an integer\n"
     "  - publication: required: give publication = ... in the configuration file or set "
     "WALEX_PUBLICATION\n"
     "  - pasword: Extra inputs are not permitted"),
    (["--config", "modules.toml"], "invalid walex configuration (1 problem):\n"
     "  - message_middleware: cannot import 'missing_mw_xyz': no module named 'missing_mw_xyz'"),
    (["cli_mod:app", "--log-level", "LOUD"],
     "--log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
    (["cli_mod:app", "--log-format", "xml"], "--log-format must be text or json, got 'xml'"),
    ([], "nothing to run: give the app ('package.module:app') or --config walex.toml"),
    (["cli_mod:app", "--config", "wrong.toml"],
     "give either the app to run ('package.module:app') or --config walex.toml, not both"),
])
def test_mistakes_are_one_precise_message(tmp_path: Path, args: list[str], message: str) -> None:
    for name, source in MODULES.items():
        (tmp_path / name).write_text(source)
    (tmp_path / "broken.toml").write_text("publication \n")
    (tmp_path / "wrong.toml").write_text(f'port = "x"\npasword = "{SECRET}"\n')
    (tmp_path / "modules.toml").write_text(
        'publication = "p"\nmessage_middleware = "missing_mw_xyz:handle"\n')
    proc = subprocess.run([*WALEX, "run", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=clean_env())
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"walex: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr


def test_config_in_another_folder_imports_modules_from_there(admin: psycopg.Connection, dsn: str,
                                                             tmp_path: Path) -> None:
    setup_table(admin)
    project, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "cli_proj_handlers.py").write_text(HANDLERS)
    (project / "walex.toml").write_text(textwrap.dedent(f"""
        url = "{dsn}"
        publication = "pub"
        modules = ["cli_proj_handlers:events"]
    """))
    proc = start(["--config", "../proj/walex.toml"], elsewhere)
    wait_for(lambda: streaming(admin), proc, "streaming")
    admin.execute("INSERT INTO item VALUES (5)")
    wait_for(lambda: received(elsewhere) == ["5"], proc, "the event")  # the handler writes to cwd
    code, errors = stop(proc, signal.SIGINT)
    assert code == 0, errors


def test_module_not_found_names_the_folder_and_app_dir(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "walex.toml").write_text('publication = "pub"\nmodules = ["cli_missing_xyz"]\n')
    proc = subprocess.run([*WALEX, "run", "--config", "proj/walex.toml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 1
    assert proc.stderr == (
        "walex: cannot import 'cli_missing_xyz': no module named 'cli_missing_xyz' (is the "
        "package installed, or its folder on sys.path / PYTHONPATH?)\n"
        f"(walex run imports from {project.resolve()}; --app-dir changes that)\n"
    )
