"""One app's backfills: the requests, the task that carries them out, the stream hooks.

:class:`Backfills` belongs to a :class:`~walex.pipeline.Pipeline`. The
pipeline calls it at a few places: :meth:`~Backfills.stream_options` when
starting replication (pgoutput's ``messages`` option), :meth:`~Backfills.excludes`
to keep the progress store's own changes from handlers,
:meth:`~Backfills.message` for every logical decoding message and
:meth:`~Backfills.batch` for every assembled batch while a backfill runs (in
stream order, before the batch is queued), and :meth:`~Backfills.initial`
before it creates a slot. :meth:`~Backfills.run` is a task of the app: it
takes the app's unfinished jobs from the store, oldest first, one at a time,
and sleeps until a new request comes (from :meth:`~Backfills.request`, or
from ``walex backfill`` through a ``walex.backfill`` message in the stream).

A job that cannot be carried out (the table lost its key or was dropped, a
condition that fails, a value that cannot be typed) is marked ``failed`` with
the reason and logged; the app goes on streaming. A change of the key's
columns, types or collations (which decide the order rows are read in) starts
the job over from the first row. A lost connection of the backfill is retried
with backoff (reset once a chunk was completed since), resuming at the last
chunk marked done; a query not answered within ``backfill_query_timeout`` (a
network gone silent, a chunk read slower than that) counts as a lost connection.
A job marked ``cancelled`` in the store (:meth:`Backfills.cancel`, ``walex backfill
--cancel``) stops before its next chunk.

With ``standby=True`` only the instance that holds the standby lock runs jobs.
When it loses the lock (the pipeline drops its queue: :func:`walex.standby.abandon`)
the job stops at once, with a warning, and marks nothing more done: the reads it
emitted may have gone with the queue, and the instance that takes the slot
moves it past their watermarks without them. The instance that holds the lock
next (another, or this one again) carries the job on from its last chunk marked
done; the rows read again come under the ids they had (:mod:`.watermarks`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import psycopg

from ..errors import ReplicationError, WalExError, redact
from ..lookups import DeadlineConnection
from ..lsn import parse_lsn
from ..pgoutput.messages import LogicalMessage
from ..relations import Table
from ..transactions import Transaction
from .conditions import check_condition, estimate
from .replay import GATE_TIMEOUT, Gate, replay_reads
from .requests import Requests
from .store import Job, ReadIds, decode_ids
from .visibility import settle
from .watermarks import PREFIX, Outcome, Window, parse, payload

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .report import ProgressLog
    from .target import Target

# .chunks, .report and .target (reading tables) are imported by the methods that read
# tables: an app that runs no backfill never loads them.

__all__ = ["Backfills", "check_condition", "estimate"]

log = logging.getLogger("walex.backfill")

_EMIT = "SELECT pg_logical_emit_message(true, %s, %s)"
_EMIT_AT = "SELECT pg_logical_emit_message(true, %s, %s)::text"  # and where it was written
class Backfills(Requests):
    """The backfills of one app (see the module docstring)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        # what the reader feeds: a job's window; until the backfill task knows whether reads
        # of an earlier run are to be replayed (at a start, after a lost lock), a Gate
        self.window: Window | Gate | None = Gate()
        self.current: Job | None = None
        self.wake = asyncio.Event()
        self._waiters: dict[tuple[str, str], list[asyncio.Future[Job]]] = {}
        self.chunks_redone = 0  # chunks read again (a truncate or a reconnect in their window)
        self.rows_left_to_stream = 0  # chunk rows changed in the stream meanwhile: not read events
        self.rows_read_again = 0  # of those, rows read again (a change sent without every column)
        # transactions a job waits for before its first chunk: committed, not yet visible
        self.waiting_for: list[int] = []
        # whether the progress store existed at the session's start (pipeline.open_session
        # reads it with its checks): without it no job is pending, and run() opens no
        # connection until a request comes
        self.store_known = True
        self._progressed = False  # a chunk was completed since the last interruption
        self._high_session = 0  # the session whose stream showed the last high watermark
        self._discards = 0  # Pipeline.discards when the jobs began: a change means a lost lock
        self._ids = ReadIds({})  # the current job's ids of reads not marked done
        self._gate_warned = False
        self._loss_flushed: int | None = None  # see discarded()
        self._pending: tuple[int, list[str] | None, int] | None = None  # emitted, not marked

    # -- hooks called by the pipeline ------------------------------------

    @staticmethod
    def stream_options(server_version: int) -> dict[str, str]:
        """pgoutput options: logical decoding messages (the watermarks), PostgreSQL 14+."""
        return {"messages": "true"} if server_version >= 140000 else {}

    def message(self, msg: LogicalMessage) -> None:
        """A logical decoding message of the stream, in stream order."""
        if msg.prefix != PREFIX:
            return
        fields = parse(msg.content)
        if fields is None or fields.get("app") != self.pipeline.settings.name:
            return
        if fields.get("wake"):
            self.wake.set()
        elif self.window is not None:
            self.window.message(fields)
            self._high_session = self.pipeline.sessions

    async def batch(self, txn: Transaction) -> None:
        """An assembled batch, before it is queued; at a high watermark, the reads go first."""
        window = self.window
        if window is None:
            return
        if isinstance(window, Gate):  # the task is looking for reads to replay
            if not await window.wait() and not self._gate_warned:
                self._gate_warned = True
                log.warning("walex %r: the backfill task did not tell within %.0fs what to "
                            "replay; the stream goes on (rows of unfinished chunks are read "
                            "again under new ids)", self.pipeline.settings.name, GATE_TIMEOUT)
            window = self.window
            if window is None or isinstance(window, Gate):
                return
        if window.high_seen and self._high_session != self.pipeline.sessions:
            # the session that showed the high watermark ended before its commit came: this
            # batch is one the next session sends again, and it sends the mark again too
            window.high_seen = False
        reads = window.observe(txn)
        if reads:
            persisted = window.persisted
            if persisted is not None:  # their ids are stored first (see Window.persisted)
                await asyncio.wait([persisted])
                if persisted.cancelled() or persisted.exception() is not None:
                    return  # the job stopped first: a later run reads these rows again
            put = self.pipeline.queue.put
            for read in reads:
                await put(read, counted=False)  # read batches: bounded by count only

    # -- the task -----------------------------------------------------------

    async def run(self) -> None:
        """Carry out the app's jobs, one at a time, until cancelled."""
        failures = 0
        try:
            if not self.store_known:  # no store, so no job: wait for a request (or its wake)
                self._install(None)
                await self.wake.wait()
            elif self.window is None:  # reads to replay, maybe: the stream waits to know
                self.window = Gate()
            while True:
                self.wake.clear()
                try:
                    await self._held()
                    async with await self._connect() as conn:
                        jobs = await self.store.jobs(conn)
                        if jobs:
                            await self.store.ensure(conn)  # a store of an earlier walex
                        await self._finished_elsewhere(conn, jobs)
                        for job in jobs:
                            await self._run(conn, job)
                            failures = 0
                        if isinstance(self.window, Gate):
                            self._install(None)  # nothing (more) to replay
                except _LockLost as lost:
                    log.warning(
                        "walex %r lost its standby lock: its backfill of %s stops here, after "
                        "%s rows (%d chunks) marked done; the instance that holds the slot "
                        "next (this one once it holds it again) carries it on, and sends the "
                        "reads of the chunks not marked done again (under the same ids where "
                        "the slot sends their watermark again)", self.pipeline.settings.name,
                        lost.job.qualified, f"{lost.job.rows_done:,}", lost.job.chunks_done)
                    if not isinstance(self.window, Gate):  # discarded() installed one
                        self.window = Gate()
                    continue
                except (psycopg.OperationalError, ReplicationError) as exc:
                    if self._progressed:  # the job went on since the last interruption
                        self._progressed, failures = False, 0
                    failures += 1
                    delay = min(self.pipeline.settings.reconnect_backoff_max, 0.5 * 2 ** failures)
                    log.warning("walex %r: backfill interrupted (%s); resuming in %.1fs",
                                self.pipeline.settings.name, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                if not jobs:
                    await self.wake.wait()
        finally:
            # the next start's stream waits for the next run to know what to replay
            gate, self.window = self.window, Gate()
            if isinstance(gate, Gate):
                gate.opened.set()
            self.current = None
            for key, waiters in self._waiters.items():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(ReplicationError(
                            f"walex app {self.pipeline.settings.name!r} stopped before the "
                            f"backfill of {'.'.join(key)} finished; it resumes at the next start"
                        ))
            self._waiters.clear()

    async def _held(self) -> None:
        """Return once this instance handles its slot's changes (``standby=True``: it holds
        the standby lock); until then it reads nothing, leaving the jobs to the instance
        that holds the lock. Jobs started from here stop when the lock is lost again."""
        pipeline = self.pipeline
        while pipeline.abandoning:
            await asyncio.sleep(0.1)
        self._discards = pipeline.discards
        self._loss_flushed = None

    def discarded(self, flushed: int) -> None:
        """The pipeline dropped its queue (:meth:`~walex.pipeline.Pipeline.discard_unhandled`),
        its handlers having finished everything up to ``flushed``: the first time since
        the jobs began, that is what this instance handled before it lost its lock."""
        if self._loss_flushed is None:
            self._loss_flushed = flushed
        # the next session may send the reads of the job's chunks not marked done again:
        # it waits until the task knows what to replay
        window = self.window
        if isinstance(window, Window) and window.persisted is not None:
            window.persisted.cancel()  # those reads went with the queue
        if not isinstance(window, Gate):
            self.window = Gate()

    def _check_held(self, job: Job) -> None:
        """Raise :class:`_LockLost` once the pipeline dropped its queue since the job began
        (the standby lock lost, :func:`walex.standby.abandon`): the reads it emitted may
        be gone, and the slot may be moved past their watermarks by another instance, so
        no chunk of it may be marked done from here on."""
        if self.pipeline.discards != self._discards or self.pipeline.abandoning:
            raise _LockLost(job)

    async def _connect(self) -> psycopg.AsyncConnection:
        """A connection for the backfill: every exchange within ``backfill_query_timeout``.

        A query the server does not answer in time (a network gone silent, a chunk
        read slower than the bound) closes the connection: :meth:`run` reconnects
        and resumes at the last completed chunk. The server is asked to give up on
        such a query too (its ``statement_timeout``, unless a lower one is set).
        """
        s = self.pipeline.settings
        timeout = s.backfill_query_timeout
        try:
            conn = await DeadlineConnection.connect(s.app_conninfo(), autocommit=True)
        except psycopg.OperationalError as exc:
            raise ReplicationError(
                f"cannot connect to {s.display_target()}: {redact(str(exc), s.secret())}",
                retriable=True,
            ) from None
        conn.deadline, conn.setting = timeout, "backfill_query_timeout"
        try:
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, false) WHERE "
                "current_setting('statement_timeout')::interval NOT BETWEEN '1ms' AND %s::interval",
                (f"{int(timeout * 1000)}ms", f"{int(timeout * 1000)} ms"))
            return conn
        except BaseException:
            await conn.close()
            raise

    async def _run(self, conn: psycopg.AsyncConnection, job: Job) -> None:
        """One job, from its last completed chunk to its end."""
        from .report import ProgressLog
        from .target import resolve_target

        s, store = self.pipeline.settings, self.store
        self.current = job
        try:
            try:
                target = await resolve_target(conn, s.publication, job.qualified, s.subscriptions)
                table = await self._table(target)
                await check_condition(conn, target, job.condition)  # stored: checked again
            except WalExError as exc:
                await self._fail(conn, job, str(exc))
                return
            resumed = job.last_key is not None
            key_changed = job.chunk_key != target.key or job.key_signature not in (
                None, target.key_signature)
            if key_changed:
                job.read_ids = None  # ids of the rows of another key
            if resumed and key_changed:
                log.warning("walex %r: the key of %s changed (%s, now %s): its backfill starts "
                            "over", s.name, job.qualified, _key_text(job.chunk_key, job.key_signature),
                            _key_text(target.key, target.key_signature))
                resumed = False
            if not resumed:
                job.last_key, job.rows_done, job.chunks_done = None, 0, 0
            estimated = await estimate(conn, target, job.condition)
            if not await store.update(
                conn, job, if_state=job.state, state="running", read_ids=job.read_ids,
                chunk_key=target.key,
                key_signature=target.key_signature, rows_estimated=estimated,
                started_at=job.started_at if resumed and job.started_at else _now(),
                last_key=job.last_key, rows_done=job.rows_done, chunks_done=job.chunks_done,
            ):
                raise _Cancelled  # cancelled (or finished) since the jobs were read
            progress = ProgressLog(s.name, job)
            progress.start(resumed)
            try:
                await self._chunks(conn, job, target, table, progress)
            except _LockLost:
                await self._handled_before_loss(conn, job, progress)
                raise
            except psycopg.OperationalError:
                raise
            except (psycopg.Error, WalExError) as exc:
                log.error("walex %r: the backfill of %s failed", s.name, job.qualified, exc_info=exc)
                await self._fail(conn, job, redact(str(exc), s.secret()))
                return
            if not await store.update(conn, job, if_state="running", state="done",
                                      finished_at=_now(), rate=progress.rate, read_ids=None):
                raise _Cancelled
            progress.done()
            self._finished(job)
        except _Cancelled:
            job.state = "cancelled"
            log.warning("walex %r: the backfill of %s was cancelled after %s rows", s.name,
                        job.qualified, f"{job.rows_done:,}")
            self._finished(job)
        finally:
            window = self.window
            if isinstance(window, Window):  # (a gate a lost lock put in its place stays)
                if window.persisted is not None:
                    window.persisted.cancel()  # reads whose ids were not stored: never queued
                self.window = None
            self.current = None

    def _install(self, window: Window | None) -> None:
        """Set the window the stream feeds; a gate standing in is opened."""
        gate = self.window
        self.window = window
        if isinstance(gate, Gate):
            gate.opened.set()

    async def _chunks(
        self, conn: psycopg.AsyncConnection, job: Job, target: Target, table: Table,
        progress: ProgressLog,
    ) -> None:
        from .chunks import Bound, Limit, read_chunk
        from .target import resolve_target

        s, pipeline, store = self.pipeline.settings, self.pipeline, self.store
        # a chunk's rows, read again ones included, take about a quarter of max_pending_bytes
        # in memory (walex.sizes; the handlers' queue may hold the previous chunk while the
        # next one is read)
        limit = Limit(s.backfill_chunk_size, max(1, s.max_pending_bytes // 4))
        run = secrets.token_hex(8)
        # the ids of rows an earlier run emitted in chunks it did not mark done: the rows
        # still as they were go out again where they went out (walex.backfill.replay)
        gate = self.window
        inherited = decode_ids(job.read_ids, 8 * s.backfill_chunk_size)
        ids = self._ids = ReadIds(inherited)
        window = Window(s.name, run, target, s.batch_size)
        # (only at a session's start: a lost backfill connection leaves the reads queued)
        if inherited and isinstance(gate, Gate) and not gate.expired:
            window.replay = await replay_reads(conn, target, table, pipeline.catalog.adapters,
                                               job.condition, job.last_key, inherited,
                                               limit.rows, limit.bytes or 1)
        self._install(window)
        await self._settle(conn, job)
        after = job.last_key
        pending: tuple[int, list[str] | None, int] | None = None  # emitted, not yet known handled
        self._pending = None
        # rows to read again (their handlers lack a column), by key, in key order: each one's
        # bound and place (the chunk that first left it out, its index there)
        again: dict[tuple[str, ...], tuple[Bound, tuple[int, int]]] = {}
        seq = redone = stuck = 0
        exhausted = False  # every row in key order was read: only rows to read again are left
        while True:
            self._check_held(job)
            if await store.state(conn, job) not in ("pending", "running"):  # cancelled
                raise _Cancelled
            seq += 1
            outcome_future = window.arm(seq)
            gaps = len(pipeline.gaps)
            await conn.execute(_EMIT, (PREFIX, payload(s.name, run=run, chunk=seq, mark="low")))
            chunk = await read_chunk(conn, target, table, pipeline.catalog.adapters,
                                     job.condition, after, 0 if exhausted else limit,
                                     again=[bound for bound, _ in again.values()])
            if chunk.reshaped:  # DDL: read on with the new definition (as the stream does)
                log.info("walex %r: %s changed; its backfill goes on with its new columns",
                         s.name, job.qualified)
                old = target
                target = await resolve_target(conn, s.publication, job.qualified, s.subscriptions)
                table = await self._table(target)
                if (target.key, target.key_signature) != (old.key, old.key_signature):
                    # the rows' order changed: the last key read no longer tells where to go on
                    log.warning("walex %r: the key of %s changed (%s, now %s): its backfill "
                                "starts over", s.name, job.qualified,
                                _key_text(old.key, old.key_signature),
                                _key_text(target.key, target.key_signature))
                    after, window.key, pending, exhausted = None, target.key, None, False
                    again.clear()  # every row is read anew
                    ids.inherited.clear()  # ids of the old key's rows
                    await store.update(conn, job, chunk_key=target.key,
                                       key_signature=target.key_signature, last_key=None,
                                       rows_done=0, chunks_done=0, read_ids=ids.encoded())
                continue
            exhausted = exhausted or not chunk.more  # no row after the last one read
            if not chunk.events and not chunk.untried:
                break  # no row left, and the rows to read again are gone (deleted)
            window.load(chunk)
            cur = await conn.execute(_EMIT_AT, (PREFIX, payload(s.name, run=run, chunk=seq,
                                                                mark="high")))
            high = parse_lsn((await cur.fetchone() or ("0/0",))[0])
            outcome = await self._outcome(outcome_future, gaps, high, job)
            if outcome.redo is not None:
                redone += 1
                self.chunks_redone += 1
                (log.warning if redone % 10 == 0 else log.debug)(
                    "walex %r: chunk %d of %s read again (%s)", s.name, seq, job.qualified,
                    outcome.redo)
                continue
            redone = 0
            if outcome.ids:  # stored before the reader queues the reads
                ids.emitted(outcome.end_lsn, outcome.ids)
                await store.update(conn, job, read_ids=ids.encoded())
                if window.persisted is not None and not window.persisted.done():
                    window.persisted.set_result(None)
            self.rows_left_to_stream += outcome.dropped
            self.rows_read_again += len(chunk.events) - chunk.rows
            before = len(again)
            places = {key: place for key, (_, place) in again.items()}
            left = [(places.get(b[1], (seq, i)), b) for i, b in enumerate(outcome.again)]
            left += [(places.get(b[1], (seq, 0)), b) for b in chunk.untried]  # left for later
            again = {b[1]: (b, place) for place, b in sorted(left, key=lambda x: x[0])}
            if chunk.rows:
                after = chunk.last_key
            if pending is not None:
                await self._save(conn, job, pending, progress)
            # marked done up to the last row read, or up to the row before the first row still
            # to read again: a restart reads that one again
            first = next((bound for bound, _ in again.values()), None)
            mark = after if first is None else None if first[0] is None else list(first[0])
            pending = self._pending = (outcome.end_lsn, mark, outcome.emitted)
            if exhausted:
                if not again:
                    break
                # rows changed again and again: give their writers some time between tries
                stuck = 0 if len(again) < before else stuck + 1
                if stuck:
                    if stuck % 20 == 0:
                        log.warning("walex %r: %d row(s) of %s changed again each time they "
                                    "were read again (a change without a TOASTed column), %d "
                                    "times; still trying", s.name, len(again), job.qualified,
                                    stuck)
                    await asyncio.sleep(min(1.0, 0.01 * 2 ** stuck))
        if pending is not None:
            await self._save(conn, job, pending, progress)

    async def _settle(self, conn: psycopg.AsyncConnection, job: Job) -> None:
        """Wait until every transaction committed before the window opened is visible
        (:func:`.visibility.settle`); a job cancelled meanwhile stops."""

        async def wanted() -> bool:
            self._check_held(job)
            return await self.store.state(conn, job) in ("pending", "running")

        def waiting(xids: list[int]) -> None:
            self.waiting_for = xids

        if not await settle(conn, self.pipeline.settings.name, job.qualified, wanted, waiting):
            raise _Cancelled

    async def _outcome(self, future: asyncio.Future[Outcome], gaps: int, high: int,
                       job: Job) -> Outcome:
        """Wait for the reader to reach the high watermark (or a reconnect to lose it).

        A reconnect loses it only when the new session skipped WAL (a temporary slot, a
        lost slot made again: what :attr:`Pipeline.gaps` records; ``gaps``: their count
        when the chunk began). A durable slot sends everything after the position
        acknowledged again, the watermarks included, and the window, kept across
        sessions, sees them again: the chunk goes on (giving it up at every reconnect
        read it again and again, never done, when reconnects came faster than the
        stream reached its high watermark behind a slow handler). A session that starts
        past the high watermark (``high``, where it was written: the slot was moved on
        meanwhile, by a standby that held it) loses it too."""
        waited = 0.0
        while True:
            done, _ = await asyncio.wait([future], timeout=0.05)
            if done:
                return future.result()
            self._check_held(job)
            if len(self.pipeline.gaps) != gaps or self.pipeline.ack.flushed > high:
                window = self.window
                if window is not None:  # a high watermark seen from now on emits nothing
                    window.give_up()
                return Outcome(redo="the stream skipped its watermarks at a reconnect")
            waited += 0.05
            if waited >= 60 and waited % 60 < 0.05:
                log.warning("walex %r: the backfill of %s has waited %.0fs for the stream to "
                            "reach its watermark", self.pipeline.settings.name, job.qualified,
                            waited)

    async def _save(self, conn: psycopg.AsyncConnection, job: Job,
                    pending: tuple[int, list[str], int], progress: ProgressLog) -> None:
        """Mark a chunk done once every handler finished its events (its watermark handled)."""
        end_lsn, last_key, rows = pending
        ack, window = self.pipeline.ack, self.window
        while ack.flushed < end_lsn:
            self._check_held(job)
            await asyncio.sleep(0.005)
        # acknowledged past the chunk's high watermark: by this instance's handlers, unless
        # the lock was lost meanwhile (the queue holding the reads dropped) and another
        # instance moved the slot on, without these reads
        self._check_held(job)
        await self._mark(conn, job, pending, progress)
        if window is not None:
            window.forget(end_lsn)

    async def _mark(self, conn: psycopg.AsyncConnection, job: Job,
                    pending: tuple[int, list[str], int], progress: ProgressLog) -> None:
        end_lsn, last_key, rows = pending
        job.rows_done += rows
        self._ids.done(end_lsn)
        # read_ids keeps the chunk's ids until the next chunk's are written: a run after
        # this one reads on after last_key, and never meets its rows
        await self.store.update(conn, job, last_key=last_key, rows_done=job.rows_done,
                                chunks_done=job.chunks_done + 1, rate=progress.rate)
        self._pending = None
        self._progressed = True
        progress.chunk()

    async def _handled_before_loss(self, conn: psycopg.AsyncConnection, job: Job,
                                   progress: ProgressLog) -> None:
        """The lock was lost: the chunk waiting to be marked done is marked done if its
        reads were handled here before (acknowledged up to its high watermark when the
        queue was dropped; any later acknowledged position may be another instance's)."""
        pending, handled = self._pending, self._loss_flushed
        if pending is not None and handled is not None and pending[0] <= handled:
            await self._mark(conn, job, pending, progress)

    async def _table(self, target: Target) -> Table:
        """The table's definition, typed with the app's catalog as a Relation message is."""
        catalog = self.pipeline.catalog
        await catalog.resolve(c.type_oid for c in target.columns)
        # the key a streamed change of this table names (Source.primary_key, the
        # destinations' subject and partition): the chunk key unless it is a mere unique index
        key = () if target.key_from.startswith("unique index") else tuple(target.key)
        return Table(target.relation(), catalog, self.pipeline.relations.db, True, key)

    async def _fail(self, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        log.error("walex %r: the backfill of %s failed: %s", self.pipeline.settings.name,
                  job.qualified, error)
        await self.store.update(conn, job, state="failed", error=error, finished_at=_now())
        self._finished(job)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Cancelled(Exception):
    """The job was cancelled: it stops here."""


class _LockLost(Exception):
    """The standby lock was lost while the job ran: it stops here, unfinished."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.qualified)
        self.job = job


def _key_text(columns: list[str] | None, signature: str | None) -> str:
    """``"id (23:-1:0)"``: the key's columns and their type OIDs, type modifiers, collations."""
    return f"{', '.join(columns or [])} ({signature or '?'})"
