"""Reads of an earlier run of a job, replayed where they went out (see :mod:`.watermarks`).

A run stopped before it marked its last chunks done (the process killed, the
standby lock lost) left in the progress store the ids of the reads it
emitted since (:class:`~walex.backfill.store.ReadIds`). The next run reads
the rows after the last chunk marked done again, keeps those still at the
version emitted (same key, same ``xmin``: identical rows) and hands them to
its window (:attr:`~walex.backfill.watermarks.Window.replay`), which sends
them just before their high watermark's transaction when the slot sends it
again, under their ids.

The slot may send that transaction as soon as the session starts, so the
reader must not pass it before the replay is ready: from the start of the
backfill task (and from a lost standby lock) until the task knows what to
replay, a :class:`Gate` stands in for the window and holds the stream's
batches (at most :data:`GATE_TIMEOUT` seconds: then the stream goes on, and
the rows are read anew instead, under new ids).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg
    from psycopg.adapt import AdaptersMap

    from ..relations import Table
    from .target import Target

__all__ = ["Gate", "GATE_TIMEOUT", "replay_reads"]

GATE_TIMEOUT = 10.0  # seconds the stream waits for the backfill task to know what to replay


class Gate:
    """Stands in for the window until the backfill task knows what to replay."""

    high_seen = False
    persisted = None

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.expired = False  # the stream went on without waiting any longer

    def message(self, fields: dict[str, Any]) -> None:
        """No watermark of a run is expected yet."""

    def give_up(self) -> None:
        pass

    def forget(self, end_lsn: int) -> None:
        pass

    async def wait(self) -> bool:
        """Whether the task opened the gate in time (False: the stream goes on)."""
        if self.opened.is_set():
            return True
        if self.expired:
            return False
        try:
            await asyncio.wait_for(self.opened.wait(), GATE_TIMEOUT)
            return True
        except TimeoutError:
            self.expired = True
            return False


async def replay_reads(
    conn: psycopg.AsyncConnection, target: Target, table: Table, adapters: AdaptersMap,
    where: str | None, after: list[str] | None, ids: dict[bytes, str], chunk_rows: int,
    chunk_bytes: int,
) -> dict[int, list[tuple[str, bytes, Any]]]:
    """The rows after ``after`` still at a version ``ids`` names, by the commit LSN of the
    high watermark they went out with, each as (id, version digest, event), in id order.

    Read in key order, chunk by chunk (each row is checked by its own version: the
    chunks need not share a snapshot), until every version was found or twice as many
    rows as ``ids`` holds, plus a chunk, were read (the others changed or are gone)."""
    from .chunks import Limit, read_chunk

    want = dict(ids)
    found: dict[int, list[tuple[str, bytes, Any]]] = {}
    most = 2 * len(want) + chunk_rows
    seen = 0
    while want and seen < most:
        chunk = await read_chunk(conn, target, table, adapters, where, after,
                                 Limit(min(chunk_rows, most - seen), chunk_bytes))
        if chunk.reshaped or not chunk.rows:
            break
        seen += chunk.rows
        for index in range(chunk.rows):
            digest = chunk.versions[index]
            rid = want.pop(digest, None)
            if rid is not None:
                found.setdefault(int(rid[:16], 16), []).append(
                    (rid, digest, chunk.events[index]))
        if not chunk.more:
            break
        after = chunk.last_key
    for entries in found.values():
        entries.sort(key=lambda entry: entry[0])
    return found
