"""The ``walex`` command: ``demo``, ``run``, ``status``, ``setup``, ``tail``, ``drop-slot``,
``backfill``, ``worker``.

``walex run package.module:app`` imports and runs a :class:`~walex.WalEx`;
``walex run --config walex.toml`` builds one from a TOML file holding its
options at top level (``modules`` as import strings; ``WALEX_*`` variables
override the file). Imports start from ``--app-dir``: by default the config
file's folder, else the current one. With ``destinations`` and no ``modules``
that is a relay to brokers; ``--destination URL`` (repeatable) gives them on
the command line, with ``--config`` or with the ``WALEX_*`` variables alone.
SIGINT and SIGTERM stop it cleanly with exit code 0.
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
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from . import cli_admin, cli_setup, cli_status, cli_tail, cli_worker
from .backfill.command import backfill as backfill_command
from .cli_console import console
from .errors import ConfigError, WalExError, redact
from .logs import RedactingFormatter, transaction_fields

if TYPE_CHECKING:
    from .app import WalEx

app = typer.Typer(
    name="walex", help="Simple and reliable Postgres Change Data Capture.",
    no_args_is_help=True, add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from .event import WALEX_VERSION

        print(f"walex {WALEX_VERSION}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print walex's version and exit.",
    )] = False,
) -> None:
    """Simple and reliable Postgres Change Data Capture."""


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
        fields = transaction_fields()
        if fields is not None:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info), *self.secrets)
        return json.dumps(entry, default=str)


def _setup_logging(level: str, fmt: str) -> list[str]:
    """Log to stderr; returns the list of secrets the formatter scrubs (add to it)."""
    secrets: list[str] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(secrets) if fmt == "json" else RedactingFormatter(secrets))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return secrets


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_FORMATS = ("text", "json")


def _build_app(target: str | None, config: Path | None, relay: dict[str, Any]) -> WalEx:
    from .app import WalEx
    from .config import file_values, read_toml
    from .handlers import Events
    from .modules import import_object

    if config is not None:
        with file_values(read_toml(config)):
            return WalEx(**relay)
    if relay and target is None:
        return WalEx(**relay)  # the connection and publication from WALEX_*
    assert target is not None
    if ":" not in target:
        raise ConfigError(f"{target!r} names no app; use 'package.module:app'")
    obj = import_object(target)
    if isinstance(obj, Events):
        raise ConfigError(
            f"{target!r} is a handler module (walex.Events), not an app: run a "
            f"walex.WalEx(..., modules=[...]) that uses it, or --config walex.toml with "
            f"modules = [{target!r}]"
        )
    if not isinstance(obj, WalEx):
        raise ConfigError(f"{target!r} is not a walex.WalEx (its type is {type(obj).__name__})")
    return obj


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
        Optional[str],  # noqa: UP007
        typer.Option(help="Folder put first on sys.path to import the app and its modules "
                          "(default: the --config file's folder, else the current one).",
                     show_default=False),
    ] = None,
    destination: Annotated[
        Optional[list[str]],  # noqa: UP007
        typer.Option("--destination", help="A broker or webhook URL to publish every "
                     "event to (repeatable); with WALEX_* variables or --config, no app needed."),
    ] = None,
    metrics_port: Annotated[
        Optional[int],  # noqa: UP007
        typer.Option(help="Serve /metrics, /healthz and /livez on this port (needs "
                          "walex\\[metrics]).", show_default=False),
    ] = None,
    standby: Annotated[bool, typer.Option(
        "--standby", help="If another instance holds the durable slot, wait and take over "
                          "when it stops.")] = False,
    loop: Annotated[
        Optional[str],  # noqa: UP007
        typer.Option(help="The event loop: auto (uvloop if installed), asyncio or uvloop "
                          "(default: the app's loop option, else WALEX_LOOP, else auto).",
                     show_default=False),
    ] = None,
) -> None:
    """Run a WalEx app until SIGINT/SIGTERM (exit 0), from 'package.module:app' or --config."""
    try:
        level, fmt = log_level.upper(), log_format.lower()
        if level not in _LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(_LEVELS)}, got {log_level!r}")
        if fmt not in _FORMATS:
            raise ConfigError(f"--log-format must be text or json, got {log_format!r}")
        if target is not None and destination:
            raise ConfigError(
                "--destination builds the app from --config or WALEX_* variables; "
                f"{target!r} is an app already: give it destinations=[...] instead"
            )
        if (target is None) == (config is None) and not (destination and target is None):
            raise ConfigError(
                "give either the app to run ('package.module:app') or --config walex.toml, "
                "not both" if target is not None else
                "nothing to run: give the app ('package.module:app') or --config walex.toml"
            )
        secrets = _setup_logging(level, fmt)
        folder = Path(app_dir if app_dir is not None else config.parent if config else ".").resolve()
        sys.path.insert(0, str(folder))
        relay = {"destinations": destination} if destination else {}
        try:
            walex_app = _build_app(target, config, relay)
        except ConfigError as exc:
            if "no module named" not in str(exc).lower():
                raise
            raise ConfigError(
                f"{exc}\n(walex run imports from {folder}; --app-dir changes that)"
            ) from None
        if metrics_port is not None:
            walex_app.config.replace("metrics_port", metrics_port)
        if standby:
            walex_app.config.replace("standby", True)
        if loop is not None:
            walex_app.config.replace("loop", loop)
        secret = walex_app.settings.secret()
        if secret:
            secrets.append(secret)
        for item in walex_app.destinations.items:  # clients may log their URL
            secrets.extend(item.url.secrets)
        walex_app.run()
    except WalExError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:  # SIGINT before the app installed its own handler
        err.print("walex: interrupted")


app.command()(cli_status.status)
app.command()(cli_setup.setup)
app.command()(cli_tail.tail)
app.command("drop-slot")(cli_admin.drop_slot)
app.command()(backfill_command)  # walex backfill TABLE (walex.backfill.command)
app.command()(cli_worker.command(_setup_logging))  # walex worker SOURCE_URL package.module:obj


if __name__ == "__main__":  # pragma: no cover
    app()
