"""``walex worker SOURCE_URL package.module:obj``: handlers fed by what a relay published.

``walex worker --declare SOURCE_URL`` declares the group on the broker (the
stream or exchange, the group's consumers or queues) and exits: run it
before the relay publishes, so the group gets every event.

``obj`` may be a :class:`~walex.WalEx` app (its handler modules, name and
error policy are used; it does not connect to PostgreSQL), a
:class:`~walex.Events` handler module, or, without ``:obj``, a Python module
(every ``Events`` in it). ``SOURCE_URL`` is the relay's destination URL plus
``partitions=N`` when the relay has ``partitions`` (see :mod:`walex.workers`).
Options given on the command line override the app's (``--metrics-port``
is the worker's own: an app's ``metrics_port`` is not taken, as several
workers of one app may share a machine). ``--types package.module:mapping``
is the worker's ``types`` (:class:`~walex.destinations.decoding.Decoder`);
domains need none: the message names their base types. SIGINT and SIGTERM
stop the worker cleanly (exit 0); a handler failure under ``on_error="stop"``
exits 1 with the error, its messages left to the other workers. A Kafka
worker whose handler call outlives its cancellation while its partitions must
go to another worker exits 70 (:mod:`walex.workers.kafkasession`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Optional

import typer

from .cli_admin import _fail
from .errors import ConfigError, WalExError

__all__ = ["build_worker", "command"]

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_worker(source_url: str, target: str, options: dict[str, Any]) -> Any:
    """The :class:`~walex.workers.Worker` for ``target``; ``options`` override the app's."""
    from .handlers import Events
    from .modules import import_object
    from .workers import Worker, consumer_from_url

    consumer_from_url(source_url)  # a bad URL is reported before the handlers are imported
    obj = import_object(target)
    if isinstance(options.get("types"), str):  # 'package.module:mapping'
        options = {**options, "types": import_object(options["types"])}
    # a WalEx app was built by importing walex.app (and psycopg): when the handlers' module
    # did not, obj is no app, and a worker of Events never loads either
    app_module = sys.modules.get("walex.app")
    if app_module is not None and isinstance(obj, app_module.WalEx):
        return Worker.for_app(source_url, obj, **options)
    if isinstance(obj, Events):
        return Worker(source_url, [obj], **options)
    if isinstance(obj, ModuleType):
        return Worker(source_url, [target], **options)
    raise ConfigError(f"{target!r} is not a walex.WalEx app, a walex.Events handler module or a "
                      f"Python module holding them (its type is {type(obj).__name__})")


def _declare(source_url: str, secrets: list[str]) -> None:
    import asyncio

    from .destinations.base import Unavailable
    from .errors import DestinationError
    from .workers import consumer_from_url

    consumer = consumer_from_url(source_url)
    secrets.extend(consumer.url.secrets)
    try:
        asyncio.run(asyncio.wait_for(consumer.declare(), 120))
    except (Unavailable, TimeoutError) as exc:
        raise DestinationError(f"cannot declare on {consumer.display}: "
                               f"{exc or 'no answer'}") from None
    typer.echo(f"declared group {consumer.group!r} ({consumer.partitions} partition(s)) on "
               f"{consumer.display}")


def command(setup_logging: Callable[[str, str], list[str]]) -> Callable[..., None]:
    """The ``worker`` command, logging set up by ``setup_logging(level, format)``."""

    def worker(
        source_url: Annotated[str, typer.Argument(
            help="The relay's destination URL (nats:// or amqp://), plus &partitions=N if the "
                 "relay has partitions.", show_default=False)],
        target: Annotated[Optional[str], typer.Argument(  # noqa: UP007
            help="The handlers: 'package.module:app' (a WalEx app), 'package.module:events' "
                 "(a walex.Events) or 'package.module' (not with --declare).",
            show_default=False)] = None,
        declare: Annotated[bool, typer.Option(
            "--declare", help="Declare the group on the broker (the stream or exchange, the "
                              "group's consumers or queues) and exit: before the relay "
                              "publishes, so that the group gets every event.")] = False,
        concurrency: Annotated[Optional[int], typer.Option(  # noqa: UP007
            help="Handler calls at once, for different partitions (default 1).",
            show_default=False)] = None,
        on_error: Annotated[Optional[str], typer.Option(  # noqa: UP007
            help="stop, skip, or 'package.module:function' (a dead-letter handler); default: "
                 "the app's, else stop.", show_default=False)] = None,
        max_retries: Annotated[Optional[int], typer.Option(  # noqa: UP007
            help="Retries of a failing call (default: the app's, else 3).",
            show_default=False)] = None,
        metrics_port: Annotated[Optional[int], typer.Option(  # noqa: UP007
            help="Serve /metrics, /healthz and /livez on this port (needs walex\\[metrics]).",
            show_default=False)] = None,
        types: Annotated[Optional[str], typer.Option(  # noqa: UP007
            help="'package.module:mapping': {type name: callable} typing the JSON form of a "
                 "user type back (see walex.destinations.decoding).", show_default=False)] = None,
        loop: Annotated[Optional[str], typer.Option(  # noqa: UP007
            help="The event loop: auto (uvloop if installed), asyncio or uvloop (default: the "
                 "app's, else WALEX_LOOP, else auto).", show_default=False)] = None,
        log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
        log_format: Annotated[str, typer.Option(help="text or json (one object per line).")] = "text",
        app_dir: Annotated[str, typer.Option(
            help="Folder put first on sys.path to import the handlers.")] = ".",
    ) -> None:
        """Handle what a relay published to a broker, with an app's handlers (exit 0 on SIGTERM)."""
        try:
            level, fmt = log_level.upper(), log_format.lower()
            if level not in _LEVELS:
                raise ConfigError(f"--log-level must be one of {', '.join(_LEVELS)}, got {log_level!r}")
            if fmt not in ("text", "json"):
                raise ConfigError(f"--log-format must be text or json, got {log_format!r}")
            secrets = setup_logging(level, fmt)
            if declare:
                _declare(source_url, secrets)
                return
            if target is None:
                raise ConfigError("walex worker needs the handlers ('package.module:app'), "
                                  "or --declare")
            folder = Path(app_dir).resolve()
            sys.path.insert(0, str(folder))
            options = {k: v for k, v in (("concurrency", concurrency), ("on_error", on_error),
                                         ("max_retries", max_retries), ("loop", loop),
                                         ("metrics_port", metrics_port), ("types", types))
                       if v is not None}
            try:
                built = build_worker(source_url, target, options)
            except ConfigError as exc:
                if "no module named" not in str(exc).lower():
                    raise
                raise ConfigError(f"{exc}\n(walex worker imports from {folder}; --app-dir "
                                  "changes that)") from None
            secrets.extend(built.secrets)
            built.run()
        except WalExError as exc:
            raise _fail(exc) from None
        except KeyboardInterrupt:
            typer.echo("walex: interrupted", err=True)

    return worker
