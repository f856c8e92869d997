"""``walex status``, ``walex setup`` and ``walex tail``: the operator's commands.

Both take the connection and publication like ``walex run``: ``--url`` /
``--publication`` (or ``WALEX_URL`` / ``WALEX_PUBLICATION`` and the other
``WALEX_*`` variables), or ``--config walex.toml``. ``status`` only reads and
exits 1 when something would stop walex; ``setup`` changes only what its
flags ask for and says what it did; ``tail`` prints the changes of a
publication as they are committed, on a temporary slot (so it leaves nothing
behind), until Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import psycopg
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .admin import apply_setup, inspect_database
from .backfill.report import status_table as backfill_table
from .backfill.store import read_all as read_backfills
from .config import WalExSettings, file_values, load_settings, read_toml
from .errors import SetupError, WalExError, redact

out = Console()

UrlOption = Annotated[
    Optional[str],  # noqa: UP007 - typer needs Optional on Python 3.11
    typer.Option("--url", help="postgresql://user@host/db (or WALEX_URL).", show_default=False),
]
PublicationOption = Annotated[
    Optional[str],  # noqa: UP007
    typer.Option("--publication", "-p", help="The publication walex streams (or WALEX_PUBLICATION)."),
]
ConfigOption = Annotated[
    Optional[Path],  # noqa: UP007
    typer.Option("--config", "-c", help="A TOML file of WalEx options."),
]


def _settings(url: str | None, publication: str | None, config: Path | None) -> WalExSettings:
    options = {k: v for k, v in (("url", url), ("publication", publication)) if v is not None}
    if config is not None:
        with file_values(read_toml(config)):
            return load_settings(**options)
    return load_settings(**options)


def _connect(settings: WalExSettings) -> psycopg.Connection:
    try:
        return psycopg.connect(settings.conninfo(), autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise SetupError(
            f"cannot connect to {settings.display_target()}: {redact(str(exc), settings.secret())}"
        ) from None


def status(url: UrlOption = None, publication: PublicationOption = None,
           config: ConfigOption = None) -> None:
    """Report whether PostgreSQL is ready for walex, every slot's lag, and the backfills."""
    try:
        settings = _settings(url, publication, config)
        with _connect(settings) as conn:
            report = inspect_database(conn, settings.publication)
            backfills = read_backfills(conn, settings.backfill_table)
    except WalExError as exc:
        raise _fail(exc) from None
    out.print(f"PostgreSQL {report.server_version}, database [bold]{report.database}[/], "
              f"wal_level [bold]{report.wal_level}[/]")
    out.print("  " + ", ".join(f"{k}={v}" for k, v in report.settings.items()))
    if report.publication_exists:
        tables = Table("table", "replica identity", title=f"publication {report.publication}")
        for t in report.tables:
            tables.add_row(f"{t['schema']}.{t['table']}", t["replica_identity"])
        out.print(tables)
    if report.slots:
        slots = Table("slot", "active (pid)", "confirmed flush", "lag", "wal status", title="slots")
        for s in report.slots:
            lag = s["lag_bytes"]
            slots.add_row(
                s["slot"] + (" (temporary)" if s["temporary"] else ""),
                f"yes ({s['pid']})" if s["active"] else "no", s["confirmed_flush_lsn"] or "-",
                f"{lag / 1048576:.1f} MiB" if lag is not None else "-", s["wal_status"] or "-",
            )
        out.print(slots)
    if backfills:
        out.print(backfill_table(backfills))
    for problem in report.problems:
        mark = "[bold red]problem[/]" if problem.fatal else "[yellow]warning[/]"
        out.print(f"{mark}: {escape(problem.what)}\n  fix: {escape(problem.fix)}")
    if report.ok:
        out.print("[bold green]ready:[/] walex can stream this publication")
    raise typer.Exit(0 if report.ok else 1)


def setup(
    url: UrlOption = None,
    publication: PublicationOption = None,
    config: ConfigOption = None,
    table: Annotated[list[str], typer.Option(
        "--table", "-t", help="Create the publication for these tables (default: all tables).")] = [],  # noqa: B006
    replica_identity_full: Annotated[bool, typer.Option(
        help="Set REPLICA IDENTITY FULL on the published tables (old values, changes).")] = False,
    slot: Annotated[Optional[str], typer.Option(help="Create this durable slot.")] = None,  # noqa: UP007
    wal_level: Annotated[bool, typer.Option(
        "--wal-level", help="ALTER SYSTEM SET wal_level = 'logical' (then restart PostgreSQL).")] = False,
) -> None:
    """Create what walex needs: the publication, and on request replica identity, a slot, wal_level."""
    try:
        settings = _settings(url, publication, config)
        with _connect(settings) as conn:
            try:
                done = apply_setup(conn, settings.publication, tables=table or None,
                                   replica_identity_full=replica_identity_full, slot=slot,
                                   wal_level=wal_level)
            except psycopg.Error as exc:
                raise SetupError(f"setup failed: {redact(str(exc), settings.secret())}") from None
    except WalExError as exc:
        raise _fail(exc) from None
    for line in done or ["nothing to do"]:
        out.print(f"- {escape(line)}")


def _fail(exc: Exception) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]walex:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(1)


def tail(
    url: UrlOption = None,
    publication: PublicationOption = None,
    config: ConfigOption = None,
    table: Annotated[list[str], typer.Option(
        "--table", "-t", help="Only these tables ('name' or 'schema.name'); default: all.")] = [],  # noqa: B006
    limit: Annotated[Optional[int], typer.Option(  # noqa: UP007
        help="Stop after this many events.")] = None,
) -> None:
    """Print every change of the publication as it is committed (temporary slot)."""
    import asyncio
    import signal

    from .app import WalEx
    from .demo import print_event
    from .event import Event
    from .handlers import Events

    try:
        settings = _settings(url, publication, config)
        events, stop = Events(), asyncio.Event()
        seen = 0

        @events.on_event("all")
        async def show(batch: list[Event]) -> None:
            nonlocal seen
            for event in batch:
                if limit is not None and seen >= limit:
                    break
                print_event(out, event)
                seen += 1
            if limit is not None and seen >= limit:
                stop.set()

        options = settings.model_dump(exclude_unset=True)
        options.update(modules=[events], name="walex_tail", durable_slot=False, slot_name=None)
        if table:
            options["subscriptions"] = table
        app = WalEx(**options)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            async with app:
                Console(stderr=True).print(
                    f"[dim]tailing publication {settings.publication} on "
                    f"{escape(settings.display_target())}; Ctrl-C to stop[/]")
                waiter = asyncio.create_task(app.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if waiter.done():
                    waiter.result()
                else:
                    waiter.cancel()

        asyncio.run(main())
    except WalExError as exc:
        raise _fail(exc) from None
