"""What becomes of a slot, said so that an operator can act on it.

PostgreSQL names the server process (the walsender) that holds a slot, not the
consumer it serves; :func:`slot_in_use` turns that into a message with the
consumer's address and ``application_name`` and the query to look it up.
:func:`temporary_gap` says which changes a temporary slot lost with its
session (a lost connection, or the lag guard's release).
:func:`slot_create_blocked` says which transactions kept a slot's creation
waiting past ``slot_create_timeout``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .lsn import format_lsn

if TYPE_CHECKING:
    from .lookups import LookupConnection
    from .pipeline import Pipeline

__all__ = ["slot_create_blocked", "slot_in_use", "temporary_gap"]

log = logging.getLogger("walex")


def temporary_gap(pipeline: Pipeline, after: int, until: int) -> None:
    """The temporary slot went with the last session: log and record what is lost.

    ``after`` is the position acknowledged once every batch received whole was
    handled; ``until`` is where the new slot starts. The message logged is the
    one recorded in :attr:`Pipeline.gaps`.
    """
    why = "was dropped with the lost connection"
    if pipeline.released is not None:
        lag, limit = pipeline.released
        why = (f"was released by the lag guard ({lag} bytes sent to walex and not "
               f"acknowledged, over max_lag_bytes {limit})")
        pipeline.released = None
    gap = (
        f"temporary slot {pipeline.slot_name!r} {why}: the changes committed after "
        f"{format_lsn(after)} and before {format_lsn(until)} (where the new slot starts) "
        f"are never delivered. {pipeline.gap_advice}"
    )
    log.error(gap)
    pipeline.gaps.append(gap)


async def slot_in_use(lookups: LookupConnection, slot_name: str, waited: float) -> str:
    """Why the slot cannot be had: the process holding it, and how to find its client."""
    rows = await lookups.fetch(
        "SELECT s.active_pid, a.backend_type, a.client_addr::text, a.client_port, "
        "a.application_name FROM pg_replication_slots s "
        "LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s",
        (slot_name,),
    )
    row = rows[0] if rows else None
    pid, kind, addr, port, app_name = row if row else (None, None, None, None, None)
    if pid is None:
        return (
            f"replication slot {slot_name!r} was in use by another consumer for "
            f"{waited:g}s (it was released just now). Fix: stop the other consumer (only one "
            "process can stream from a slot), or give this app another slot_name."
        )
    view = "pg_stat_activity" if kind not in (None, "walsender") else "pg_stat_replication"
    if kind == "walsender":
        holder = "the walsender streaming it to another consumer"
    elif kind is None:
        holder = "the server process serving another consumer of it"
    else:
        holder = f"a {kind} session reading it (pg_logical_slot_get_changes or the like)"
    return (
        f"replication slot {slot_name!r} is in use by PostgreSQL process {pid}, {holder} "
        f"({_client(addr, port, app_name)}), and stayed so for {waited:g}s. That pid is the "
        "server's process, not the consumer's: find the consumer with SELECT "
        f"application_name, client_addr, client_port FROM {view} WHERE pid = {pid}; "
        "(a walex app's application_name is its name). Fix: stop the other consumer (only "
        "one process can stream from a slot), or give this app another slot_name."
    )


def _client(addr: str | None, port: int | None, app_name: str | None) -> str:
    where = "a local socket" if addr is None and port == -1 else (
        f"{addr}:{port}" if addr is not None else "an address hidden from this role"
    )
    return f"client {where}, application_name {app_name!r}" if app_name else f"client {where}"


async def slot_create_blocked(lookups: LookupConnection, slot_name: str, waited: float) -> str:
    """Why CREATE_REPLICATION_SLOT did not finish: the open transactions it waits for.

    PostgreSQL starts a slot's stream at a consistent point: once every
    transaction that had written when the creation began has ended. The
    creation was cancelled on the server; whether the slot remains is said.
    """
    rows = await lookups.fetch(
        "SELECT pid, application_name, usename, state, "
        "extract(epoch FROM now() - xact_start)::int FROM pg_stat_activity "
        "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
        "ORDER BY xact_start LIMIT 3", (),
    )
    prepared = await lookups.fetch(
        "SELECT gid, extract(epoch FROM now() - prepared)::int FROM pg_prepared_xacts "
        "ORDER BY prepared LIMIT 3", (),
    )
    left = await lookups.fetch(
        "SELECT temporary, active_pid FROM pg_replication_slots WHERE slot_name = %s",
        (slot_name,),
    )
    holders = [
        f"pid {pid} (application_name {app!r}, user {user!r}, {state}, transaction open "
        f"for {age}s)" for pid, app, user, state, age in rows
    ] + [f"prepared transaction {gid!r} (prepared {age}s ago)" for gid, age in prepared]
    if holders:
        what = ("it waits for the transactions that had written when it began to end; "
                f"the oldest open: {'; '.join(holders)}")
        fix = (f"end it (commit or roll back; SELECT pg_terminate_backend({rows[0][0]}) ends "
               "its session)" if rows else "COMMIT PREPARED or ROLLBACK PREPARED it")
    else:
        what = ("it waited for the transactions that had written when it began to end "
                "(none is open now)")
        fix = "start walex again"
    remains = ("no slot was left behind" if not left else
               f"slot {slot_name!r} remains ({'temporary' if left[0][0] else 'durable'}, "
               f"held by pid {left[0][1]}); it goes when that process ends, or drop it with "
               f"SELECT pg_drop_replication_slot('{slot_name}')")
    return (
        f"creating replication slot {slot_name!r} did not finish within {waited:g}s "
        f"(slot_create_timeout), so it was cancelled ({remains}): PostgreSQL starts a slot "
        f"at a consistent point, and {what}. Fix: {fix}, then start walex again; or raise "
        "slot_create_timeout to wait longer."
    )
