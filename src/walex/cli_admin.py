"""The operator's commands' common options and ``walex drop-slot``.

Every command takes the connection and publication like ``walex run``:
``--url`` / ``--publication`` (or ``WALEX_URL`` / ``WALEX_PUBLICATION`` and
the other ``WALEX_*`` variables), or ``--config walex.toml``. ``status``
(:mod:`walex.cli_status`) only reads; ``setup`` (:mod:`walex.cli_setup`)
checks, then changes only what is missing; ``tail`` (:mod:`walex.cli_tail`)
prints the changes of a publication as they are committed, on a temporary
slot (so it leaves nothing behind), until Ctrl-C; ``drop-slot`` drops a slot that is not in use, after
saying how much WAL it holds and asking.

Every query has a timeout (``--timeout``, 30 s by default): the session's
``statement_timeout`` is set to it (unless a lower one is set already, e.g.
in ``PGOPTIONS``), and :func:`deadline` gives up on the client side a little
later, for a network that goes silent without closing the connection.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .admin import WAL_NOW, check_slot_name, human_size
from .cli_console import console, escape
from .errors import SetupError, WalExError, redact

if TYPE_CHECKING:  # the settings (pydantic) and psycopg are imported by the commands that use them
    import psycopg

    from .config import WalExSettings

out = console()

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
QUERY_TIMEOUT = 30.0  # seconds, the default of --timeout


def finite(value: float | None) -> float | None:
    """A typer callback: 'nan' and 'inf' are floats, not a number of seconds."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a number of seconds, got {value}")
    return value


def _timeout(value: float) -> float:
    if not math.isfinite(value) or not 1 <= value <= 86400:  # statement_timeout: an int of ms
        raise typer.BadParameter(f"must be from 1 to 86400 seconds, got {value:g}")
    return value


TimeoutOption = Annotated[float, typer.Option(
    "--timeout", metavar="SECONDS", callback=_timeout,
    help="Give up on a query after SECONDS (statement_timeout; a silent network too).")]
_MARGIN = 5.0  # the client gives up this long after the server's statement_timeout would


_HINTS = {"publication": "-p/--publication"}  # how a missing option is given here


def _settings(url: str | None, publication: str | None, config: Path | None) -> WalExSettings:
    from .config import file_values, load_settings, read_toml

    options = {k: v for k, v in (("url", url), ("publication", publication)) if v is not None}
    if config is not None:
        with file_values(read_toml(config)):
            return load_settings(hints=_HINTS, **options)
    return load_settings(hints=_HINTS, **options)


def _connect(settings: WalExSettings, timeout: float = QUERY_TIMEOUT) -> psycopg.Connection:
    """An autocommit connection whose statements time out after ``timeout`` seconds."""
    import psycopg

    try:
        conn = psycopg.connect(settings.conninfo(), autocommit=True,
                               connect_timeout=max(2, min(10, round(timeout))))
    except psycopg.Error as exc:
        raise SetupError(
            f"cannot connect to {settings.display_target()}: {redact(str(exc), settings.secret())}"
        ) from None
    ms = int(timeout * 1000)
    try:
        with deadline(conn, settings, timeout, "setting statement_timeout"):
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false) FROM pg_settings "
                "WHERE name = 'statement_timeout' AND (setting::bigint = 0 OR setting::bigint > %s)",
                (f"{ms}ms", ms))
    except psycopg.Error as exc:
        conn.close()
        raise SetupError(f"cannot use {settings.display_target()}: "
                         f"{redact(str(exc).strip(), settings.secret())}") from None
    except BaseException:
        conn.close()
        raise
    return conn


class _Expired(BaseException):
    """The client-side deadline passed (raised by SIGALRM inside a query's wait)."""


