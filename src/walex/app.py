"""``WalEx``: one CDC pipeline from a publication to the handlers, and its lifecycle.

Data flows one way::

    ReplicationConnection.read  -> Decoder.decode -> RelationCache / TransactionAssembler
        -> bounded queue -> Dispatcher.dispatch -> AckTracker.handled -> status update

Three tasks run while the app is started: the reader (socket to queue), the
dispatcher (queue to handlers, one transaction at a time) and the
acknowledger (status updates). The queue is bounded, so slow handlers stop
the reader instead of growing memory, while the acknowledger keeps answering
the server.

Invariants: a transaction is acknowledged only after its dispatch returned;
the flush position never goes backwards; when :meth:`WalEx.start` returns the
slot exists and streaming has begun, so every change committed afterwards is
delivered; a failure in any task stops the app without acknowledging the
transaction in hand and is raised from :meth:`WalEx.wait` / :meth:`WalEx.run`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from typing import Any

import psycopg

from .ack import AckTracker
from .checks import Preflight, preflight
from .config import WalExSettings, load_settings
from .dispatch import Dispatcher
from .errors import ReplicationError, SetupError, WalExError, redact
from .handlers import table_matcher
from .lsn import format_lsn, parse_lsn
from .modules import resolve_modules
from .pgoutput import Decoder, Relation, Type
from .pgtypes import TypeCatalog
from .relations import RelationCache
from .replication.frames import XLOGDATA_HEADER, parse_keepalive
from .replication.stream import ReplicationConnection
from .transactions import Transaction, TransactionAssembler

__all__ = ["WalEx"]

log = logging.getLogger("walex")

_XLOGDATA, _KEEPALIVE = ord("w"), ord("k")


class WalEx:
    """Stream the changes of a publication into handler modules.

    Options are those of :class:`~walex.config.WalExSettings`; a bad option
    raises :class:`~walex.errors.ConfigError` listing every problem.
    """

    def __init__(self, url: str | None = None, **options: Any) -> None:
        if url is not None:
            options["url"] = url
        self.settings: WalExSettings = load_settings(**options)
        self._secret = self.settings.secret()
        self.modules = resolve_modules(
            self.settings.modules, self.settings.name, self.settings.subscriptions
        )
        self.slot_name = self.settings.slot_name or self._default_slot_name()
        self.dispatcher = Dispatcher(self.modules)
        self.preflight: Preflight | None = None
        self._admin: psycopg.AsyncConnection | None = None
        self._repl: ReplicationConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Transaction] = asyncio.Queue(self.settings.max_pending_transactions)
        self._busy = False
        self._stopped = asyncio.Event()
        self._error: BaseException | None = None
        self.ack = AckTracker(interval=self.settings.status_interval)
        self.transactions_handled = 0

    def __repr__(self) -> str:
        return f"<WalEx {self.settings.name!r} {self.settings.display_target()} slot={self.slot_name!r}>"

    def _default_slot_name(self) -> str:
        base = "".join(c if c.isalnum() else "_" for c in self.settings.name.lower())[:40]
        if self.settings.durable_slot:
            return f"{base}_walex"
        return f"{base}_walex_{secrets.token_hex(4)}"

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Check the setup, create the slot, start streaming; returns once streaming."""
        s = self.settings
        conninfo = s.conninfo()
        try:
            self._admin = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise SetupError(
                f"cannot connect to {s.display_target()}: {redact(str(exc), self._secret)}"
            ) from None
        try:
            self.preflight = await preflight(self._admin, s.publication, s.subscriptions)
            await self._start_stream(conninfo)
        except BaseException:
            await self._close_connections()
            raise
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="walex-reader"),
            asyncio.create_task(self._dispatch_loop(), name="walex-dispatcher"),
            asyncio.create_task(self._ack_loop(), name="walex-ack"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        log.info(
            "walex %r streaming publication %r from %s via slot %r (%s)",
            s.name, s.publication, s.display_target(), self.slot_name,
            "durable" if s.durable_slot else "temporary",
        )

    async def _start_stream(self, conninfo: str) -> None:
        s = self.settings
        assert self.preflight is not None and self._admin is not None
        catalog = TypeCatalog(self._admin)
        subscribed = [table_matcher(spec) for spec in s.subscriptions]
        self.relations = RelationCache(
            catalog, self.preflight.database,
            lambda schema, table: any(m(schema, table) for m in subscribed),
        )
        self.assembler = TransactionAssembler(self.relations)
        self._repl = await ReplicationConnection.connect(conninfo, self._secret)
        slot = await self._repl.create_slot(self.slot_name, temporary=not s.durable_slot)
        start = slot.consistent_point
        if not slot.created:
            cur = await self._admin.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot_name,),
            )
            row = await cur.fetchone()
            start = parse_lsn(row[0]) if row and row[0] else 0
        self.ack.flushed = self.ack.received = start
        options = {
            "proto_version": "2" if s.streaming else "1",
            "publication_names": '"' + s.publication.replace('"', '""') + '"',
        }
        if s.streaming:
            options["streaming"] = "on"
        await self._repl.start(self.slot_name, start, options)
        log.debug("START_REPLICATION %s at %s", self.slot_name, format_lsn(start))

    async def stop(self) -> None:
        """Finish the transaction in hand, acknowledge it, and disconnect."""
        if not self._tasks:
            await self._close_connections()
            return
        reader, dispatcher, acker = self._tasks
        reader.cancel()
        if self._busy and not dispatcher.done():
            # let the transaction in hand finish so its acknowledgement is sent
            await asyncio.wait([dispatcher], timeout=30)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._repl is not None and self._repl.streaming:
            try:
                await self.ack.send(self._repl)
            except WalExError as exc:
                log.warning("final acknowledgement not sent: %s", exc)
        await self._close_connections()
        self._stopped.set()

    async def _close_connections(self) -> None:
        for conn in (self._repl, self._admin):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # pragma: no cover - closing a broken connection
                    pass
        self._repl = self._admin = None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopped.is_set():
            return
        exc = task.exception()
        if exc is not None and self._error is None:
            self._error = exc
            log.error("walex %r stopped: %s", self.settings.name, exc)
            asyncio.get_running_loop().create_task(self.stop())

    async def wait(self) -> None:
        """Wait until the app stops; raises the error that stopped it, if any."""
        await self._stopped.wait()
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> WalEx:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
        if self._error is not None and exc_info[0] is None:
            raise self._error

    def run(self) -> None:
        """Run until SIGINT/SIGTERM (clean stop) or a failure (raised)."""
        asyncio.run(self._run_until_signal())

    async def _run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.stop()))
        try:
            await self.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    # -- the pipeline ----------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._repl is not None
        repl, ack, queue = self._repl, self.ack, self._queue
        decoder, feed, relations = Decoder(), self.assembler.feed, self.relations
        header = XLOGDATA_HEADER.unpack_from
        while True:
            for frame in await repl.read():
                tag = frame[0]
                if tag == _XLOGDATA:
                    _, start, end, _ = header(frame)
                    msg = decoder.decode(frame[25:], start)
                    kind = type(msg)
                    if kind is Relation:
                        await relations.update(msg)  # type: ignore[arg-type]
                    elif kind is Type:
                        await relations.catalog.resolve([msg.type_oid])  # type: ignore[union-attr]
                    else:
                        txn = feed(msg, start)
                        if txn is not None and txn.end_lsn > ack.flushed:
                            await queue.put(txn)
                    ack.saw(end)
                elif tag == _KEEPALIVE:
                    keepalive = parse_keepalive(frame)
                    ack.saw(keepalive.wal_end)
                    if self.assembler.idle and queue.empty() and not self._busy:
                        ack.idle_at(keepalive.wal_end)
                    if keepalive.reply_requested:
                        ack.request()
                else:
                    raise ReplicationError(f"unexpected replication frame type {chr(tag)!r}")

    async def _dispatch_loop(self) -> None:
        queue, dispatch, ack = self._queue, self.dispatcher.dispatch, self.ack
        while True:
            txn = await queue.get()
            self._busy = True
            await dispatch(txn)
            ack.handled(txn.end_lsn)
            self._busy = False
            self.transactions_handled += 1

    async def _ack_loop(self) -> None:
        assert self._repl is not None
        await self.ack.run(self._repl)
