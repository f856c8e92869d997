"""What becomes of a slot, said so that an operator can act on it.

PostgreSQL names the server process (the walsender) that holds a slot, not the
consumer it serves; :func:`slot_in_use` turns that into a message with the
consumer's address and ``application_name`` and the query to look it up.
:func:`temporary_gap` says which changes a temporary slot lost with its
session (a lost connection, or the lag guard's release).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .lsn import format_lsn

if TYPE_CHECKING:
    from .lookups import LookupConnection
    from .pipeline import Pipeline

__all__ = ["slot_in_use", "temporary_gap"]

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
        "are never delivered (use durable_slot=True to avoid this)"
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
