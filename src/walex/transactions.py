"""Assemble decoded pgoutput messages into committed :class:`Transaction` s.

Input: every message of the stream in order (Relation and Type messages are
applied to the relation cache by the caller before they reach here). Output:
one :class:`Transaction` per commit, its events in WAL order.

Handles plain transactions (Begin ... Commit), streamed ones (protocol 2+:
chunks between Stream Start/Stop, possibly interleaved, finished by Stream
Commit or dropped, in whole or per subtransaction, by Stream Abort) and
two-phase ones (Begin Prepare ... Prepare, then Commit/Rollback Prepared).

Invariants:
- a transaction is emitted only at its commit, whole, with every aborted
  subtransaction's changes removed;
- a change's position is its index among the transaction's surviving changes,
  counting changes of tables that are not subscribed and one per table of a
  TRUNCATE, so ``Event.id`` is the same whether the transaction arrived
  streamed or whole and whatever the subscriptions;
- :attr:`TransactionAssembler.idle` is true only when no transaction is open,
  so an acknowledgement of the server's WAL end cannot skip a change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import DecodeError
from .event import Change, Event, EventType
from .lsn import format_lsn
from .pgoutput import messages as m
from .relations import RelationCache, Table

__all__ = ["Transaction", "TransactionAssembler"]

_INSERT, _UPDATE, _DELETE, _TRUNCATE = (
    EventType.INSERT, EventType.UPDATE, EventType.DELETE, EventType.TRUNCATE,
)


@dataclass(slots=True)
class Transaction:
    """A committed transaction and the events of its subscribed tables."""

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    events: list[Event]
    origin: str | None = None


@dataclass(slots=True)
class _Open:
    """A transaction being received: events, ``None`` for unsubscribed changes."""

    xid: int
    changes: list[Event | None] = field(default_factory=list)
    subxids: list[int] | None = None  # per change, for streamed transactions
    origin: str | None = None


class TransactionAssembler:
    """Feeds on messages, returns a :class:`Transaction` at each commit."""

    def __init__(self, relations: RelationCache) -> None:
        self.relations = relations
        self._current: _Open | None = None  # Begin/Begin Prepare ... Commit/Prepare
        self._streams: dict[int, _Open] = {}  # streamed, by top-level xid
        self._stream_xid: int | None = None  # inside Stream Start ... Stream Stop
        self._prepared: dict[str, _Open] = {}  # two-phase, by gid

    @property
    def idle(self) -> bool:
        return self._current is None and not self._streams and not self._prepared

    def feed(self, msg: m.Message, lsn: int) -> Transaction | None:
        kind = type(msg)
        if kind is m.Insert or kind is m.Update or kind is m.Delete or kind is m.Truncate:
            self._change(msg, lsn)  # type: ignore[arg-type]
            return None
        if kind is m.Begin:
            self._expect_closed("Begin", lsn)
            self._current = _Open(msg.xid)  # type: ignore[union-attr]
        elif kind is m.Commit:
            txn = self._take_current("Commit", lsn)
            return _finish(txn, msg.commit_lsn, msg.end_lsn, msg.commit_time)  # type: ignore[union-attr]
        elif kind is m.StreamStart:
            xid = msg.xid  # type: ignore[union-attr]
            self._stream_xid = xid
            if xid not in self._streams:
                self._streams[xid] = _Open(xid, subxids=[])
        elif kind is m.StreamStop:
            self._stream_xid = None
        elif kind is m.StreamAbort:
            self._abort_stream(msg)  # type: ignore[arg-type]
        elif kind is m.StreamCommit:
            txn = self._streams.pop(msg.xid, None) or _Open(msg.xid)  # type: ignore[union-attr]
            return _finish(txn, msg.commit_lsn, msg.end_lsn, msg.commit_time)  # type: ignore[union-attr]
        elif kind is m.Origin:
            if self._current is not None:
                self._current.origin = msg.name  # type: ignore[union-attr]
        elif kind is m.BeginPrepare:
            self._expect_closed("Begin Prepare", lsn)
            self._current = _Open(msg.xid)  # type: ignore[union-attr]
        elif kind is m.Prepare:
            self._prepared[msg.gid] = self._take_current("Prepare", lsn)  # type: ignore[union-attr]
        elif kind is m.StreamPrepare:
            self._prepared[msg.gid] = self._streams.pop(msg.xid, None) or _Open(msg.xid)  # type: ignore[union-attr]
        elif kind is m.CommitPrepared:
            txn = self._prepared.pop(msg.gid, None)  # type: ignore[union-attr]
            if txn is None:
                raise DecodeError(
                    f"Commit Prepared for unknown transaction {msg.gid!r} at LSN "  # type: ignore[union-attr]
                    f"{format_lsn(lsn)}: its Prepare was not received in this session",
                    tag="K", lsn=lsn,
                )
            return _finish(txn, msg.commit_lsn, msg.end_lsn, msg.commit_time)  # type: ignore[union-attr]
        elif kind is m.RollbackPrepared:
            self._prepared.pop(msg.gid, None)  # type: ignore[union-attr]
        # Relation, Type and non-transactional logical messages carry no change.
        return None

    def reset(self) -> None:
        """Forget open transactions (after a reconnect the server resends them)."""
        self._current = None
        self._streams.clear()
        self._stream_xid = None
        self._prepared.clear()

    # -- internals -------------------------------------------------------

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
        if txn is None:
            return
        if msg.subxid == msg.xid:
            del self._streams[msg.xid]
            return
        assert txn.subxids is not None
        keep = [i for i, sub in enumerate(txn.subxids) if sub != msg.subxid]
        txn.changes = [txn.changes[i] for i in keep]
        txn.subxids = [txn.subxids[i] for i in keep]

    def _change(self, msg: m.Insert | m.Update | m.Delete | m.Truncate, lsn: int) -> None:
        if self._stream_xid is not None:
            txn = self._streams[self._stream_xid]
        elif self._current is not None:
            txn = self._current
        else:
            tag = {m.Insert: "I", m.Update: "U", m.Delete: "D", m.Truncate: "T"}[type(msg)]
            raise DecodeError(
                f"{type(msg).__name__} at LSN {format_lsn(lsn)} outside of any transaction",
                tag=tag, lsn=lsn,
            )
        relations = self.relations
        if type(msg) is m.Truncate:
            new = [_truncate_event(relations.get(rid, "T", lsn)) for rid in msg.relation_ids]
        elif type(msg) is m.Insert:
            table = relations.get(msg.relation_id, "I", lsn)
            new = [_insert_event(table, msg, lsn) if table.subscribed else None]
        elif type(msg) is m.Update:
            table = relations.get(msg.relation_id, "U", lsn)
            new = [_update_event(table, msg, lsn) if table.subscribed else None]
        else:
            table = relations.get(msg.relation_id, "D", lsn)
            new = [_delete_event(table, msg, lsn) if table.subscribed else None]
        txn.changes.extend(new)
        if txn.subxids is not None:
            txn.subxids.extend([msg.xid or txn.xid] * len(new))


def _finish(txn: _Open, commit_lsn: int, end_lsn: int, commit_time: datetime) -> Transaction:
    lsn = format_lsn(commit_lsn)
    prefix = f"{end_lsn:016X}-"
    events = []
    for position, event in enumerate(txn.changes):
        if event is not None:
            event.timestamp = commit_time
            event.lsn = lsn
            event.id = f"{prefix}{position:08X}"
            events.append(event)
    return Transaction(txn.xid, commit_lsn, end_lsn, commit_time, events, txn.origin)


_NO_TIME: Any = None  # set at commit


def _event(table: Table, kind: EventType, new: Any, old: Any, changes: Any) -> Event:
    return Event(table.name, kind, table.source, new, old, changes, _NO_TIME, "", "")


def _truncate_event(table: Table) -> Event | None:
    return _event(table, _TRUNCATE, None, None, None) if table.subscribed else None


def _insert_event(table: Table, msg: m.Insert, lsn: int) -> Event:
    return _event(table, _INSERT, dict(zip(table.column_names, table.load(msg.new, "Insert", lsn))), None, None)


def _key_record(table: Table, values: list[Any]) -> dict[str, Any]:
    names = table.column_names
    return {names[i]: values[i] for i in table.key_indexes}


def _update_event(table: Table, msg: m.Update, lsn: int) -> Event:
    names = table.column_names
    new_values = table.load(msg.new, "Update", lsn)
    old_record = changes = None
    if msg.old is not None:
        old_values = table.load(msg.old, "Update", lsn)
        if msg.old_kind == "K":
            old_record = _key_record(table, old_values)
            # An unchanged TOASTed key is not resent, but the old key (sent
            # because it is TOASTed) holds its value.
            raw_new, raw_old = msg.new.values, msg.old.values
            for i in table.key_indexes:
                if raw_new[i] is m.UNCHANGED_TOAST and raw_old[i] is not m.UNCHANGED_TOAST:
                    new_values[i] = old_values[i]
        else:
            raw_new, raw_old = msg.new.values, msg.old.values
            changes = {}
            for i, raw in enumerate(raw_new):
                if raw is m.UNCHANGED_TOAST:
                    if raw_old[i] is not m.UNCHANGED_TOAST:
                        new_values[i] = old_values[i]  # not resent: same as before
                elif raw != raw_old[i] and raw_old[i] is not m.UNCHANGED_TOAST:
                    changes[names[i]] = Change(old_values[i], new_values[i])
            old_record = dict(zip(names, old_values))
    return _event(table, _UPDATE, dict(zip(names, new_values)), old_record, changes)


def _delete_event(table: Table, msg: m.Delete, lsn: int) -> Event:
    old_values = table.load(msg.old, "Delete", lsn)
    if msg.old_kind == "K":
        old_record = _key_record(table, old_values)
    else:
        old_record = dict(zip(table.column_names, old_values))
    return _event(table, _DELETE, None, old_record, None)