@contextmanager
def deadline(conn: psycopg.Connection, settings: WalExSettings, timeout: float,
             what: str) -> Iterator[None]:
    """A SetupError when the block still waits for the server ``timeout`` (+5) seconds on.

    The server's ``statement_timeout`` ends slow statements; this ends the wait
    for an answer that never comes (a network that drops packets without closing
    the connection). The connection is closed when it fires. Main thread only
    (SIGALRM); elsewhere the block runs without it. Not nested: one at a time.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    seconds = timeout + _MARGIN

    def expire(signum: int, frame: Any) -> None:
        conn.pgconn.finish()  # the wait is abandoned: nothing may use the connection again
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise SetupError(
            f"no answer from {settings.display_target()} in {seconds:g}s while {what}: the "
            "network or the server is not answering (a firewall dropping packets, a paused "
            "server?); check the connection, or raise --timeout") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fail(exc: Exception) -> typer.Exit:
    console(stderr=True).print(f"[bold red]walex:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(1)


def _confirm(question: str) -> bool:
    """The answer to ``question``; no answer (stdin closed, Ctrl-C) is a SetupError."""
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:
        out.print()
        raise SetupError("not dropped: no answer to the question (stdin closed or "
                         "interrupted); give --yes to drop it without asking") from None


def drop_slot(
    name: Annotated[str, typer.Argument(help="The replication slot to drop.")],
    url: UrlOption = None,
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    timeout: TimeoutOption = QUERY_TIMEOUT,
) -> None:
    """Drop a replication slot that no process uses, freeing the WAL it holds (asks first)."""
    import psycopg

    try:
        check_slot_name(name)
        settings = _settings(url, "_", config)  # no publication involved
        with _connect(settings, timeout) as conn:
            with deadline(conn, settings, timeout, "reading the slot"):
                wal_status = "wal_status" if conn.info.server_version >= 130000 else "NULL"
                row = conn.execute(
                    "SELECT database, slot_type, active_pid, temporary, confirmed_flush_lsn::text, "
                    f"{wal_status}, CASE WHEN {wal_status} IS DISTINCT FROM 'lost' THEN "
                    f"pg_wal_lsn_diff({WAL_NOW}, restart_lsn)::bigint END "
                    "FROM pg_replication_slots WHERE slot_name = %s",
                    (name,)).fetchone()
            if row is None:
                raise SetupError(f"replication slot {name!r} does not exist on "
                                 f"{settings.display_target()}")
            database, kind, pid, temporary, confirmed, slot_wal_status, held = row
            lost = slot_wal_status == "lost"
            if pid is not None:
                raise SetupError(
                    f"replication slot {name!r} is in use by server process {pid}: stop its "
                    "consumer first (only a slot nobody streams from can be dropped)")
            where = f", database {escape(str(database))}" if database is not None else ""
            what = f"slot [bold]{escape(name)}[/] ({kind}{', temporary' if temporary else ''}{where})"
            if lost:  # invalidated: PostgreSQL keeps no WAL for it, its position is gone already
                out.print(f"{what} was invalidated (wal_status 'lost'): it holds no WAL, and "
                          f"the changes after {confirmed or 'its position'} are gone already; "
                          "dropping it loses nothing more")
            else:  # the WAL kept for it is counted from restart_lsn (where decoding restarts)
                out.print(f"{what} holds {human_size(held) or 'no'} WAL; "
                          f"confirmed up to {confirmed or '-'}")
            if not yes and not _confirm(
                "Drop it?" if lost else
                f"Drop it? Its consumer loses its position: changes after {confirmed or 'it'} "
                "are never delivered to it"):
                out.print("not dropped")
                raise typer.Exit(1)
            try:
                with deadline(conn, settings, timeout, "dropping the slot"):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            except SetupError as exc:  # no answer: the server may have dropped it or not
                raise SetupError(
                    f"{exc}. Whether slot {name!r} was dropped is unknown: see walex status "
                    "(or SELECT slot_name FROM pg_replication_slots;)") from None
            except psycopg.errors.ObjectInUse as exc:
                raise SetupError(
                    f"cannot drop slot {name!r}: a consumer started streaming from it after it "
                    f"was read ({redact(str(exc).strip(), settings.secret())}); stop that "
                    "consumer first, then run walex drop-slot again") from None
            except psycopg.Error as exc:
                raise SetupError(f"cannot drop slot {name!r}: "
                                 f"{redact(str(exc).strip(), settings.secret())}") from None
    except WalExError as exc:
        raise _fail(exc) from None
    out.print(f"dropped replication slot {escape(name)}")
