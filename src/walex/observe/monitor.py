"""The monitor: polls the app's slot on a connection of its own; the lag guard.

Every ``status_interval`` seconds it reads the server's WAL end and the
slot's ``wal_status``, ``safe_wal_size`` and walsender, for the metrics and
``/healthz``. Beyond ``max_lag_bytes`` it logs a warning (once per crossing,
and once when back under) and ``/healthz`` turns 503; with
``max_lag_release`` (temporary slots only) it also ends the slot's walsender,
so PostgreSQL drops the slot and frees its WAL rather than filling the disk:
the changes that slot held are never delivered, a gap the pipeline reports
when it reconnects on a new slot.

The monitor never raises into the app: a failed poll is logged at debug
level and reported by ``/healthz``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..admin import human_size
from ..errors import ReplicationError
from ..lookups import LookupConnection
from ..lsn import format_lsn
from .health import lag_bytes

if TYPE_CHECKING:
    from ..app import WalEx

__all__ = ["Monitor"]

log = logging.getLogger("walex")


class Monitor:
    def __init__(self, app: WalEx) -> None:
        self.app = app
        s = app.settings
        self.conn = LookupConnection(s.app_conninfo(), s.secret(), attempts=2)

    async def run(self) -> None:
        try:
            while True:
                await self.poll()
                await asyncio.sleep(self.app.settings.status_interval)
        finally:
            await self.conn.close()

    async def poll(self) -> None:
        app, stats = self.app, self.app.pipeline.stats
        wal_status = "s.wal_status, s.safe_wal_size" if self._v13 else "NULL, NULL"
        try:
            rows = await self.conn.fetch(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, s.active_pid, "
                f"{wal_status} FROM (SELECT 1) one LEFT JOIN pg_replication_slots s "
                "ON s.slot_name = %s", (app.slot_name,))
        except (ReplicationError, OSError) as exc:
            stats.monitor_error = str(exc)
            log.debug("walex %r: slot monitor poll failed: %s", app.settings.name, exc)
            return
        except Exception as exc:  # e.g. a server in recovery: pg_current_wal_lsn() fails
            stats.monitor_error = f"{type(exc).__name__}: {exc}"
            log.debug("walex %r: slot monitor poll failed: %s", app.settings.name, exc)
            return
        end, pid, status, safe = rows[0]
        stats.monitor_error = None
        stats.server_wal_end = int(end)
        stats.slot_wal_status, stats.slot_safe_wal_size = status, safe
        self.guard(pid)

    @property
    def _v13(self) -> bool:
        conn = self.conn.conn
        return conn is None or conn.info.server_version >= 130000

    def guard(self, walsender: int | None) -> None:
        app, stats = self.app, self.app.pipeline.stats
        limit = app.settings.max_lag_bytes
        lag = lag_bytes(app)
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
        log.error(
            "walex %r: releasing temporary slot %r, %s behind (max_lag_bytes %s): the changes "
            "committed after %s that it still held are dropped and never delivered; walex "
            "goes on from a new slot", self.app.settings.name, self.app.slot_name,
            human_size(lag), human_size(int(self.app.settings.max_lag_bytes or 0)),
            format_lsn(p.ack.flushed))
        try:
            await self.conn.fetch("SELECT pg_terminate_backend(%s)", (walsender,))
        except Exception as exc:
            log.error("walex %r: could not end the walsender of slot %r: %s",
                      self.app.settings.name, self.app.slot_name, exc)
            return
        p.stats.lag_releases += 1
