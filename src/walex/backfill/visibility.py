"""Waiting until commits the stream may already have sent are visible to snapshots.

A commit can reach the stream before snapshots show it: its commit record is
flushed (so logical decoding sends it) while the committing session still waits,
invisible, for a synchronous standby (``synchronous_commit`` ``on`` or
``remote_apply``). A backfill's window records the keys of what the stream passes
from its opening on; what it passed before is unknown to it, so no chunk may be
read in a snapshot that does not show it (:func:`settle`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

__all__ = ["settle"]

log = logging.getLogger("walex.backfill")

# transactions a snapshot taken now does not show whose commit record is written: their
# sessions wait for a synchronous standby (pg_xact_status still says "in progress")
_SYNC_REP = "array(SELECT backend_xid FROM pg_stat_activity WHERE wait_event = 'SyncRep')"
_COMMITTED_INVISIBLE = (
    "SELECT array(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x "
    f"WHERE xid(x) = ANY({_SYNC_REP})), "
    "current_setting('synchronous_standby_names') <> '' "
    "AND NOT pg_has_role('pg_read_all_stats', 'USAGE')"
)
_STILL_INVISIBLE = (
    "SELECT array(SELECT x::text FROM unnest(%s::xid8[]) x "
    f"WHERE NOT pg_visible_in_snapshot(x, pg_current_snapshot()) AND xid(x) = ANY({_SYNC_REP}))"
)


async def settle(
    conn: psycopg.AsyncConnection, app: str, table: str,
    wanted: Callable[[], Awaitable[bool]], waiting: Callable[[list[int]], None],
) -> bool:
    """Wait until every transaction committed now is visible; False when ``wanted()``
    said no meanwhile (the job was cancelled). ``waiting`` is told the transactions
    waited for (``[]`` at the end).

    Such a transaction is listed as running by a snapshot taken now while its session
    waits for the standby (wait event ``SyncRep``, seen in ``pg_stat_activity``;
    another role's sessions need ``pg_read_all_stats``). A transaction of this session
    is committed first, so that every earlier transaction id is below the snapshot's
    ``xmax`` (and so in its list of running ones when it is not visible). The wait
    ends when the standby confirms, when the session stops waiting (cancelled: its
    commit then becomes visible), or for a ``PREPARE TRANSACTION`` (nothing the stream
    sent) once it is prepared.
    """
    await conn.execute("SELECT pg_current_xact_id()")
    cur = await conn.execute(_COMMITTED_INVISIBLE)
    row = await cur.fetchone()
    pending: list[str] = list(row[0]) if row and row[0] else []
    if row and row[1]:
        log.warning("walex %r: synchronous replication is on, but walex's role cannot see "
                    "other roles' wait events: a backfill of %s may not see that a commit "
                    "the stream already sent waits for a standby (and deliver an older read "
                    "of its rows). Fix: GRANT pg_read_all_stats TO the role", app, table)
    waited, delay, warn_at = 0.0, 0.01, 60.0
    try:
        while pending:
            waiting([int(x) for x in pending])
            if waited >= warn_at:
                warn_at += 60
                log.warning("walex %r: the backfill of %s has waited %.0fs for transaction(s) "
                            "%s, committed but not yet visible (a synchronous standby that "
                            "does not confirm?), to become visible", app, table, waited,
                            ", ".join(pending))
            await asyncio.sleep(delay)
            waited += delay
            delay = min(1.0, delay * 2)
            if not await wanted():
                return False
            cur = await conn.execute(_STILL_INVISIBLE, (pending,))
            row = await cur.fetchone()
            pending = list(row[0]) if row and row[0] else []
    finally:
        waiting([])
    return True
