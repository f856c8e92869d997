"""``walex backfill TABLE [--where SQL] --config walex.toml``: a backfill from the shell.

The app is the one the configuration describes (as for ``walex run
--config``). The command checks the table and the condition, stores the
request in the progress store, and then:

- if the app is running (its durable slot is active, or a walsender carries
  its name), wakes it with a ``walex.backfill`` message in the stream and
  follows the progress it stores;
- otherwise runs the app itself, streaming as usual, until the backfill is
  done, and stops it.

Either way it draws a progress bar (rows done of the estimate, rows per
second, time left) and exits 0 when the backfill is done, 1 when it failed
(with the reason) or was cancelled. Ctrl-C stops following; a backfill
carried out by a running app goes on there (``walex status`` shows it).

``walex backfill TABLE --cancel`` marks the app's pending or running backfill
of TABLE cancelled in the progress store (a running app stops it before its
next chunk) and exits 0, or 1 when none was under way.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..cli_console import console
from ..errors import ConfigError, SetupError, WalExError, redact

if TYPE_CHECKING:  # psycopg and the backfill's machinery are imported when the command runs:
    # the CLI registers it without loading them (`walex worker`, `walex --help`)
    import psycopg

    from .store import Job, Store

__all__ = ["backfill"]

err = console(stderr=True)
# seconds the server has to answer each query of the command (a silent network included)
QUERY_TIMEOUT = 30.0


def backfill(
    table: Annotated[str, typer.Argument(help="The table to read, 'name' or 'schema.name'.")],
    where: Annotated[Optional[str], typer.Option(  # noqa: UP007 - typer needs Optional on 3.11
        "--where", help="Only the rows matching this SQL condition, e.g. \"created_at > '2024-01-01'\".",
    )] = None,
    config: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        "--config", "-c", help="The app's TOML configuration (as for walex run --config).",
    )] = None,
    app_dir: Annotated[str, typer.Option(
        help="Folder put first on sys.path to import the app's handler modules.")] = ".",
    cancel: Annotated[bool, typer.Option(
        "--cancel", help="Cancel the table's pending or running backfill instead.")] = False,
) -> None:
    """Deliver a table's existing rows (or those matching --where) as read events."""
    import psycopg

    from ..app import WalEx
    from ..config import file_values, read_toml
    from ..lifecycle import run_loop

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.path.insert(0, str(Path(app_dir).resolve()))
        if config is not None:
            sys.path.insert(1, str(config.resolve().parent))
            with file_values(read_toml(config)):
                app = WalEx()
        else:
            app = WalEx()  # from WALEX_* variables
        if cancel:
            if where is not None:
                raise ConfigError("--cancel takes no --where: it cancels the table's backfill")
            cancelled = run_loop(lambda: _cancel(app, table), app.settings.loop)
            if cancelled is None:
                err.print(f"[bold red]walex:[/] no backfill of {_escape(table)} is pending or "
                          "running", soft_wrap=True)
                raise typer.Exit(1)
            console().print(f"cancelled the backfill of {cancelled.qualified} after "
                            f"{cancelled.rows_done:,} rows (a running app stops it before its "
                            "next chunk)")
            return
        job = run_loop(lambda: _backfill(app, table, where), app.settings.loop)
    except WalExError as exc:
        err.print(f"[bold red]walex:[/] {_escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except psycopg.OperationalError as exc:
        err.print(f"[bold red]walex:[/] the connection to {_escape(app.settings.display_target())} "
                  f"was lost: {_escape(redact(str(exc), app.settings.secret()))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("walex: stopped following the backfill")
        raise typer.Exit(130) from None
    if job.state == "cancelled":
        err.print(f"[bold red]walex:[/] the backfill of {_escape(job.qualified)} was cancelled "
                  f"after {job.rows_done:,} rows", soft_wrap=True)
        raise typer.Exit(1)
    if job.state != "done":
        err.print(f"[bold red]walex:[/] the backfill of {_escape(job.qualified)} failed: "
                  f"{_escape(job.error or 'unknown error')}", soft_wrap=True)
        raise typer.Exit(1)
    console().print(f"backfilled {job.qualified}: {job.rows_done:,} rows")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


async def _connect(app: object) -> psycopg.AsyncConnection:
    import psycopg

    from ..app import WalEx
    from ..lookups import DeadlineConnection

    assert isinstance(app, WalEx)
    s = app.settings
    try:
        conn = await DeadlineConnection.connect(s.app_conninfo(), autocommit=True)
    except psycopg.Error as exc:
        raise SetupError(f"cannot connect to {s.display_target()}: {redact(str(exc), s.secret())}") from None
    conn.deadline = QUERY_TIMEOUT  # a query not answered in time: the connection is lost
    return conn


async def _cancel(app: object, table: str) -> Job | None:
    from ..app import WalEx
    from .store import Store

    assert isinstance(app, WalEx)
    async with await _connect(app) as conn:
        return await Store(app.settings.backfill_table, app.settings.name).cancel(conn, table)


async def _backfill(app: object, table: str, where: str | None) -> Job:
    from ..app import WalEx
    from .runner import check_condition
    from .store import Store
    from .target import resolve_target
    from .watermarks import PREFIX, payload

    assert isinstance(app, WalEx)
    s = app.settings
    store = Store(s.backfill_table, s.name)
    async with await _connect(app) as conn:
        target = await resolve_target(conn, s.publication, table, s.subscriptions)
        await check_condition(conn, target, where)
        if not await store.request(conn, target.schema, target.name, where, target.key):
            job = await store.job(conn, target.schema, target.name)
            if job is not None and job.condition != where:
                raise ConfigError(
                    f"a backfill of {target.qualified} is already under way"
                    f"{' where ' + job.condition if job.condition else ''}; wait for it "
                    "(walex status shows it)"
                )
        if await _running(conn, app.slot_name, s.name, s.durable_slot):
            await conn.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                               (PREFIX, payload(s.name, wake=True)))
            err.print(f"[dim]walex app {_escape(s.name)} is running: it reads "
                      f"{_escape(target.qualified)}; following its progress[/]")
            return await _follow(conn, store, target.schema, target.name)
        err.print(f"[dim]walex app {_escape(s.name)} is not running: running it until "
                  f"{_escape(target.qualified)} is read[/]")
        async with app:
            follow = asyncio.create_task(_follow(conn, store, target.schema, target.name))
            stopped = asyncio.create_task(app.wait())
            await asyncio.wait([follow, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not follow.done():
                follow.cancel()
                stopped.result()  # the app stopped with an error: raised
                raise SetupError(f"walex app {s.name!r} stopped before the backfill finished")
            stopped.cancel()
            return follow.result()


async def _running(conn: psycopg.AsyncConnection, slot: str, name: str, durable: bool) -> bool:
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active AND %s) "
        "OR EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'walsender' "
        "AND application_name = %s AND datname = current_database())",
        (slot, durable, name),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _follow(conn: psycopg.AsyncConnection, store: Store, schema: str, table: str) -> Job:
    """Show the stored progress as a bar until the backfill is done or failed."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err.console, transient=False) as bar:
        task = bar.add_task(f"{schema}.{table}", total=None, rate="")
        while True:
            job = await store.job(conn, schema, table)
            if job is None:
                raise SetupError(f"the backfill request for {schema}.{table} disappeared from "
                                 f"the progress store {store.option!r}")
            total = max(job.rows_estimated or 0, job.rows_done) or None
            rate = f"{job.rate:,.0f} rows/s" if job.rate else job.state
            bar.update(task, completed=job.rows_done, total=total, rate=rate)
            if job.finished:
                if job.state == "done":
                    bar.update(task, total=job.rows_done, completed=job.rows_done)
                return job
            await asyncio.sleep(0.25)
