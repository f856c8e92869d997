"""The ``walex`` command: ``demo``, ``run``.

Each command turns a :class:`~walex.errors.WalExError` into a one-line
message on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console

from .errors import WalExError

app = typer.Typer(
    name="walex", help="Simple and reliable Postgres Change Data Capture.",
    no_args_is_help=True, add_completion=False,
)
err = Console(stderr=True)


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[bold red]walex:[/] {exc}")
    return typer.Exit(1)


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


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="The app to run, as 'package.module:app'.")],
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run a WalEx app until SIGINT/SIGTERM."""
    from .app import WalEx
    from .modules import import_object

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if ":" not in target:
            raise WalExError(f"{target!r} names no app; use 'package.module:app'")
        obj = import_object(target)
        if not isinstance(obj, WalEx):
            raise WalExError(f"{target!r} is a {type(obj).__name__}, not a walex.WalEx")
        obj.run()
    except WalExError as exc:
        raise _fail(exc) from None


if __name__ == "__main__":  # pragma: no cover
    app()
