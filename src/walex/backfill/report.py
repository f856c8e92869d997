"""Progress as people read it: rows done of the estimate, rows per second, time left.

A service logs one line per backfill every :data:`LOG_INTERVAL` seconds and
one when it ends (:class:`ProgressLog`); ``walex status`` shows the store as a
table (:func:`status_table`); ``walex backfill`` draws a rich progress bar
(:mod:`walex.backfill.command`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: `walex status` imports this without the store's psycopg
    from .store import Job

__all__ = ["ProgressLog", "status_table", "describe", "LOG_INTERVAL"]

log = logging.getLogger("walex.backfill")

LOG_INTERVAL = 10.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe(rows: int, estimated: int | None, rate: float | None) -> str:
    """``"12,000 of ~50,000 rows (24%), 8,100 rows/s, about 5s left"``."""
    text = f"{rows:,} rows"
    if estimated and rows <= estimated:
        text = f"{rows:,} of ~{estimated:,} rows ({min(100, 100 * rows // estimated)}%)"
    if rate:
        text += f", {rate:,.0f} rows/s"
        if estimated and estimated > rows:
            text += f", about {_duration((estimated - rows) / rate)} left"
    return text


class ProgressLog:
    """Log lines for one backfill run in a service."""

    def __init__(self, app: str, job: Job, interval: float | None = None) -> None:
        self.app = app
        self.job = job
        self.interval = LOG_INTERVAL if interval is None else interval
        self.started = time.monotonic()
        self.rows_at_start = job.rows_done
        self.last_log = self.started

    @property
    def rate(self) -> float | None:
        elapsed = time.monotonic() - self.started
        done = self.job.rows_done - self.rows_at_start
        return done / elapsed if elapsed > 0 and done else None

    def start(self, resumed: bool) -> None:
        job = self.job
        where = f" where {job.condition}" if job.condition else ""
        if resumed:
            log.info("walex %r: resuming the backfill of %s%s after %s", self.app, job.qualified,
                     where, describe(job.rows_done, job.rows_estimated, None))
        else:
            log.info("walex %r: backfilling %s%s by %s (~%s rows)", self.app, job.qualified,
                     where, ", ".join(job.chunk_key or []), f"{job.rows_estimated or 0:,}")

    def chunk(self) -> None:
        now = time.monotonic()
        if now - self.last_log >= self.interval:
            self.last_log = now
            job = self.job
            log.info("walex %r: backfill of %s: %s", self.app, job.qualified,
                     describe(job.rows_done, job.rows_estimated, self.rate))

    def done(self) -> None:
        job = self.job
        elapsed = time.monotonic() - self.started
        log.info("walex %r: backfill of %s done: %s rows in %s (%s rows/s)", self.app,
                 job.qualified, f"{job.rows_done:,}", _duration(elapsed),
                 f"{(job.rows_done - self.rows_at_start) / elapsed:,.0f}" if elapsed > 0 else "-")


def status_table(jobs: list[Job]) -> Any:
    """The store as ``walex status`` shows it (a rich Table: rich is the CLI's, imported here)."""
    from rich.markup import escape
    from rich.table import Table as RichTable

    table = RichTable("app", "table", "state", "progress", "updated", title="backfills")
    now = datetime.now(timezone.utc)
    for job in jobs:
        state = job.state
        if job.state == "failed" and job.error:
            state = f"failed: {escape(job.error)}"
        running = job.state == "running"
        where = f" where {escape(job.condition)}" if job.condition else ""
        table.add_row(
            escape(job.app), escape(job.qualified) + where, state,
            describe(job.rows_done, job.rows_estimated if running else None,
                     job.rate if running else None),
            f"{_duration((now - job.updated_at).total_seconds())} ago",
        )
    return table
