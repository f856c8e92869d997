"""The running pipeline of one app: sessions, reconnects, and the three tasks.

A *session* is one pair of connections (an admin connection for checks and
type lookups, a walsender connection for the stream) from slot creation to
the end of the stream. The pipeline outlives sessions: when a session breaks
for a reason a reconnect can cure, it lets the dispatcher finish every
transaction already received, then opens a new session with backoff and
jitter, resuming from the slot. Changes flow::

    reader: frames -> Decoder -> [message_middleware] -> process() -> bounded queue
    dispatcher: queue -> Dispatcher.dispatch -> AckTracker.handled
    acknowledger: AckTracker -> standby status updates

Invariants:
- a transaction is acknowledged only after its dispatch returned;
- a transaction committed below the acknowledged position is a replay and
  is dropped before dispatch;
- a large transaction flows through in batches of ``batch_size`` events, so
  memory is bounded by the queue (``max_pending_transactions`` batches) and
  not by the transaction's size; it is acknowledged after its last batch;
- the keepalive's WAL end is acknowledged only when nothing is in flight:
  no open transaction, nothing queued or being handled, nothing held by a
  middleware;
- a temporary slot cannot survive a reconnect: the gap is logged and recorded
  in :attr:`Pipeline.gaps`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from typing import Any

import psycopg

from . import failpoints
from .ack import AckTracker
from .checks import Preflight, preflight
from .config import WalExSettings
from .dispatch import Dispatcher
from .errors import ReplicationError, SetupError, SlotInUseError, SlotLostError, redact
from .handlers import table_matcher
from .hotpath import NOT_HANDLED, hot_path
from .lsn import format_lsn, parse_lsn
from .pgoutput import Decoder, Relation, Type
from .pgoutput.messages import Message
from .pgtypes import TypeCatalog
from .relations import RelationCache
from .replication.frames import XLOGDATA_POSITIONS, parse_keepalive
from .replication.stream import ReplicationConnection
from .transactions import Transaction, TransactionAssembler

__all__ = ["Pipeline"]

log = logging.getLogger("walex")

_XLOGDATA, _KEEPALIVE = ord("w"), ord("k")


class Pipeline:
    """Sessions, reconnects and the reader / dispatcher / acknowledger tasks."""

    def __init__(
        self, settings: WalExSettings, slot_name: str, dispatcher: Dispatcher, owner: Any
    ) -> None:
        self.settings = settings
        self.slot_name = slot_name
        self.dispatcher = dispatcher
        self.owner = owner  # passed to message_middleware
        self.secret = settings.secret()
        self.ack = AckTracker(interval=settings.status_interval)
        self.queue: asyncio.Queue[Transaction] = asyncio.Queue(settings.max_pending_transactions)
        self.busy = False
        self.held_by_middleware = 0
        self.admin: psycopg.AsyncConnection | None = None
        self.repl: ReplicationConnection | None = None
        self.preflight: Preflight | None = None
        self.catalog = TypeCatalog()
        self.relations = RelationCache(self.catalog, "", self._is_subscribed)
        self.assembler = TransactionAssembler(
            self.relations, batch_size=settings.batch_size, spill_dir=settings.spill_dir
        )
        self._subscribed = [table_matcher(s) for s in settings.subscriptions]
        self.sessions = 0
        self.wal_sender_timeout = 60.0
        self.silence_limit = 2 * settings.status_interval + 60.0
        self.gaps: list[str] = []
        self.transactions_handled = 0
        self.events_handled = 0
        self.replays_dropped = 0

    # -- configuration that may change while running ----------------------

    def _is_subscribed(self, schema: str, table: str) -> bool:
        return any(match(schema, table) for match in self._subscribed)

    def set_subscriptions(self, subscriptions: list[str]) -> None:
        self._subscribed = [table_matcher(s) for s in subscriptions]
        self.relations.refresh_subscriptions()

    # -- sessions --------------------------------------------------------

    async def open_session(self) -> None:
        """Connect, check, create or reuse the slot, and start streaming."""
        s = self.settings
        conninfo = s.conninfo()
        first = self.sessions == 0
        try:
            self.admin = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            message = f"cannot connect to {s.display_target()}: {redact(str(exc), self.secret)}"
            if first:
                raise SetupError(message) from None
            raise ReplicationError(message, retriable=True) from None
        try:
            try:
                self.preflight = await preflight(self.admin, s.publication, s.subscriptions)
                self.silence_limit = await self._silence_limit()
            except psycopg.OperationalError as exc:
                if first:
                    raise SetupError(f"checking {s.display_target()} failed: "
                                     f"{redact(str(exc), self.secret)}") from None
                raise ReplicationError(f"checking the server failed: {redact(str(exc), self.secret)}",
                                       retriable=True) from None
            self.catalog.conn = self.admin
            self.relations.db = self.preflight.database
            self.assembler.reset()
            self.repl = await ReplicationConnection.connect(conninfo, self.secret)
            start = await self._prepare_slot(first)
            await self._start_replication(start)
        except BaseException:
            await self.close_session()
            raise
        self.sessions += 1

    async def _silence_limit(self) -> float:
        """How long the server may stay silent before the connection counts as dead.

        A walsender busy decoding a large transaction that publishes nothing
        sends no frame and answers no reply request until half its
        ``wal_sender_timeout`` passed, so silence shorter than that is no sign
        of a dead server.
        """
        assert self.admin is not None
        cur = await self.admin.execute(
            "SELECT setting::float / 1000 FROM pg_settings WHERE name = 'wal_sender_timeout'"
        )
        row = await cur.fetchone()
        timeout = float(row[0]) if row and row[0] else 0.0
        if timeout <= 0:
            timeout = 120.0  # the server never times out: allow a long silence
        self.wal_sender_timeout = timeout
        return max(2 * self.settings.status_interval, timeout + self.settings.status_interval)

    async def _prepare_slot(self, first: bool) -> int:
        """The LSN to start from; creates the slot when needed."""
        s, admin, repl = self.settings, self.admin, self.repl
        assert admin is not None and repl is not None
        if s.durable_slot:
            cur = await admin.execute(
                "SELECT wal_status, confirmed_flush_lsn::text FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.slot_name,),
            )
            row = await cur.fetchone()
            if row is not None and row[0] == "lost":
                await self._slot_lost(row[1])
                row = None
            if row is not None:
                confirmed = parse_lsn(row[1]) if row[1] else 0
                if confirmed > self.ack.flushed:
                    self.ack.flushed = self.ack.received = confirmed
                return confirmed
        elif not first:
            gap = (
                f"temporary slot {self.slot_name!r} was dropped with the lost connection: "
                f"changes committed after {format_lsn(self.ack.flushed)} until the new slot "
                "was created are not delivered (use durable_slot=True to avoid this)"
            )
            log.error(gap)
            self.gaps.append(gap)
        slot = await repl.create_slot(self.slot_name, temporary=not s.durable_slot, failover=s.failover)
        if slot.created:
            log.info("created %s replication slot %r at %s",
                     "durable" if s.durable_slot else "temporary",
                     self.slot_name, format_lsn(slot.consistent_point))
        start = slot.consistent_point
        if start > self.ack.flushed:
            self.ack.flushed = self.ack.received = start
        return start

    async def _slot_lost(self, confirmed: str | None) -> None:
        message = (
            f"replication slot {self.slot_name!r} was invalidated (wal_status = 'lost'): "
            f"PostgreSQL removed WAL it still needed, so changes committed after "
            f"{confirmed or 'its last confirmed position'} are lost to walex. "
            "Raise max_slot_wal_keep_size to prevent this"
        )
        if not self.settings.recreate_lost_slot:
            raise SlotLostError(
                message + "; pass recreate_lost_slot=True to drop and recreate the slot "
                "(and resynchronise what was missed)."
            )
        assert self.admin is not None
        log.error("%s; recreating it as recreate_lost_slot=True", message)
        self.gaps.append(message)
        await self.admin.execute("SELECT pg_drop_replication_slot(%s)", (self.slot_name,))

    async def _start_replication(self, start: int) -> None:
        s, repl = self.settings, self.repl
        assert repl is not None
        options = {
            "proto_version": "2" if s.streaming else "1",
            "publication_names": '"' + s.publication.replace('"', '""') + '"',
        }
        if s.streaming:
            options["streaming"] = "on"
        # After a network failure the old walsender holds the slot until its
        # wal_sender_timeout notices the dead connection: wait at least that long.
        wait = s.slot_wait_timeout if self.sessions == 0 else max(
            s.slot_wait_timeout, self.wal_sender_timeout + 10
        )
        deadline = time.monotonic() + wait
        delay = 0.1
        while True:
            try:
                await repl.start(self.slot_name, start, options)
                break
            except SlotInUseError:
                if time.monotonic() + delay > deadline:
                    raise SlotInUseError(
                        f"replication slot {self.slot_name!r} is in use by process "
                        f"{await self._slot_holder()} and stayed so for {wait:g}s. "
                        "Fix: stop the other consumer (only one process can stream from a "
                        "slot), or give this app another slot_name."
                    ) from None
                log.warning("replication slot %r is in use; retrying in %.1fs", self.slot_name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.debug("START_REPLICATION %s at %s", self.slot_name, format_lsn(start))

    async def _slot_holder(self) -> str:
        assert self.admin is not None
        cur = await self.admin.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot_name,)
        )
        row = await cur.fetchone()
        return str(row[0]) if row and row[0] else "unknown"

    async def close_session(self) -> None:
        for conn in (self.repl, self.admin):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # pragma: no cover - closing a broken connection
                    pass
        self.repl = self.admin = None
        self.catalog.conn = None

    # -- the tasks -------------------------------------------------------

    async def run_reader(self) -> None:
        """Read sessions one after the other; reconnects on retriable errors."""
        attempts = 0
        while True:
            try:
                await self._read_session()
            except ReplicationError as exc:
                if not exc.retriable:
                    raise
                log.warning("replication interrupted: %s; reconnecting", exc)
            await self._drain()
            await self.close_session()
            while True:
                attempts += 1
                if attempts > self.settings.reconnect_max_attempts:
                    raise ReplicationError(
                        f"gave up reconnecting to {self.settings.display_target()} after "
                        f"{attempts - 1} attempts"
                    )
                backoff = min(self.settings.reconnect_backoff_max, 0.2 * 2 ** (attempts - 1))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                try:
                    await self.open_session()
                    log.info("reconnected (session %d), resuming at %s",
                             self.sessions, format_lsn(self.ack.flushed))
                    attempts = 0
                    break
                except ReplicationError as exc:
                    if not exc.retriable:
                        raise
                    log.warning("reconnect attempt %d failed: %s", attempts, exc)

    async def _drain(self) -> None:
        """Wait until every received transaction was handled."""
        while not self.queue.empty() or self.busy:
            await asyncio.sleep(0.01)

    async def _read_session(self) -> None:
        repl, ack = self.repl, self.ack
        assert repl is not None
        decoder = Decoder()
        header = XLOGDATA_POSITIONS.unpack_from
        middleware = self.settings.message_middleware
        hot = hot_path(self.assembler, decoder) if middleware is None else None
        self.compiled_path = hot is not None  # for tests and diagnostics
        process, feed, queue = self.process, self.assembler.feed, self.queue
        interval, limit = self.settings.status_interval, self.silence_limit
        silent_since: float | None = None
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that arrives as the read completes, and stop() hangs.
                async with asyncio.timeout(interval):
                    frames = await repl.read()
            except TimeoutError:
                now = time.monotonic()
                if silent_since is None:
                    silent_since = now - interval
                if now - silent_since >= limit:
                    raise ReplicationError(
                        f"the server sent nothing for {now - silent_since:.0f}s, not even an "
                        "answer to a reply request", retriable=True,
                    ) from None
                await ack.send(self, reply=True)  # ask for a sign of life
                continue
            silent_since = None
            if failpoints.ACTIVE:
                failpoints.hit("after_frames")
            for frame in frames:
                # -- the compiled hot path (walex.hotpath): Begin/Insert/Update/Delete/Commit
                if hot is not None:
                    batches = hot.feed(frame)
                    if batches is not NOT_HANDLED:
                        if batches is not None:
                            for txn in batches:
                                if txn.commit_lsn < ack.flushed:
                                    self._replayed(txn)
                                elif queue.full():
                                    await queue.put(txn)
                                else:
                                    queue.put_nowait(txn)
                        ack.saw(hot.end)
                        continue
                # -- the pure-Python path: every frame when hot is None, else the others
                tag = frame[0]
                if tag == _XLOGDATA:
                    if len(frame) < 25:
                        raise ReplicationError(f"truncated XLogData frame of {len(frame)} bytes")
                    start, end = header(frame)
                    msg = decoder.decode(frame[25:], start)
                    if middleware is None:
                        kind = type(msg)
                        if kind is Relation or kind is Type:
                            await process(msg, start)
                        else:  # the hot path: no coroutine per message
                            batches = feed(msg, start)
                            if batches is not None:
                                for txn in batches:
                                    if txn.commit_lsn < ack.flushed:
                                        self._replayed(txn)
                                    elif queue.full():
                                        await queue.put(txn)
                                    else:
                                        queue.put_nowait(txn)
                    else:
                        self.held_by_middleware += 1
                        result = middleware(msg, self.owner)
                        if inspect.isawaitable(result):
                            await result
                    ack.saw(end)
                elif tag == _KEEPALIVE:
                    keepalive = parse_keepalive(frame)
                    ack.saw(keepalive.wal_end)
                    if self.idle:
                        ack.idle_at(keepalive.wal_end)
                    if keepalive.reply_requested:
                        ack.request()
                else:
                    raise ReplicationError(f"unexpected replication frame type {chr(tag)!r}")

    @property
    def idle(self) -> bool:
        return (
            self.assembler.idle and self.queue.empty() and not self.busy
            and self.held_by_middleware == 0
        )

    async def process(self, msg: Message, lsn: int = 0, *, from_middleware: bool = False) -> None:
        """Apply one decoded message; a committed transaction goes to the queue."""
        if from_middleware:
            self.held_by_middleware -= 1
        kind = type(msg)
        if kind is Relation:
            await self.relations.update(msg)  # type: ignore[arg-type]
            return
        if kind is Type:
            await self.catalog.resolve([msg.type_oid])  # type: ignore[union-attr]
            return
        batches = self.assembler.feed(msg, lsn)
        if batches is None:
            return
        for txn in batches:
            if txn.commit_lsn < self.ack.flushed:
                self._replayed(txn)
            else:
                await self.queue.put(txn)

    def _replayed(self, txn: Transaction) -> None:
        """Committed before what was acknowledged: a replay after a reconnect."""
        if txn.last:
            self.replays_dropped += 1
            log.debug("dropped replayed transaction committed at %s", format_lsn(txn.commit_lsn))

    async def run_dispatcher(self) -> None:
        queue, dispatch, ack = self.queue, self.dispatcher.dispatch, self.ack
        while True:
            txn = await queue.get()
            self.busy = True
            await dispatch(txn)
            if failpoints.ACTIVE:
                failpoints.hit("after_dispatch")
            self.events_handled += len(txn.events)
            if txn.last:
                ack.handled(txn.end_lsn)
                self.transactions_handled += 1
            self.busy = False

    async def run_acknowledger(self) -> None:
        await self.ack.run(self)

    async def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        """Status sink for the acknowledger: the current session, if streaming."""
        repl = self.repl
        if repl is None or not repl.streaming:
            return
        if failpoints.ACTIVE and failpoints.hit("before_status"):
            return
        try:
            await repl.send_status(write, flush, apply, reply)
        except ReplicationError as exc:
            log.debug("status update not sent: %s", exc)  # the reader notices and reconnects

    async def run_heartbeat(self) -> None:
        """Write a tiny WAL record now and then, so a quiet slot keeps moving."""
        interval = self.settings.heartbeat_interval
        assert interval is not None
        while True:
            await asyncio.sleep(interval)
            if self.admin is not None:
                try:
                    await self.admin.execute(
                        "SELECT pg_logical_emit_message(false, 'walex.heartbeat', '')"
                    )
                except psycopg.Error as exc:
                    log.debug("heartbeat failed: %s", exc)
