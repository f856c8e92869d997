"""The monitor: polls the app's slot on a connection of its own; the lag guard.

Every ``status_interval`` seconds it reads the server's WAL end and the
slot's ``wal_status``, ``safe_wal_size`` and walsender, for the metrics and
``/healthz``, and measures the lag (:func:`~walex.observe.health.measure`):
the WAL sent to walex (or held back by it) a poll ago and still not
confirmed, never WAL the walsender skipped or has not reached (bulk loads
elsewhere, uncommitted transactions).
Beyond ``max_lag_bytes`` it logs a warning (once per crossing, and once when
back under) and ``/healthz`` turns 503; with ``max_lag_release`` (temporary
slots only) it also ends the slot's walsender, so PostgreSQL drops the slot
and frees its WAL rather than filling the disk: the changes that slot held
are never delivered, a gap the pipeline logs and records, with its two
positions, when it resumes on a new slot.

The monitor never raises into the app. Each poll has a deadline
(:data:`POLL_TIMEOUT`): a server that does not answer (a silent network
partition) counts as a lost connection, which is closed and opened again at
the next poll; a failed poll is logged (at warning level the first time, and
again once it works) and reported by ``/healthz``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..admin import WAL_NOW, human_size
from ..errors import ReplicationError
from ..lookups import LookupConnection
from .health import measure

if TYPE_CHECKING:
    from ..app import WalEx

__all__ = ["Monitor"]

log = logging.getLogger("walex")

POLL_TIMEOUT = 10.0  # seconds the server has to answer a poll


class Monitor:
    def __init__(self, app: WalEx) -> None:
        self.app = app
        s = app.settings
        self.sent_before: int | None = None  # the position sent to walex at the last poll
        self.conn = LookupConnection(s.app_conninfo(), s.secret(), attempts=2,
                                     timeout=POLL_TIMEOUT, purpose="the slot monitor")

    async def run(self) -> None:
        try:
            while True:
                await self.poll()
                await asyncio.sleep(self.app.settings.status_interval)
        finally:
            await self.conn.close()

    async def poll(self) -> None:
        app, stats = self.app, self.app.pipeline.stats
        stats.lag_bytes, self.sent_before = measure(app, self.sent_before)
        wal_status = "s.wal_status, s.safe_wal_size" if self._v13 else "NULL, NULL"
        try:
            async with asyncio.timeout(2 * POLL_TIMEOUT + 15):  # LookupConnection bounds each try
                rows = await self.conn.fetch(
                    f"SELECT pg_wal_lsn_diff({WAL_NOW}, '0/0')::bigint, s.active_pid, "
                    f"{wal_status} FROM (SELECT 1) one LEFT JOIN pg_replication_slots s "
                    "ON s.slot_name = %s", (app.slot_name,))
        except TimeoutError:
            await self.conn.close()
            self._failed("the server did not answer within the poll's deadline")
            return
        except (ReplicationError, OSError) as exc:
            self._failed(str(exc))
            return
        except Exception as exc:  # e.g. a server that refuses a function
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        end, pid, status, safe = rows[0]
        if stats.monitor_error is not None:
            log.info("walex %r: the slot monitor reaches the server again", app.settings.name)
        stats.monitor_error = None
        stats.server_wal_end = int(end)
        stats.slot_wal_status, stats.slot_safe_wal_size = status, safe
        self.guard(pid)

    def _failed(self, reason: str) -> None:
        """A poll failed: said once at warning level (then at debug), and kept for /healthz."""
        stats, name = self.app.pipeline.stats, self.app.settings.name
        (log.debug if stats.monitor_error is not None else log.warning)(
            "walex %r: slot monitor poll failed (%s); reconnecting at the next poll", name, reason)
        stats.monitor_error = reason

    @property
    def _v13(self) -> bool:
        conn = self.conn.conn
        return conn is None or conn.info.server_version >= 130000

    def guard(self, walsender: int | None) -> None:
        app, stats = self.app, self.app.pipeline.stats
        limit = app.settings.max_lag_bytes
        lag = stats.lag_bytes
        if limit is None or lag is None or stats.standby:
            stats.lagging = False
            return
        name, slot = app.settings.name, app.slot_name
        if lag <= limit:
            if stats.lagging:
                log.info("walex %r: slot %r lag is back under max_lag_bytes (%s)",
                         name, slot, human_size(lag))
            stats.lagging = False
            return
        if not stats.lagging:
            log.warning(
                "walex %r: slot %r lags %s, over max_lag_bytes (%s): PostgreSQL keeps that WAL "
                "until walex acknowledges it%s", name, slot, human_size(lag),
                human_size(int(limit)),
                "; releasing the temporary slot" if app.settings.max_lag_release else
                " (slow handlers? see walex_commit_to_handler_seconds)")
        stats.lagging = True
        if app.settings.max_lag_release and not app.settings.durable_slot:
            asyncio.get_running_loop().create_task(self.release(walsender, lag))

    async def release(self, walsender: int | None, lag: int) -> None:
        """End the temporary slot's walsender: PostgreSQL drops the slot and frees its WAL."""
        p = self.app.pipeline
        repl = p.repl
        ours = repl.pgconn.backend_pid if repl is not None and repl.streaming else None
        if walsender is None or walsender != ours:
            return  # already gone (a reconnect is under way)
        limit = int(self.app.settings.max_lag_bytes or 0)
        log.error(
            "walex %r: releasing temporary slot %r, %s sent to walex and not acknowledged "
            "(max_lag_bytes %s): its walsender is ended and PostgreSQL drops the slot. The "
            "transactions already received whole are still handled; the changes committed "
            "after them and before the new slot starts are never delivered: walex logs that "
            "range and records it in app.gaps when it resumes", self.app.settings.name,
            self.app.slot_name, human_size(lag), human_size(limit))
        p.released = (lag, limit)
        try:
            await self.conn.fetch("SELECT pg_terminate_backend(%s)", (walsender,))
        except Exception as exc:
            p.released = None
            log.error("walex %r: could not end the walsender of slot %r: %s",
                      self.app.settings.name, self.app.slot_name, exc)
            return
        p.stats.lag_releases += 1
