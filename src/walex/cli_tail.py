"""``walex tail``: print a publication's changes as they are committed, until Ctrl-C.

It streams on a temporary slot (nothing is left behind) as a :class:`~walex.WalEx`
app would, with options fit for a command a person waits on. ``--timeout``
(30 s by default) bounds how long it waits on a server or network that stopped
answering:

- the walsender is told to time out after ``--timeout`` too (its
  ``wal_sender_timeout``, set on tail's connection unless the URL's ``options``
  or ``PGOPTIONS`` set it already). A walsender busy decoding changes it does
  not publish sends a keepalive every half of that, so a live server is never
  silent that long, and tail counts a silence past ``--timeout`` plus one
  status interval (a third of ``--timeout``, 10 s at most) as a lost connection;
- it then tries :data:`RECONNECTS` times to reconnect (each connection attempt
  waits at most a third of ``--timeout``, 2 to 10 s, unless the URL's
  ``connect_timeout`` or ``PGCONNECT_TIMEOUT`` says otherwise), each on a new
  temporary slot (what was committed in between is never shown), and gives up
  with an error saying so.

So a silent network ends ``tail`` within about 3 x ``--timeout`` + 10 seconds
(100 s with the default), where a ``walex run`` app, made to ride out outages,
waits for the server's ``wal_sender_timeout`` and reconnects 10 times.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .cli_admin import (
    QUERY_TIMEOUT,
    ConfigOption,
    PublicationOption,
    UrlOption,
    _fail,
    _settings,
    _timeout,
    out,
)
from .cli_console import console, escape
from .errors import ReplicationError, WalExError

if TYPE_CHECKING:
    from .config import WalExSettings

RECONNECTS = 2  # reconnect attempts after a lost connection, then tail gives up


TailTimeoutOption = Annotated[float, typer.Option(
    "--timeout", metavar="SECONDS", callback=_timeout,
    help="Count a server or network silent for about SECONDS as lost; give up after "
         f"{RECONNECTS} reconnect attempts (about 3 x SECONDS + 10 s in all).")]


def tail_options(settings: WalExSettings, timeout: float) -> dict[str, Any]:
    """The WalEx options of ``walex tail`` (see the module) for ``settings``."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    settings.conninfo()  # a ConfigError naming the problem for a malformed URL
    options = settings.model_dump(exclude_unset=True)
    base = settings.url.get_secret_value() if settings.url else ""
    given = conninfo_to_dict(base)
    extra: dict[str, Any] = {}
    if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
        extra["connect_timeout"] = max(2, min(10, int(timeout / 3)))
    pgoptions = str(given.get("options") or os.environ.get("PGOPTIONS") or "")
    if "wal_sender_timeout" not in pgoptions:  # the URL's options replace PGOPTIONS: keep it
        extra["options"] = f"{pgoptions} -c wal_sender_timeout={round(timeout * 1000)}".strip()
    if extra:
        options["url"] = make_conninfo(base, **extra)
    options.update(
        name="walex_tail", durable_slot=False, slot_name=None,
        status_interval=min(settings.status_interval, timeout / 3),
        reconnect_max_attempts=min(settings.reconnect_max_attempts, RECONNECTS),
        reconnect_backoff_max=min(settings.reconnect_backoff_max, 5.0),
    )
    return options


# what tail's gap messages advise (an app's say durable_slot=True, which tail has not)
GAP_ADVICE = ("walex tail shows only what is committed while it streams; a walex app with "
              "durable_slot=True receives every change.")


def tail(
    url: UrlOption = None,
    publication: PublicationOption = None,
    config: ConfigOption = None,
    table: Annotated[list[str], typer.Option(
        "--table", "-t", metavar="TABLE",
        help="Only these tables ('name' or 'schema.name'); default: all.")] = [],  # noqa: B006
    limit: Annotated[Optional[int], typer.Option(  # noqa: UP007
        min=1, help="Stop after this many events.")] = None,
    timeout: TailTimeoutOption = QUERY_TIMEOUT,
) -> None:
    """Print every change of the publication as it is committed (temporary slot)."""
    import asyncio
    import signal

    from .app import WalEx
    from .demo import print_event
    from .event import Event
    from .handlers import Events
    from .lifecycle import run_loop

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

        options = tail_options(settings, timeout)
        options["modules"] = [events]
        if table:
            options["subscriptions"] = table
        app = WalEx(**options)
        app.pipeline.gap_advice = GAP_ADVICE

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            async with app:
                console(stderr=True).print(
                    f"[dim]tailing publication {settings.publication} on "
                    f"{escape(app.target)}; Ctrl-C to stop[/]")
                waiter = asyncio.create_task(app.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if waiter.done():
                    waiter.result()
                else:
                    waiter.cancel()

        try:
            run_loop(main, app.settings.loop)
        except ReplicationError as exc:
            if not str(exc).startswith("gave up reconnecting"):
                raise
            raise ReplicationError(
                f"{exc}: the connection was lost (the server or the network stopped "
                f"answering for about {timeout:g}s, or closed it; the warnings above say "
                "which) and could not be made again. Check that the server is up and "
                "reachable, then run walex tail again; --timeout SECONDS waits longer "
                "on a slow network") from None
    except WalExError as exc:
        raise _fail(exc) from None
