"""Asking for backfills, cancelling them, and answering those who asked.

:class:`Requests` is the part of :class:`~walex.backfill.runner.Backfills`
that the app's API and its start call: :meth:`~Requests.initial` (the initial
snapshot, before a slot is made), :meth:`~Requests.request` (``app.backfill``),
:meth:`~Requests.cancel` (``app.cancel_backfill``); the waiters of a request
are answered once its job ended, here or in another instance of the app.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import psycopg

from ..errors import BackfillCancelledError, ConfigError, SetupError
from .conditions import check_condition
from .store import Job, Store

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .target import Target

__all__ = ["Requests"]

log = logging.getLogger("walex.backfill")


class Requests:
    """Requests of backfills (a base of :class:`~walex.backfill.runner.Backfills`)."""

    pipeline: Pipeline
    wake: asyncio.Event
    current: Job | None
    store_known: bool
    _waiters: dict[tuple[str, str], list[asyncio.Future[Job]]]

    @property
    def store(self) -> Store:
        s = self.pipeline.settings
        return Store(s.backfill_table, s.name)

    def excludes(self, schema: str, table: str) -> bool:
        return self.store.excludes(schema, table)

    if TYPE_CHECKING:
        async def _connect(self) -> psycopg.AsyncConnection: ...  # Backfills._connect

    async def initial(self, conn: psycopg.AsyncConnection) -> None:
        """``snapshot="initial"``: before the app's first slot is made, ask for every table."""
        s = self.pipeline.settings
        if s.snapshot != "initial":
            return
        from .target import resolve_target

        preflight = self.pipeline.preflight
        assert preflight is not None
        targets: list[Target] = []
        problems: list[str] = []
        for schema, name in sorted(preflight.published):
            if self.excludes(schema, name):
                continue
            try:
                targets.append(await resolve_target(conn, s.publication, f"{schema}.{name}",
                                                    s.subscriptions))
            except ConfigError:
                continue  # not subscribed
            except SetupError as exc:
                problems.append(str(exc))
        if problems:
            raise SetupError(
                "snapshot='initial' cannot read every subscribed table (the slot was not "
                "created): " + " ".join(problems)
            )
        for target in targets:
            await self.store.request(conn, target.schema, target.name, None, target.key, restart=True)
        self.store_known = True
        log.info("walex %r: initial snapshot of %s requested", s.name,
                 ", ".join(t.qualified for t in targets) or "no table")

    async def request(self, table: str, where: str | None = None) -> Job:
        """Backfill ``table`` (the rows matching ``where``); returns once every read was handled."""
        from .target import resolve_target

        s = self.pipeline.settings
        async with await self._connect() as conn:
            target = await resolve_target(conn, s.publication, table, s.subscriptions)
            await check_condition(conn, target, where)
            key = (target.schema, target.name)
            waiter: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(waiter)
            try:
                if not await self.store.request(conn, target.schema, target.name, where, target.key):
                    job = await self.store.job(conn, target.schema, target.name)
                    if job is not None and job.condition != where:
                        raise ConfigError(
                            f"a backfill of {target.qualified} is already under way"
                            f"{' where ' + job.condition if job.condition else ''}; wait for it "
                            "to finish before asking for another"
                        )
                    if job is not None and job.finished:
                        self._finished(job)
            except BaseException:
                waiters = self._waiters.get(key, [])  # run() clears them when the app stops
                if waiter in waiters:
                    waiters.remove(waiter)
                raise
        self.wake.set()
        return await waiter

    async def cancel(self, table: str, timeout: float = 60.0) -> Job | None:
        """Cancel the pending or running backfill of ``table``; once a running one stopped
        (before its next chunk; at most ``timeout`` seconds are waited for that), the job.
        ``None`` when none was under way."""
        async with await self._connect() as conn:
            job = await self.store.cancel(conn, table)
            if job is None:
                return None
            key = (job.schema, job.table)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (current := self.current) is not None and (current.schema, current.table) == key \
                    and loop.time() < deadline:
                await asyncio.sleep(0.05)
            job = await self.store.job(conn, *key) or job
        self._finished(job)
        return job

    def _finished(self, job: Job) -> None:
        for waiter in self._waiters.pop((job.schema, job.table), []):
            if waiter.done():
                continue
            if job.state == "done":
                waiter.set_result(job)
            elif job.state == "cancelled":
                waiter.set_exception(BackfillCancelledError(
                    f"the backfill of {job.qualified} was cancelled after {job.rows_done:,} rows"))
            else:
                waiter.set_exception(SetupError(f"the backfill of {job.qualified} failed: {job.error}"))

    async def _finished_elsewhere(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> None:
        """Answer the requests of jobs no longer pending here (another instance ended them
        while this one stood by)."""
        left = {(job.schema, job.table) for job in jobs}
        for key in [k for k in self._waiters if k not in left]:
            job = await self.store.job(conn, *key)
            if job is not None and job.finished:
                self._finished(job)
