"""``walex status``: readiness, every slot's client, lag and WAL status; for people and scripts.

It only reads. Text by default, ``--json`` for scripts, ``--watch`` for a
live table refreshed every few seconds with a sparkline of each slot's lag
(when stdout is not a terminal, each refresh is printed after the last).
``--slot`` limits the slot checks to one slot; ``--max-lag 1GiB`` makes a
slot whose lag is over that size fail the check. Without a publication
(no ``-p``, ``WALEX_PUBLICATION`` or ``publication`` in the file) it reports
the server, its settings and every slot, and checks no publication.

Exit codes, for a health check: 0 fine; 1 PostgreSQL is not set up for walex
(a problem with its fix is printed); 2 a slot was invalidated
(``wal_status = 'lost'``), is about to be (``'unreserved'``) or is over
``--max-lag``; 3 the server could not be
checked (unreachable, refused, the connection lost, a privilege missing, no
answer within ``--timeout``), with the reason. With ``--watch`` the code of
the last check.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from . import failpoints
from .admin import Status, check_slot_name, human_size, name_encoding_problem
from .cli_admin import (
    QUERY_TIMEOUT, ConfigOption, PublicationOption, TimeoutOption, UrlOption, _connect, _fail,
    _settings, deadline, finite,
)
from .cli_console import console, escape
from .errors import ConfigError, SetupError, WalExError, redact

if TYPE_CHECKING:  # the settings (pydantic), psycopg and the backfill store are imported by
    # the commands that use them: `walex worker` and `walex --help` load none of them
    from rich.table import Table

    from .backfill.store import Job
    from .config import WalExSettings

__all__ = ["status", "sparkline", "slot_alerts"]

out = console()

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    """A one-line plot of ``values`` (lowest to highest as ▁ to █)."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    if span == 0:
        return _BARS[0 if high == 0 else 3] * len(values)
    return "".join(_BARS[min(7, (v - low) * 8 // span)] for v in values)


def _max_lag(value: str | None) -> int | None:
    if value is None:
        return None
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError:
        raise ConfigError(
            f"--max-lag must be a size such as 500MB, 1GiB or 1048576, got {value!r}"
        ) from None


def slot_alerts(report: Status, slot: str | None, max_lag: int | None) -> list[str]:
    """Why the slots fail the health check: invalidated, over the lag limit, missing."""
    alerts = []
    slots = [s for s in report.slots if slot is None or s["slot"] == slot]
    if slot is not None and not slots:
        alerts.append(
            f"slot {slot!r} is {report.slot_elsewhere}, not a logical slot of database "
            f"{report.database!r}: walex status checks only those (connect to the slot's "
            "database to check a logical slot)" if report.slot_elsewhere else
            f"slot {slot!r} does not exist in database {report.database!r}")
    for s in slots:
        if s["wal_status"] == "lost":
            alerts.append(f"slot {s['slot']!r} was invalidated (wal_status = 'lost')")
        elif s["wal_status"] == "unreserved":
            alerts.append(f"slot {s['slot']!r} is about to be invalidated (wal_status = "
                          "'unreserved': its WAL goes at the next checkpoint)")
        elif max_lag is not None and (s["lag_bytes"] or 0) > max_lag:
            alerts.append(f"slot {s['slot']!r} lags {human_size(s['lag_bytes'])}, over "
                          f"--max-lag {human_size(max_lag)}")
    return alerts


def _status_settings(
    url: str | None, publication: str | None, config: Path | None
) -> tuple[WalExSettings, str | None]:
    """The settings and the publication to check (None when none is configured anywhere)."""
    from .config import read_toml

    given = publication is not None or any(k.upper() == "WALEX_PUBLICATION" for k in os.environ) \
        or (config is not None and "publication" in read_toml(config))
    if given:
        settings = _settings(url, publication, config)
        return settings, settings.publication
    return _settings(url, "-", config), None  # a placeholder the report never uses


def _check(settings: WalExSettings, publication: str | None, timeout: float = QUERY_TIMEOUT,
           slot: str | None = None) -> tuple[Status, list[Job]]:
    """The server's state and the backfills recorded in the progress store.

    Anything that stops the check (the server unreachable or not answering, the
    connection lost, a privilege missing) is a SetupError saying why.
    """
    import psycopg

    from .admin import inspect_database
    from .backfill.store import read_all as read_backfills

    if failpoints.ACTIVE:
        failpoints.hit("status_check")
    with _connect(settings, timeout) as conn:
        try:
            with deadline(conn, settings, timeout, "reading the server's state"):
                report = inspect_database(conn, publication, slot)
                return report, read_backfills(conn, settings.backfill_table) or []
        except psycopg.Error as exc:
            encoding = name_encoding_problem(conn, exc) if not conn.closed else None
            if encoding is not None:
                raise SetupError(f"cannot read {settings.display_target()}: {encoding[0]}; "
                                 f"fix: {encoding[1]}") from None
            message = redact(str(exc).strip(), settings.secret()) or type(exc).__name__
            raise SetupError(f"could not read the state of {settings.display_target()}: "
                             f"{message}") from None


def status(
    url: UrlOption = None,
    publication: PublicationOption = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    watch: Annotated[Optional[float], typer.Option(  # noqa: UP007
        "--watch", metavar="SECONDS", help="Refresh a live table every SECONDS (Ctrl-C ends).",
        show_default=False, callback=finite)] = None,
    slot: Annotated[Optional[str], typer.Option(  # noqa: UP007
        "--slot", help="Check only this slot (exit 2 when it is lost, missing or over --max-lag).",
        show_default=False)] = None,
    max_lag: Annotated[Optional[str], typer.Option(  # noqa: UP007
        "--max-lag", metavar="SIZE", help="Exit 2 when a slot lags more than SIZE (500MB, 1GiB).",
        show_default=False)] = None,
    timeout: TimeoutOption = QUERY_TIMEOUT,
) -> None:
    """Report whether PostgreSQL is ready for walex, and every slot's client and lag."""
    try:
        if slot is not None:  # compared whole, not cut to 63 bytes like a name in a query
            check_slot_name(slot, "--slot")
        settings, pub = _status_settings(url, publication, config)
        limit = _max_lag(max_lag)
        if watch is not None and watch <= 0:
            raise ConfigError(f"--watch takes a number of seconds above 0, got {watch:g}")
    except WalExError as exc:
        raise _fail(exc) from None
    if watch is not None:
        raise typer.Exit(_watch(settings, pub, watch, slot, limit, timeout))
    try:
        report, backfills = _check(settings, pub, timeout, slot)
    except SetupError as exc:
        if as_json:
            print(json.dumps({"exit_code": 3, "error": f"could not check: {exc}"}))
        console(stderr=True).print(f"[bold red]walex:[/] could not check: {escape(str(exc))}",
                                   soft_wrap=True)
        raise typer.Exit(3) from None
    except WalExError as exc:
        raise _fail(exc) from None
    alerts = slot_alerts(report, slot, limit)
    code = 2 if alerts else 0 if report.ok else 1
    if as_json:
        data = report.to_dict()
        data.update(alerts=alerts, max_lag_bytes=limit, exit_code=code,
                    backfills=[{name: getattr(job, name) for name in job.__dataclass_fields__}
                               for job in backfills])
        print(json.dumps(data, indent=2, default=str))
        raise typer.Exit(code)
    _print(report, alerts, backfills)
    raise typer.Exit(code)


def _slot_table(report: Status, history: dict[str, deque[int]] | None = None) -> Table:
    from rich.table import Table

    columns = ["slot", "active (pid)", "client", "confirmed flush", "lag", "WAL held", "wal status",
               "safe WAL"]
    if history is not None:
        columns.append("lag history")
    table = Table(*columns, title="slots")
    for s in report.slots:
        row = [
            escape(s["slot"]) + (" (temporary)" if s["temporary"] else ""),
            f"yes ({s['pid']})" if s["active"] else "no", escape(s["client"] or "-"),
            s["confirmed_flush_lsn"] or "-", s["lag"] or "-", s["retained"] or "-",
            s["wal_status"] or "-",
            human_size(s["safe_wal_size"]) or "-",
        ]
        if history is not None:
            row.append(sparkline(list(history.get(s["slot"], ()))))
        table.add_row(*row)
    return table


def _print(report: Status, alerts: list[str], backfills: list[Job]) -> None:
    out.print(f"PostgreSQL {report.server_version}, database [bold]{escape(report.database)}[/], "
              f"wal_level [bold]{report.wal_level}[/]")
    out.print("  " + ", ".join(f"{k}={v}" for k, v in report.settings.items()), soft_wrap=True)
    if report.publication_exists:
        from rich.table import Table

        tables = Table("table", "replica identity", title=f"publication {escape(report.publication)}")
        for t in report.tables:
            tables.add_row(escape(f"{t['schema']}.{t['table']}"), t["replica_identity"])
        out.print(tables)
    if report.slots:
        out.print(_slot_table(report))
    if backfills:
        from .backfill.report import status_table as backfill_table

        out.print(backfill_table(backfills))
    for problem in report.problems:  # unwrapped: the fix is SQL to copy whole
        mark = "[bold red]problem[/]" if problem.fatal else "[yellow]warning[/]"
        out.print(f"{mark}: {escape(problem.what)}\n  fix: {escape(problem.fix)}", soft_wrap=True)
    for alert in alerts:
        out.print(f"[bold red]alert[/]: {escape(alert)}", soft_wrap=True)
    if report.ok and not alerts:
        out.print("[bold green]ready:[/] walex can stream this publication" if report.publication
                  else "[bold green]ok:[/] no publication checked (give -p to check one)")


def _watch(settings: WalExSettings, publication: str | None, every: float, slot: str | None,
           limit: int | None, timeout: float) -> int:
    from rich.console import Group
    from rich.live import Live

    history: dict[str, deque[int]] = {}
    code = 0

    def frame() -> Any:
        nonlocal code
        try:
            report, backfills = _check(settings, publication, timeout, slot)
        except WalExError as exc:
            code = 3
            return f"[bold red]{time.strftime('%H:%M:%S')} could not check:[/] {escape(str(exc))}"
        for s in report.slots:
            history.setdefault(s["slot"], deque(maxlen=40)).append(s["lag_bytes"] or 0)
        alerts = slot_alerts(report, slot, limit)
        code = 2 if alerts else 0 if report.ok else 1
        lines = [f"{time.strftime('%H:%M:%S')}  PostgreSQL {report.server_version}, database "
                 f"{escape(report.database)}, wal_level {report.wal_level}; every {every:g}s, "
                 "Ctrl-C ends"]
        lines += [f"[bold red]alert[/]: {escape(a)}" for a in alerts]
        lines += [f"[{'bold red' if p.fatal else 'yellow'}]{'problem' if p.fatal else 'warning'}"
                  f"[/]: {escape(p.what)}" for p in report.problems]
        tables = [_slot_table(report, history)]
        if backfills:
            from .backfill.report import status_table as backfill_table

            tables.append(backfill_table(backfills))
        return Group(*tables, *lines)

    # Ctrl-C ends the watch even when it comes while a check runs and something in there
    # catches the KeyboardInterrupt (or turns it into an error): the loop ends on the flag
    stopped = False

    def interrupted(signum: int, frame_: Any) -> None:
        nonlocal stopped
        stopped = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        if not out.is_terminal:  # a pipe or a file: each refresh after the last, as it comes
            while not stopped:
                shown = frame()
                if stopped:
                    break
                out.print(shown)
                out.file.flush()
                time.sleep(every)
        else:
            with Live(frame(), console=out.console, auto_refresh=False,
                      screen=False, transient=False) as live:
                while not stopped:
                    time.sleep(every)
                    shown = frame()
                    if not stopped:
                        live.update(shown, refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if not sys.stdout.isatty():
        out.print()
    return code
