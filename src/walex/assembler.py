"""Assemble decoded pgoutput messages into committed transactions, in batches.

:class:`~walex.transactions.Transaction` (the batches it hands on) lives in
:mod:`walex.transactions`, which imports none of this: a worker, whose
transactions come from a broker, dispatches them without loading the
pgoutput row typing (:mod:`walex.relations`, psycopg).

Input: every message of the stream in order (Relation and Type messages are
applied to the relation cache by the caller before they reach here). Output:
:class:`Transaction` batches: the events of one committed transaction in WAL
order, at most ``batch_size`` per batch and about ``batch_bytes`` of them
(the sizes of the pgoutput messages they came from, given to :meth:`feed`), the
last batch flagged ``last``; a change is never split, so one wider than
``batch_bytes`` ends its batch.

Handles plain transactions (Begin ... Commit), streamed ones (protocol 2+:
chunks between Stream Start/Stop, possibly interleaved, finished by Stream
Commit or dropped, in whole or per subtransaction, by Stream Abort) and
two-phase ones (Begin Prepare ... Prepare, then Commit/Rollback Prepared).

Invariants:
- memory is bounded by ``batch_size`` events and ``batch_bytes`` bytes per
  open transaction: a plain transaction is already committed when the server
  sends it (protocol 1 sends at commit), so its full batches are handed on
  before its Commit message; a streamed one spills to disk (:mod:`walex.spill`)
  until Stream Commit: the raw decoded changes, typed after reading back with
  the table definition that was current when each change was made, in batches
  of its average change size;
- :attr:`Transaction.size` is what a batch's changes took on the wire (one
  integer add per change), and ``batch_bytes`` is in the same unit: the
  pipeline turns it into the events' size in memory (:mod:`walex.sizes`) and
  sets ``batch_bytes`` from the memory per wire byte it measured;
- nothing of a transaction is handed on before it is known to be committed,
  and aborted subtransactions' changes never are;
- a change's position is its index among the transaction's surviving changes,
  counting changes of tables that are not subscribed and one per table of a
  TRUNCATE, so ``Event.id`` (commit LSN and position) is the same whether the
  transaction arrived streamed or whole and whatever the subscriptions;
- :attr:`TransactionAssembler.idle` is true only when no transaction is open,
  so an acknowledgement of the server's WAL end cannot skip a change.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from .errors import DecodeError
from .event import Event
from .lsn import format_lsn
from .pgoutput import messages as m
from .rawevent import change_event
from .records import Record
from .relations import RelationCache, Table
from .rows import truncate_event
from .spill import Spill
from .transactions import Transaction

__all__ = ["TransactionAssembler"]

_TAGS = {m.Insert: "I", m.Update: "U", m.Delete: "D", m.Truncate: "T"}


@dataclass(slots=True, repr=False, eq=False)
class _Open(Record):
    """A transaction being received."""

    xid: int
    commit_lsn: int = 0  # known at Begin for plain transactions
    commit_time: datetime | None = None
    changes: list[Event | None] = field(default_factory=list)
    emitted: int = 0  # changes already handed on in earlier batches
    origin: str | None = None
    spill: Spill | None = None  # streamed and prepared transactions
    size: int = 0  # message bytes of `changes` (of everything held, when spilled)
    held: int = 0  # changes written to the spill


class TransactionAssembler:
    """Feeds on messages; returns the batches each message completes."""

    # slots: walex._hotpath reads and writes this state directly
    __slots__ = ("relations", "batch_size", "batch_bytes", "spill_dir", "_current", "_streams",
                 "_stream", "_prepared", "spilled_events")

    def __init__(
        self, relations: RelationCache, batch_size: int = 1000, spill_dir: str | None = None,
        batch_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.relations = relations
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.spill_dir = spill_dir
        self._current: _Open | None = None  # Begin/Begin Prepare ... Commit/Prepare
        self._streams: dict[int, _Open] = {}  # streamed, by top-level xid
        self._stream: _Open | None = None  # inside Stream Start ... Stream Stop
        self._prepared: dict[str, _Open] = {}  # two-phase, by gid
        self.spilled_events = 0  # changes of held transactions written to disk

    @property
    def idle(self) -> bool:
        return self._current is None and not self._streams and not self._prepared

    @property
    def reading(self) -> bool:
        """A transaction is read in part: its Begin (or a stream's start) came, its end not
        yet (a prepared one, read whole, awaiting COMMIT PREPARED, does not count)."""
        return self._current is not None or bool(self._streams)

    def feed(self, msg: m.Message, lsn: int, size: int = 0) -> Iterable[Transaction] | None:
        """``size``: bytes of the message as received, counted towards ``batch_bytes``."""
        kind = type(msg)
        if kind is m.Insert or kind is m.Update or kind is m.Delete or kind is m.Truncate:
            return self._change(msg, lsn, size)  # type: ignore[arg-type]
        if kind is m.Begin:
            self._expect_closed("Begin", lsn)
            self._current = _Open(msg.xid, msg.final_lsn, msg.commit_time)  # type: ignore[union-attr]
        elif kind is m.Commit:
            txn = self._take_current("Commit", lsn)
            return [self._batch(txn, msg.commit_lsn, msg.commit_time, msg.end_lsn)]  # type: ignore[union-attr]
        elif kind is m.StreamStart:
            xid = msg.xid  # type: ignore[union-attr]
            stream = self._streams.get(xid)
            if stream is None:
                stream = self._streams[xid] = _Open(xid, spill=self._new_spill())
            self._stream = stream
        elif kind is m.StreamStop:
            self._stream = None
        elif kind is m.StreamAbort:
            self._abort_stream(msg)  # type: ignore[arg-type]
        elif kind is m.StreamCommit:
            txn = self._streams.pop(msg.xid, None) or _Open(msg.xid, spill=self._new_spill())  # type: ignore[union-attr]
            return self._replay(txn, msg.commit_lsn, msg.commit_time, msg.end_lsn)  # type: ignore[union-attr]
        elif kind is m.Origin:
            if self._current is not None:
                self._current.origin = msg.name  # type: ignore[union-attr]
        elif kind is m.BeginPrepare:
            self._expect_closed("Begin Prepare", lsn)
            self._current = _Open(msg.xid, spill=self._new_spill())  # type: ignore[union-attr]
        elif kind is m.Prepare:
            self._prepared[msg.gid] = self._take_current("Prepare", lsn)  # type: ignore[union-attr]
        elif kind is m.StreamPrepare:
            self._prepared[msg.gid] = (  # type: ignore[union-attr]
                self._streams.pop(msg.xid, None) or _Open(msg.xid, spill=self._new_spill())  # type: ignore[union-attr]
            )
        elif kind is m.CommitPrepared:
            txn = self._prepared.pop(msg.gid, None)  # type: ignore[union-attr]
            if txn is None:
                raise DecodeError(
                    f"Commit Prepared for unknown transaction {msg.gid!r} at LSN "  # type: ignore[union-attr]
                    f"{format_lsn(lsn)}: its Prepare was not received in this session",
                    tag="K", lsn=lsn,
                )
            return self._replay(txn, msg.commit_lsn, msg.commit_time, msg.end_lsn)  # type: ignore[union-attr]
        elif kind is m.RollbackPrepared:
            txn = self._prepared.pop(msg.gid, None)  # type: ignore[union-attr]
            if txn is not None and txn.spill is not None:
                txn.spill.close()
        # Relation, Type and non-transactional logical messages carry no change.
        return None

    def reset(self) -> None:
        """Forget open transactions (after a reconnect the server resends them)."""
        for txn in [self._current, *self._streams.values(), *self._prepared.values()]:
            if txn is not None and txn.spill is not None:
                txn.spill.close()
        self._current = self._stream = None
        self._streams.clear()
        self._prepared.clear()

    # -- internals -------------------------------------------------------

    def _new_spill(self) -> Spill:
        return Spill(self.batch_size, self.spill_dir)

    def _expect_closed(self, what: str, lsn: int) -> None:
        if self._current is not None:
            raise DecodeError(
                f"{what} at LSN {format_lsn(lsn)} while transaction {self._current.xid} is open",
                lsn=lsn,
            )

    def _take_current(self, what: str, lsn: int) -> _Open:
        txn = self._current
        if txn is None:
            raise DecodeError(f"{what} at LSN {format_lsn(lsn)} without a Begin", lsn=lsn)
        self._current = None
        return txn

    def _abort_stream(self, msg: m.StreamAbort) -> None:
        txn = self._streams.get(msg.xid)
        if txn is None or txn.spill is None:
            return
        if msg.subxid == msg.xid:
            del self._streams[msg.xid]
            txn.spill.close()
        else:
            txn.spill.abort(msg.subxid)

    def _change(
        self, msg: m.Insert | m.Update | m.Delete | m.Truncate, lsn: int, size: int
    ) -> list[Transaction] | None:
        txn = self._stream or self._current
        if txn is None:
            raise DecodeError(
                f"{type(msg).__name__} at LSN {format_lsn(lsn)} outside of any transaction",
                tag=_TAGS[type(msg)], lsn=lsn,
            )
        relations = self.relations
        kind = type(msg)
        if txn.spill is not None:
            txn.held += self._hold(txn, txn.spill, msg, lsn)
            txn.size += size  # for the batch sizes of the read back (see _replay)
            return None
        if kind is not m.Truncate:
            table = relations.get(msg.relation_id, _TAGS[kind], lsn)  # type: ignore[union-attr]
            new: list[Event | None] = [change_event(table, msg, lsn) if table.subscribed else None]  # type: ignore[arg-type]
        else:
            new = []
            for rid in msg.relation_ids:  # type: ignore[union-attr]
                table = relations.get(rid, "T", lsn)
                new.append(truncate_event(table) if table.subscribed else None)
        txn.changes.extend(new)
        txn.size += size
        # a batch ends at batch_size changes or batch_bytes bytes, whichever comes first
        if len(txn.changes) >= self.batch_size or txn.size >= self.batch_bytes:
            assert txn.commit_time is not None
            return [self._batch(txn, txn.commit_lsn, txn.commit_time, 0)]
        return None

    def _hold(
        self, txn: _Open, spill: Spill, msg: m.Insert | m.Update | m.Delete | m.Truncate, lsn: int
    ) -> int:
        """Keep a change of a held transaction, untyped: ``(table number, message, lsn)``,
        or ``None`` for a change of a table that is not subscribed (it keeps its position).
        Returns the number of changes kept (one per table of a TRUNCATE)."""
        subxid = msg.xid or txn.xid
        if type(msg) is m.Truncate:
            for rid in msg.relation_ids:
                table = self.relations.get(rid, "T", lsn)
                spill.append(subxid, (spill.keep(table), None, lsn) if table.subscribed else None)
            return len(msg.relation_ids)
        table = self.relations.get(msg.relation_id, _TAGS[type(msg)], lsn)
        spill.append(subxid, (spill.keep(table), msg, lsn) if table.subscribed else None)
        return 1

    def _batch(self, txn: _Open, commit_lsn: int, commit_time: datetime, end_lsn: int) -> Transaction:
        """Hand on the changes collected so far; ``end_lsn`` non-zero marks the last batch."""
        changes, first, size = txn.changes, txn.emitted, txn.size
        txn.changes = []
        txn.emitted = first + len(changes)
        txn.size = 0
        return Transaction(
            txn.xid, commit_lsn, end_lsn, commit_time,
            _stamp(changes, first, commit_lsn, commit_time), txn.origin, last=end_lsn != 0,
            size=size,
        )

    def _replay(
        self, txn: _Open, commit_lsn: int, commit_time: datetime, end_lsn: int
    ) -> Iterator[Transaction]:
        """The batches of a held (streamed or prepared) transaction, read back lazily.

        The spill keeps no per-change size: a change counts as the average
        size of the transaction's changes, so batches of wide rows are cut
        by bytes as in :meth:`_change`.
        """
        spill = txn.spill
        assert spill is not None
        self.spilled_events += spill.spilled
        tables = spill.kept
        average = txn.size // txn.held if txn.held else 0
        limit = self._replay_limit(average)
        for held in spill.replay():
            txn.changes.append(None if held is None else _typed(tables[held[0]], held[1], held[2]))
            if len(txn.changes) >= limit:
                txn.size = average * limit
                yield self._batch(txn, commit_lsn, commit_time, 0)
                limit = self._replay_limit(average)  # batch_bytes may have changed meanwhile
        txn.size = average * len(txn.changes)
        yield self._batch(txn, commit_lsn, commit_time, end_lsn)

    def _replay_limit(self, average: int) -> int:
        """Changes per batch read back, for changes of ``average`` bytes."""
        if not average:
            return self.batch_size
        return max(1, min(self.batch_size, -(-self.batch_bytes // average)))


def _typed(table: Table, msg: m.Insert | m.Update | m.Delete | None, lsn: int) -> Event:
    """The event of a held change (``None``: one table of a TRUNCATE)."""
    if msg is None:
        return truncate_event(table)
    return change_event(table, msg, lsn)


def _stamp(changes: list[Event | None], first: int, commit_lsn: int, commit_time: datetime) -> list[Event]:
    """Set timestamp, lsn and id of the events; position counts every change."""
    lsn = format_lsn(commit_lsn)
    prefix = f"{commit_lsn:016X}-"
    events = []
    for position, event in enumerate(changes, first):
        if event is not None:
            event.timestamp = commit_time
            event.lsn = lsn
            event.id = f"{prefix}{position:08X}"
            events.append(event)
    return events
