"""``walex setup``: check first, print what was found, then create only what is missing.

Every prerequisite is checked before anything changes (:mod:`walex.diagnosis`);
one table lists the findings with the exact fix for each. When a prerequisite
fails nothing is applied. Otherwise walex creates the publication or adds the
missing tables to it, and on request sets ``REPLICA IDENTITY FULL``, creates
a durable slot, or runs ``ALTER SYSTEM SET wal_level`` (then nothing else, as
a restart comes first). ``--dry-run`` prints the SQL instead of running it;
``--json`` prints one JSON object.

Exit codes: 0 ready (after what was applied), 1 a problem someone must fix
(nothing applied), 3 a prerequisite could not be checked, the server not
reachable included (nothing applied).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import psycopg
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_admin import ConfigOption, PublicationOption, UrlOption, _connect, _fail, _settings
from .diagnosis import FIX, OK, PROBLEM, UNKNOWN, WARNING, Plan, apply_plan, diagnose
from .errors import SetupError, WalExError, redact

__all__ = ["setup"]

_STYLE = {OK: "green", FIX: "cyan", WARNING: "yellow", PROBLEM: "bold red", UNKNOWN: "magenta"}
_LABEL = {OK: "ok", FIX: "will fix", WARNING: "warning", PROBLEM: "problem", UNKNOWN: "unknown"}


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
) -> None:
    """Check PostgreSQL for walex, then create what is missing (nothing if a check fails)."""
    try:
        settings = _settings(url, publication, config)
    except WalExError as exc:
        raise _fail(exc) from None
    tables = table or settings.subscriptions
    try:
        conn = _connect(settings)
    except SetupError as exc:
        if as_json:
            print(json.dumps({"publication": settings.publication, "exit_code": 3,
                              "error": f"could not check: {exc}"}))
        Console(stderr=True).print(f"[bold red]walex:[/] could not check: {escape(str(exc))}",
                                   soft_wrap=True)
        raise typer.Exit(3) from None
    applied: list[str] = []
    with conn:
        try:
            plan = diagnose(conn, settings.publication, tables,
                            replica_identity_full=replica_identity_full, slot=slot,
                            wal_level=wal_level)
            if not dry_run:
                applied = apply_plan(conn, plan)
        except psycopg.Error as exc:
            message = redact(str(exc).strip(), settings.secret())
            raise _fail(SetupError(
                f"setup failed, nothing was changed by the failing step: {message}")) from None
    code = _exit_code(plan, applied)
    if as_json:
        result = plan.to_dict()
        result.update(target=settings.display_target(), dry_run=dry_run, applied=applied,
                      exit_code=code)
        print(json.dumps(result, indent=2))
        raise typer.Exit(code)
    _print(plan, applied, dry_run, settings.display_target())
    raise typer.Exit(code)


def _exit_code(plan: Plan, applied: list[str]) -> int:
    if any(a.phase == "system" for a in plan.runnable()) and (applied or plan.blocked):
        return 1  # wal_level changed (or to be): not ready until the restart
    return plan.exit_code


def _print(plan: Plan, applied: list[str], dry_run: bool, target: str) -> None:
    # the whole width the table needs when piped: a fix is SQL to copy, never wrapped
    out = Console(width=None if sys.stdout.isatty() else 10_000)
    table = Table("check", "status", "finding", "fix",
                  title=f"walex setup: publication {plan.publication} on {target}")
    for f in plan.findings:
        table.add_row(escape(f.check), f"[{_STYLE[f.status]}]{_LABEL[f.status]}[/]",
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
    if plan.blocked and not any(a.phase == "system" for a in runnable):
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
