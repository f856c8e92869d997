"""The ``walex`` command: ``demo``, ``run``, ``status``, ``setup``, ``tail``, ``backfill``.

``walex run package.module:app`` imports and runs a :class:`~walex.WalEx`;
``walex run --config walex.toml`` builds one from a TOML file holding its
options at top level (``modules`` as import strings; ``WALEX_*`` variables
override the file). SIGINT and SIGTERM stop it cleanly with exit code 0.
Logs go to stderr as text or, with ``--log-format json``, one JSON object per
line, passwords scrubbed. Each command turns a
:class:`~walex.errors.WalExError` into a one-line message on stderr and exit
code 1, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import cli_admin
from .backfill.command import backfill as backfill_command
from .errors import ConfigError, WalExError, redact

app = typer.Typer(
    name="walex", help="Simple and reliable Postgres Change Data Capture.",
    no_args_is_help=True, add_completion=False,
)
err = Console(stderr=True)


_fail = cli_admin._fail  # escapes: a message may hold brackets rich would take as markup


@app.command()
def demo(
    follow: Annotated[bool, typer.Option("--follow", help="Keep streaming; print the DSN for psql.")] = False,
) -> None:
    """Show walex on a throwaway embedded PostgreSQL: tables, changes, events."""
    from .demo import run_demo

    try:
        code = run_demo(follow=follow)
    except WalExError as exc:
        raise _fail(exc) from None
    raise typer.Exit(code)


class _TextFormatter(logging.Formatter):
    """The usual one-line format, with passwords scrubbed."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), *self.secrets)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message[, exception]."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage(), *self.secrets),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info), *self.secrets)
        return json.dumps(entry, default=str)


def _setup_logging(level: str, fmt: str) -> list[str]:
    """Log to stderr; returns the list of secrets the formatter scrubs (add to it)."""
    secrets: list[str] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(secrets) if fmt == "json" else _TextFormatter(secrets))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return secrets


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_FORMATS = ("text", "json")


@app.command()
def run(
    target: Annotated[
        Optional[str],  # noqa: UP007 - typer needs Optional on Python 3.11
        typer.Argument(help="The app to run, as 'package.module:app'."),
    ] = None,
    config: Annotated[
        Optional[Path],  # noqa: UP007
        typer.Option("--config", "-c", help="A TOML file of WalEx options; builds the app from it."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    log_format: Annotated[str, typer.Option(help="text or json (one object per line).")] = "text",
    app_dir: Annotated[
        str, typer.Option(help="Folder put first on sys.path to import the app and its modules.")
    ] = ".",
) -> None:
    """Run a WalEx app until SIGINT/SIGTERM (exit 0), from 'package.module:app' or --config."""
    from .app import WalEx
    from .config import file_values, read_toml
    from .modules import import_object

    try:
        level, fmt = log_level.upper(), log_format.lower()
        if level not in _LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(_LEVELS)}, got {log_level!r}")
        if fmt not in _FORMATS:
            raise ConfigError(f"--log-format must be text or json, got {log_format!r}")
        if (target is None) == (config is None):
            raise ConfigError(
                "give either the app to run ('package.module:app') or --config walex.toml, "
                "not both" if target is not None else
                "nothing to run: give the app ('package.module:app') or --config walex.toml"
            )
        secrets = _setup_logging(level, fmt)
        sys.path.insert(0, str(Path(app_dir).resolve()))
        if config is not None:
            with file_values(read_toml(config)):
                walex_app = WalEx()
        else:
            assert target is not None
            if ":" not in target:
                raise ConfigError(f"{target!r} names no app; use 'package.module:app'")
            obj = import_object(target)
            if not isinstance(obj, WalEx):
                raise ConfigError(f"{target!r} is a {type(obj).__name__}, not a walex.WalEx")
            walex_app = obj
        secret = walex_app.settings.secret()
        if secret:
            secrets.append(secret)
        walex_app.run()
    except WalExError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:  # SIGINT before the app installed its own handler
        err.print("walex: interrupted")


app.command()(cli_admin.status)
app.command()(cli_admin.setup)
app.command()(cli_admin.tail)
app.command()(backfill_command)  # walex backfill TABLE (walex.backfill.command)


if __name__ == "__main__":  # pragma: no cover
    app()
