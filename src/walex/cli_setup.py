"""``walex setup``: check first, print what was found, then create only what is missing.

Every prerequisite is checked before anything changes (:mod:`walex.diagnosis`);
one table lists the findings with the exact fix for each. When a prerequisite
fails nothing is applied. Otherwise walex creates the publication or adds the
missing tables to it, and on request sets ``REPLICA IDENTITY FULL``, creates
a durable slot, or runs ``ALTER SYSTEM SET wal_level`` (then nothing else, as
a restart comes first). ``--dry-run`` prints the SQL instead of running it;
``--json`` prints one JSON object, with the same keys in every outcome
(``error`` and ``failed`` are null unless something failed).

Exit codes: 0 ready (after what was applied), 1 a problem someone must fix
(nothing applied), a configuration error, or a step that failed while
applying (what ran before it is reported as applied, and stays), 3 a
prerequisite could not be checked, the server not reachable or not
answering within ``--timeout`` included (nothing applied).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .admin import check_slot_name
from .cli_admin import (
    QUERY_TIMEOUT, ConfigOption, PublicationOption, TimeoutOption, UrlOption, _connect, _settings,
    deadline,
)
from .cli_console import console, escape
from .errors import SetupError, WalExError, redact

if TYPE_CHECKING:  # psycopg and the checks (walex.diagnosis) are imported when setup runs:
    # `walex worker` and `walex --help` load neither
    from .diagnosis import Action, Plan

__all__ = ["setup"]


def setup(
    url: UrlOption = None,
    publication: PublicationOption = None,
    config: ConfigOption = None,
    table: Annotated[list[str], typer.Option(
        "--table", "-t", metavar="TABLE",
        help="Tables to publish: creates the publication FOR these tables, or adds those "
             "missing to it (default: the subscriptions; '*' is FOR ALL TABLES).")] = [],  # noqa: B006
    replica_identity_full: Annotated[bool, typer.Option(
        "--replica-identity-full",
        help="Set REPLICA IDENTITY FULL on the tables (old values, Event.changes).")] = False,
    slot: Annotated[Optional[str], typer.Option(help="Create this durable slot.")] = None,  # noqa: UP007
    wal_level: Annotated[bool, typer.Option(
        "--wal-level", help="ALTER SYSTEM SET wal_level = 'logical' (then restart PostgreSQL).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the SQL setup would run; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    timeout: TimeoutOption = QUERY_TIMEOUT,
) -> None:
    """Check PostgreSQL for walex, then create what is missing (nothing if a check fails)."""
    import psycopg

    from .diagnosis import apply_plan, diagnose

    err = console(stderr=True)

    def stop(code: int, error: str, plan: Plan | None = None, applied: list[str] | None = None,
             failed: Action | None = None, target: str | None = None) -> typer.Exit:
        if as_json:
            print(json.dumps(_result(plan, publication, target, dry_run, code, applied or [],
                                     error, failed), indent=2))
        err.print(f"[bold red]walex:[/] {escape(error)}", soft_wrap=True)
        return typer.Exit(code)

    try:
        if slot is not None:  # before asking the server: it would cut a longer name to 63 bytes
            check_slot_name(slot, "--slot")
        settings = _settings(url, publication, config)
    except WalExError as exc:
        raise stop(1, str(exc)) from None
    publication, target = settings.publication, settings.display_target()
    tables = table or settings.subscriptions
    try:
        conn = _connect(settings, timeout)
    except SetupError as exc:
        raise stop(3, f"could not check: {exc}", target=target) from None
    applied: list[str] = []
    with conn:
        try:
            with deadline(conn, settings, timeout, "checking"):
                plan = diagnose(conn, settings.publication, tables,
                                replica_identity_full=replica_identity_full, slot=slot,
                                wal_level=wal_level)
        except (psycopg.Error, SetupError) as exc:
            message = redact(str(exc).strip(), settings.secret())
            raise stop(3, f"could not check: {message}; nothing was changed",
                       target=target) from None
        if not dry_run:
            steps = plan.runnable()
            try:  # each phase may take up to the timeout: the client-side limit covers them all
                with deadline(conn, settings, timeout * max(1, len({a.phase for a in steps})),
                              "applying"):
                    apply_plan(conn, plan, applied)
            except (psycopg.Error, SetupError) as exc:
                failed = next((a for a in steps if a.done not in applied), steps[-1])
                message = _failure(failed, exc, applied, settings.secret())
                if not as_json:
                    _print(plan, applied, dry_run, target, failed=True)
                raise stop(1, message, plan, applied, failed, target) from None
    code = _exit_code(plan, applied)
    if as_json:
        print(json.dumps(_result(plan, publication, target, dry_run, code, applied), indent=2))
        raise typer.Exit(code)
    _print(plan, applied, dry_run, target)
    raise typer.Exit(code)


def _result(plan: Plan | None, publication: str | None, target: str | None, dry_run: bool,
            code: int, applied: list[str], error: str | None = None,
            failed: Action | None = None) -> dict[str, Any]:
    """The --json object: the same keys whatever happened (None where nothing is known)."""
    result: dict[str, Any] = {
        "publication": publication, "platform": None, "exit_code": code, "blocked": False,
        "findings": [], "sql": [],
    }
    if plan is not None:
        result.update(plan.to_dict())
    result.update(target=target, dry_run=dry_run, applied=applied, exit_code=code,
                  failed=failed.sql if failed is not None else None, error=error)
    return result


def _failure(failed: Action, exc: BaseException, applied: list[str], secret: str | None) -> str:
    """What failed, why, and exactly what was applied before it (and stays)."""
    from psycopg.errors import QueryCanceled  # loaded already: setup connected

    why = redact(str(exc).strip(), secret) or type(exc).__name__
    if isinstance(exc, SetupError):  # no answer: the server may or may not have run it
        what = f"no answer while running {failed.sql}: {why}; whether it was applied is unknown"
    else:
        what = f"{failed.sql} failed: {why}"
        if failed.phase == "ddl":
            what += " (the publication and replica identity changes run in one transaction: " \
                    "none of them was applied)"
        if failed.phase == "slot" and isinstance(exc, QueryCanceled):
            what += (" (creating a slot waits for every transaction open when it starts: end "
                     "the long-running ones, see pg_stat_activity)")
    if applied:
        done = "Applied before it, and kept: " + "; ".join(applied)
    else:
        done = "Nothing was applied before it" if isinstance(exc, SetupError) else \
            "Nothing was changed"
    return f"setup failed: {what}. {done}. Run walex setup again once fixed: it skips what exists"


def _exit_code(plan: Plan, applied: list[str]) -> int:
    if any(a.phase == "system" for a in plan.runnable()) and (applied or plan.blocked):
        return 1  # wal_level changed (or to be): not ready until the restart
    return plan.exit_code


def _print(plan: Plan, applied: list[str], dry_run: bool, target: str,
           failed: bool = False) -> None:
    # the whole width the table needs when piped: a fix is SQL to copy, never wrapped
    from rich.console import Console
    from rich.table import Table

    out = Console(width=None if sys.stdout.isatty() else 10_000)
    table = Table("check", "status", "finding", "fix",
                  title=f"walex setup: publication {plan.publication} on {target}")
    from .diagnosis import FIX, OK, PROBLEM, UNKNOWN, WARNING

    style = {OK: "green", FIX: "cyan", WARNING: "yellow", PROBLEM: "bold red", UNKNOWN: "magenta"}
    label = {OK: "ok", FIX: "will fix", WARNING: "warning", PROBLEM: "problem", UNKNOWN: "unknown"}
    for f in plan.findings:
        table.add_row(escape(f.check), f"[{style[f.status]}]{label[f.status]}[/]",
                      escape(f.detail), escape(f.fix) if f.status != OK else "")
    out.print(table)
    runnable = plan.runnable()
    if dry_run:
        if runnable:
            out.print("would run:")
            for action in runnable:
                out.print(f"  {escape(action.sql)};", soft_wrap=True)
        else:
            out.print("would run: nothing")
    for line in applied:
        out.print(f"- {escape(line)}", soft_wrap=True)
    if failed:
        out.print("[bold red]setup failed[/] (why below); "
                  + ("what is listed above was applied" if applied else "nothing was changed"))
    elif plan.blocked and not any(a.phase == "system" for a in runnable):
        changes = "nothing was changed" if not dry_run else "nothing would be changed"
        if plan.exit_code == 3:
            out.print(f"[magenta]could not check everything:[/] {changes}; see 'unknown' above")
        else:
            out.print(f"[bold red]not ready:[/] {changes}; apply the fixes marked 'problem', "
                      "then run walex setup again")
    elif not plan.blocked and not dry_run:
        if not applied:
            out.print("nothing to do")
        out.print(f"[bold green]ready:[/] walex can stream publication {escape(plan.publication)}")
