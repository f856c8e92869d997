"""The running pipeline of one app: sessions, reconnects, and the three tasks.

A *session* is one walsender connection, which runs the checks, creates the
slot and streams, from slot creation to the end of the stream; opening and
closing one is :mod:`walex.session`. Type lookups,
heartbeats and the rare statements a walsender cannot run go through a
:class:`~walex.lookups.LookupConnection`, a normal connection opened on first
use and reopened whenever the server closed it, without ending the session.
The pipeline outlives sessions: when a session breaks
for a reason a reconnect can cure, it opens a new session with backoff and
jitter, resuming from the slot, while the dispatcher goes on with the
transactions already received (a durable slot is taken back at once, so no
other instance streams what is still handled here; the new session's copies
of them are dropped: :attr:`Pipeline.queued_upto`). With a temporary slot,
which went with the connection, the received transactions are handled first.
Changes flow::

    reader: frames -> compiled hot path or Decoder -> [message_middleware] -> bounded queue
    dispatcher (walex.handoff): queue -> Dispatcher (plain calls in runs) -> AckTracker.handled
    acknowledger: AckTracker -> standby status updates

Invariants:
- a transaction is acknowledged only after its dispatch returned and every
  destination confirmed it durable;
- a transaction committed below the acknowledged position, or queued whole
  by an earlier session whose queue was kept, is a replay and is dropped
  before dispatch; dropping the queue (:meth:`Pipeline.discard_unhandled`)
  forgets the second, so those transactions come again;
- a large transaction flows through in batches of at most ``batch_size``
  events and about ``max_pending_bytes / 8`` bytes, so memory is bounded by
  the queue and not by the transaction's size: the reader stops reading while
  the batches queued or in hand hold more than their share of
  ``max_pending_bytes`` (their :attr:`Transaction.size`, what their events take
  in memory, :mod:`walex.sizes`) or the queue
  holds ``max_pending_transactions`` batches; a transaction is acknowledged
  after its last batch;
- the keepalive's WAL end is acknowledged only when nothing is in flight:
  no open transaction, nothing queued or being handled, nothing held by a
  middleware;
- a temporary slot survives neither a reconnect nor a stop: the changes it
  takes along unhandled are logged and recorded in :attr:`Pipeline.gaps`;
- once ``closing`` is set (by ``stop()``) the dispatcher finishes the batch in
  hand and takes no other;
- with ``standby=True`` nothing is handled without the standby lock
  (:mod:`walex.standby`): a session starts only once it is held, and when its
  connection is lost the pipeline abandons (:func:`walex.standby.abandon`)
  what it has not acknowledged before it takes the lock again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from typing import Any

import psycopg

from . import failpoints, session, standby
from .ack import AckTracker
from .backfill.runner import Backfills
from .checks import Preflight
from .config import WalExSettings
from .dispatch import Dispatcher
from .errors import ReplicationError
from .handoff import BatchQueue, run_dispatcher
from .handlers import table_matcher
from .hotpath import NOT_HANDLED, hot_path
from .lookups import LookupConnection
from .lsn import format_lsn
from .observe.stats import Stats
from .pgoutput import Decoder, Relation, Type
from .pgoutput.messages import LogicalMessage, Message
from .pgtypes import TypeCatalog
from .relations import RelationCache
from .sizes import Sizer
from .replication.frames import XLOGDATA_POSITIONS, parse_keepalive
from .replication.stream import ReplicationConnection
from .subscriptions import renamed
from .assembler import TransactionAssembler
from .transactions import Transaction

__all__ = ["Pipeline"]

log = logging.getLogger("walex")

_XLOGDATA, _KEEPALIVE = ord("w"), ord("k")
_ABANDONED = "the standby lock was lost: ending the session"


class Pipeline:
    """Sessions, reconnects and the reader / dispatcher / acknowledger tasks."""

    def __init__(
        self, settings: WalExSettings, slot_name: str, dispatcher: Dispatcher, owner: Any
    ) -> None:
        self.settings = settings
        self.slot_name = slot_name
        self.dispatcher = dispatcher
        self.destinations: Any = None  # walex.destinations.Destinations, set by the app
        # walex.destinations.window.Window: batches handed to the destinations' lanes and not
        # yet recorded (set by the dispatcher when a destination's window is above 1)
        self.window: Any = None
        self.owner = owner  # passed to message_middleware
        self.secret = settings.secret()
        self.ack = AckTracker(interval=settings.status_interval)
        self.ack.quiet = lambda: self.idle
        # max_pending_bytes, in memory (walex.sizes): the batches queued or in hand (and
        # waiting in a destination's window) take what the batch being assembled, the one
        # that crossed the bound and, with destinations, their encoded messages (a
        # quarter, taken off queue.max_bytes by the app) leave
        self.sizer = Sizer()
        budget = int(settings.max_pending_bytes)
        self.batch_memory = max(1, budget // 8)  # most bytes of one batch
        # the batches for the dispatcher (walex.handoff), bounded by count and by bytes:
        # the reader waits while the batches queued or in hand exceed their share
        self.queue = BatchQueue(settings.max_pending_transactions,
                                max(1, budget - 2 * self.batch_memory))
        self.max_pending_bytes = settings.max_pending_bytes
        self.in_hand: Transaction | None = None  # the batch being dispatched
        self.closing = False  # set by stop(): take no batch after the one in hand
        self.held_by_middleware = 0
        self.repl: ReplicationConnection | None = None
        self.preflight: Preflight | None = None
        self.lookups = LookupConnection()
        self.catalog = TypeCatalog(self.lookups)
        self.relations = RelationCache(self.catalog, "", self._is_subscribed, self._is_raw)
        self.assembler = TransactionAssembler(
            self.relations, batch_size=settings.batch_size, spill_dir=settings.spill_dir,
            # a batch holds at most 1/8 of the budget, so one huge transaction of wide
            # rows cannot hold much more than the budget (queued + assembled + in hand);
            # in the wire bytes the assembler counts, by the ratio the sizer learns
            batch_bytes=self.sizer.wire(self.batch_memory),
        )
        self._subscribed = [table_matcher(s) for s in settings.subscriptions]
        # what set_subscriptions asked for: applied between transactions while a session
        # reads (only ever replaced whole, so a change from another thread is never lost)
        self._subscriptions_due = self._subscribed
        self.reading = False  # _read_session runs
        self.backfill = Backfills(self)  # existing rows as read events (walex.backfill)
        self.sessions = 0
        self.wal_sender_timeout = 60.0
        self.silence_limit = 2 * settings.status_interval + 60.0
        self.gaps: list[str] = []
        # what a gap's message advises (``walex tail``, which has no durable slot, says its own)
        self.gap_advice = "Use durable_slot=True so that no change is lost to a reconnect or a stop."
        self.after_stop = False  # the next session follows a stop(), not a lost connection
        self.transactions_handled = 0
        self.events_handled = 0
        self.replays_dropped = 0
        self.stats = Stats()  # walex.observe: standby, takeovers, what metrics read
        self.observer: Any = None  # set by walex.observe: wraps dispatch per batch
        self.counting: Any = None  # walex.observe.Stats when it only counts (no tracing)
        self.reached_ahead = 0  # batches at the queue's front counting.reached already (handoff)
        # the commit LSN of the last transaction queued whole from the stream, kept across a
        # reconnect: a new session sends those again, and they are queued or handled already
        # (0 once what was queued is dropped: it must come again)
        self.queued_upto = 0
        self.replayed_upto = 0  # queued_upto when the session began: what it sends again up to it
        self.discards = 0  # queues dropped (discard_unhandled): a running backfill job stops
        # standby=True: the lock that lets one instance at a time handle (walex.standby),
        # made by the first session that has the option (``walex run --standby`` sets it late)
        self.fence: standby.Fence | None = None
        self.abandoning = False  # the fence was lost: handle nothing until it is held again
        self.dispatching: asyncio.Task[None] | None = None  # the fenced dispatcher loop
        self.released: tuple[int, int] | None = None  # (lag, limit) when the lag guard released

    # -- configuration that may change while running ----------------------

    def _is_subscribed(self, schema: str, table: str) -> bool:
        if self.backfill.excludes(schema, table):  # the backfill progress store
            return False
        return any(match(schema, table) for match in self._subscribed)

    def _is_raw(self, schema: str, table: str) -> bool:
        """Whether the hot path keeps the table's rows as sent, typed when read
        (walex.rawevent): as ``raw_rows`` says, or by default when the app publishes to
        destinations and no handler takes the table (its rows would be typed for nobody)."""
        asked = self.settings.raw_rows
        if asked is not None:
            return asked
        return bool(getattr(self.destinations, "items", None)) and not any(
            h.matches_table(schema, table) for h in self.dispatcher.handlers)

    def set_subscriptions(self, subscriptions: list[str]) -> None:
        """Subscribe to ``subscriptions`` from the next transaction: while a session
        reads, the reader applies them once no transaction is open (one half read
        under the old ones would otherwise lose, or gain, the rest of its rows)."""
        self._subscriptions_due = [table_matcher(s) for s in subscriptions]
        if not self.reading:
            self.apply_subscriptions()

    def apply_subscriptions(self, between: bool = False) -> None:
        """Take the subscriptions :meth:`set_subscriptions` left due; ``between``: only if
        no transaction is open, plain or streamed (a prepared one was read whole)."""
        if between and self.assembler.reading:
            return
        due = self._subscriptions_due
        if due is not self._subscribed:
            self._subscribed = due
            self.relations.refresh_subscriptions()

    # -- sessions (walex.session) ------------------------------------------

    @property
    def connection(self) -> psycopg.AsyncConnection | None:
        """The session's replication connection (its ``info`` names the server), if open."""
        repl = self.repl
        return repl.conn if repl is not None and not repl.conn.closed else None

    async def open_session(self) -> None:
        """Connect, check, create or reuse the slot, and start streaming (:mod:`walex.session`)."""
        await session.open_session(self)

    def note_stop(self, failure: BaseException | None) -> None:
        """At stop: record what a temporary slot takes along (:func:`walex.session.note_stop`)."""
        session.note_stop(self, failure)

    async def close_session(self) -> None:
        await session.close_session(self)

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
            if self.fence is not None and not self.abandoning:
                try:  # finish what was received only while still the one instance handling
                    await self.fence.check()
                except ReplicationError as exc:
                    standby.abandon(self, str(exc))
            if self.abandoning:  # the fence was lost: what was received is not handled here
                self.discard_unhandled()
                # the slot stays ours (no other instance can stream) until an abandoned
                # handler call on the handlers' thread has returned
                await self.dispatcher.workers.idle()
            elif not self.settings.durable_slot:
                # a temporary slot went with the connection: nothing to hold, and the next
                # one starts later (the gap is counted from what was handled)
                await self._drain()
            # else the batches received go on being handled while the reader takes its slot
            # back at once: a free slot would let another instance stream the changes
            # handled here meanwhile (what the new session sends again of them is dropped
            # as already queued: queued_upto)
            await self.close_session()
            while True:
                attempts += 1
                if attempts > self.settings.reconnect_max_attempts:
                    raise ReplicationError(
                        f"gave up reconnecting to {self.settings.display_target()} after "
                        f"{attempts - 1} attempts"
                    )
                # the exponent capped: 2**1024 as a float raises OverflowError
                backoff = min(self.settings.reconnect_backoff_max,
                              0.2 * 2 ** min(attempts - 1, 64))
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
        self.reading = True  # a subscription change waits for the transaction read to end
        try:
            await self._read_frames()
        finally:
            self.reading = False
            self.apply_subscriptions()

    async def _read_frames(self) -> None:
        repl, ack = self.repl, self.ack
        assert repl is not None
        decoder = Decoder()
        header = XLOGDATA_POSITIONS.unpack_from
        middleware = self.settings.message_middleware
        hot = hot_path(self.assembler, decoder) if middleware is None else None
        self.compiled_path = hot is not None  # for tests and diagnostics
        process, feed, queue = self.process, self.assembler.feed, self.queue
        items, most = queue.items, queue.limit
        sizer, assembler, batch_memory = self.sizer, self.assembler, self.batch_memory
        measure, wire = sizer.measure, sizer.wire
        backfill = self.backfill
        interval, limit = self.settings.status_interval, self.silence_limit
        silent_since: float | None = None
        # a reconnect's queue was kept: what this session sends again of it is not queued twice
        replayed_upto = self.replayed_upto = self.queued_upto
        scale = 0.0  # the memory per wire byte batch_bytes was last set from (never 0)
        while True:
            if self.abandoning:
                raise ReplicationError(_ABANDONED, retriable=True)
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
            if self._subscriptions_due is not self._subscribed:
                self.apply_subscriptions(between=True)  # between transactions only
            if failpoints.ACTIVE:
                failpoints.hit("after_frames")
            i, count = 0, len(frames)
            while i < count:
                # -- the compiled hot path (walex.hotpath): a run of Begin/Insert/Update/Delete/
                # Commit frames per call, building no more batches than the queue takes at once
                if hot is not None and (
                    (batches := hot.feed_frames(frames, i, most - len(items),
                                                wire(queue.max_bytes - queue.bytes))) is not None
                    or hot.pos > i
                ):
                    i = hot.pos
                    end = hot.end
                    frame = None
                    ack.after_flight = 0  # changes after the keepalive: it waits for them
                else:
                    frame = frames[i]
                    i += 1
                # -- the pure-Python path: every frame when hot is None, else the others
                if frame is None:
                    pass
                elif frame[0] == _XLOGDATA:
                    ack.after_flight = 0
                    if len(frame) < 25:
                        raise ReplicationError(f"truncated XLogData frame of {len(frame)} bytes")
                    start, end = header(frame)
                    msg = decoder.decode(frame[25:], start)
                    batches = None
                    if middleware is None:
                        kind = type(msg)
                        if kind is Relation or kind is Type:
                            await process(msg, start)
                        elif kind is LogicalMessage:
                            backfill.message(msg)  # type: ignore[arg-type]
                        else:  # no coroutine per message
                            batches = feed(msg, start, len(frame))  # frame size: the byte bound's unit
                    else:
                        self.held_by_middleware += 1
                        result = middleware(msg, self.owner)
                        if inspect.isawaitable(result):
                            await result
                elif frame[0] == _KEEPALIVE:
                    keepalive = parse_keepalive(frame)
                    ack.saw(keepalive.wal_end)
                    if self.idle:
                        ack.idle_at(keepalive.wal_end)
                    elif keepalive.wal_end > ack.after_flight:
                        ack.after_flight = keepalive.wal_end
                    if keepalive.reply_requested:
                        ack.request()
                    continue
                else:
                    raise ReplicationError(f"unexpected replication frame type {chr(frame[0])!r}")
                if batches is not None:  # committed batches, from either path, to the queue
                    for txn in batches:
                        measure(txn)  # its size in memory, not on the wire (walex.sizes)
                        if sizer.scale != scale:  # the ratio measured changed (or first batch)
                            scale = sizer.scale
                            assembler.batch_bytes = wire(batch_memory)
                        if backfill.window is not None:  # a backfill runs
                            await backfill.batch(txn)
                        if txn.commit_lsn < ack.flushed or txn.commit_lsn <= replayed_upto:
                            self._replayed(txn)
                            continue
                        if len(items) < most and queue.bytes <= queue.max_bytes:  # room
                            items.append(txn)
                            queue.bytes += txn.size
                        else:
                            queue.wake()
                            await queue.put(txn)
                            if self.abandoning:
                                raise ReplicationError(_ABANDONED, retriable=True)
                        if txn.last:
                            self.queued_upto = txn.commit_lsn
                    queue.wake()  # the dispatcher, if it waits for a batch
                    if self._subscriptions_due is not self._subscribed:
                        self.apply_subscriptions(between=True)  # between transactions only
                if end > ack.received:  # ack.saw(end)
                    ack.received = end

    @property
    def held_back(self) -> bool:
        """Whether the reader waits for room in the queue (the handlers are the bottleneck)."""
        return self.queue._reader_waits

    @property
    def busy(self) -> bool:
        """Whether a batch is being dispatched, or waits in a window for its confirmations."""
        return self.in_hand is not None or bool(self.window)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the batches queued or in hand (what ``max_pending_bytes`` bounds)."""
        return self.queue.bytes

    def discard_unhandled(self) -> int:
        """At stop: forget the batches received but not handled; how many were queued."""
        count = self.queue.clear()
        self.discards += 1
        self.backfill.discarded(self.ack.flushed)
        self.queued_upto = self.replayed_upto = 0  # what was dropped must come again
        self.dispatcher.drop_pending()  # events kept for max_batch handlers, unacknowledged
        self.reached_ahead = 0
        self.in_hand = None
        self.window = None  # its batches were not acknowledged: delivered again
        return count

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
            before = self.relations.known(msg.relation_id)  # type: ignore[union-attr]
            table = await self.relations.update(msg)  # type: ignore[arg-type]
            if before is not None and before.qualified_name != table.qualified_name:
                loss, message = renamed(before, table, self.dispatcher.handlers,
                                        self.settings.subscriptions)
                log.log(logging.WARNING if loss else logging.INFO, "walex %r: %s",
                        self.settings.name, message)
            return
        if kind is Type:
            await self.catalog.resolve([msg.type_oid])  # type: ignore[union-attr]
            return
        if kind is LogicalMessage:
            self.backfill.message(msg)  # type: ignore[arg-type]
            return
        batches = self.assembler.feed(msg, lsn, _row_bytes(msg) if from_middleware else 0)
        if self._subscriptions_due is not self._subscribed:
            self.apply_subscriptions(between=True)  # between transactions only
        if batches is None:
            return
        for txn in batches:
            self.sizer.measure(txn)  # its size in memory (walex.sizes)
            self.assembler.batch_bytes = self.sizer.wire(self.batch_memory)
            if self.backfill.window is not None:
                await self.backfill.batch(txn)
            if txn.commit_lsn < self.ack.flushed or txn.commit_lsn <= self.replayed_upto:
                self._replayed(txn)
            else:
                await self.queue.put(txn)
                if txn.last:
                    self.queued_upto = txn.commit_lsn

    def _replayed(self, txn: Transaction) -> None:
        """Committed before what was acknowledged: a replay after a reconnect."""
        if txn.last:
            self.replays_dropped += 1
            log.debug("dropped replayed transaction committed at %s", format_lsn(txn.commit_lsn))

    async def run_dispatcher(self) -> None:
        """Dispatch the queued batches in order; returns when ``closing``, after the one in hand."""
        if self.fence is None:
            await run_dispatcher(self)  # walex.handoff
        else:  # as a task the fence can cancel (walex.standby)
            await standby.fenced_dispatcher(self)

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
            if self.lookups.ready:
                try:
                    await self.lookups.fetch(
                        "SELECT pg_logical_emit_message(false, 'walex.heartbeat', '')"
                    )
                except (psycopg.Error, ReplicationError) as exc:
                    log.debug("heartbeat failed: %s", exc)


def _row_bytes(msg: Message) -> int:
    """The bytes of a change's row values, for messages given back by a middleware.

    The reader counts the received frame instead; a message a middleware hands
    back comes without it, so its values are counted (off the hot path).
    """
    size = 0
    for row in (getattr(msg, "new", None), getattr(msg, "old", None)):
        if row is not None:
            for value in row.values:
                if isinstance(value, bytes):  # text, or BinaryValue
                    size += len(value)
    return size
