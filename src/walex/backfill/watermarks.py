"""The watermark protocol: the stream side of a backfill (DBLog's method).

For each chunk the backfill task writes a *low* watermark, reads the chunk
in one snapshot, then writes a *high* watermark; each watermark is a
transactional logical decoding message (``pg_logical_emit_message(true,
'walex.backfill', payload)``, a transaction of its own). :class:`Window` sees
the stream in commit order, as the reader assembles it:

- it records the keys of the backfilled table's rows changed by each
  transaction of the stream since the backfill started, with the
  transaction's id, and forgets a transaction once a chunk's snapshot shows
  it (every later snapshot shows it too). Transactions the stream passed
  before the window opened are not recorded: the backfill task reads its
  first chunk only once each of them is visible to snapshots (the runner
  waits for a commit whose session still waits for a synchronous standby),
  so every chunk's snapshot shows them;
- keys are compared in the canonical form of :mod:`.keys` (arrays, ``jsonb``,
  ``NaN`` compare as PostgreSQL compares them);
- at the high watermark it leaves out of the chunk every row changed by a
  transaction after the low watermark, and every row changed before it by a
  transaction the chunk's snapshot does not show (one that had written its
  commit record but was not yet visible when the snapshot was taken, e.g.
  waiting for a synchronous standby: the stream has it, the snapshot not);
  such rows reach handlers from the stream with their newer values;
- the rest of the chunk becomes ``read`` events, put on the handlers' queue
  just before the high watermark's own (empty) transaction, as batches of
  that transaction: the high watermark is acknowledged only after they were
  handled;
- a row left out although a change of it the stream sent lacked a column (a
  TOASTed value an update left unchanged, under the default replica
  identity: the stream never sends it) is read again with a later chunk
  (:attr:`Outcome.again`), so its handlers still get every column.

A chunk is *redone* (read again, nothing emitted) when a change to the table
in its window cannot be tied to a key (a TRUNCATE, a key column missing from
the old row) or when the stream did not show its low watermark (a reconnect).

A durable slot's reconnect keeps the pipeline's queue and sends again what
was not acknowledged, the high watermark of a chunk whose reads are queued
included: :attr:`Window.sent` knows it, and its reads do not go out twice.
When the pipeline drops its queue (a standby lock lost:
:meth:`~walex.pipeline.Pipeline.discard_unhandled`) the runner stops the job
and the window goes with it: a later run reads again every chunk not marked
done (same ids for unchanged rows), whether or not the slot still holds its
watermarks (another instance may have moved it past them). A high watermark
whose transaction was cut off by a reconnect before its commit came counts
only when it comes again (the runner's
:meth:`~walex.backfill.runner.Backfills.batch` forgets it).

Read event ids are ``<commit LSN of the high watermark, 16 hex digits>-R<index
in the chunk's emission, 7 hex digits>``: never equal to a streamed id (whose
second part has 8 hex digits and no ``R``) and increasing in commit order
with them.

Reads of a chunk not marked done (the process killed, the standby lock lost)
are *replayed* as they were, where they were: the ids of emitted chunks not
yet marked done are kept in the progress store (:mod:`.store`), by a digest
of each row's key and ``xmin`` (the transaction that wrote the version read:
computed by the chunk's query, :meth:`~.target.Target.chunk_query`), written before those
reads are queued
(the reader waits for that: :attr:`Window.persisted`). The next run of the
job reads the rows after the last chunk marked done again and keeps those
still at the version emitted (:attr:`Window.replay`): identical rows. The
slot sends again what was not acknowledged, so a chunk whose reads were not
all handled comes with its high watermark's transaction again: the kept rows
go out just before it, under the ids they had, in their order, as streamed
changes are replayed (a consumer that drops ids it saw, or every id not above
the highest it saw, drops exactly the copies). The run's own chunks leave
those rows out (:attr:`Window.replayed`). A row that changed since is not
replayed: the stream sends its change after that transaction, and the run's
chunks read it anew, with a new id. When the stream does not send the high
watermark again (it was acknowledged, or the replay was not ready in time)
its rows are read anew too: duplicates under new ids, never a row lost.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..event import UNCHANGED_TOAST, EventType
from ..lsn import format_lsn
from ..records import Record
from ..transactions import Transaction
from .keys import canonical

if TYPE_CHECKING:
    from .chunks import Bound, Chunk
    from .target import Target

__all__ = ["PREFIX", "payload", "parse", "Window", "Outcome"]

PREFIX = "walex.backfill"

_UPDATE, _TRUNCATE = EventType.UPDATE, EventType.TRUNCATE


def payload(app: str, **fields: Any) -> str:
    """The content of a ``walex.backfill`` message for the app called ``app``."""
    return json.dumps({"app": app, **fields}, separators=(",", ":"))


def parse(content: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(slots=True, repr=False, eq=False)
class Outcome(Record):
    """What became of a chunk at its high watermark."""

    end_lsn: int = 0  # end of the high watermark's transaction: acknowledged after the reads
    emitted: int = 0
    dropped: int = 0  # rows left to the stream
    redo: str | None = None  # why the chunk must be read again
    # rows left to the stream whose streamed change lacked a column: read them again
    again: list[Bound] = field(default_factory=list)
    # the ids of the rows emitted, by version digest: the runner stores them, then sets
    # Window.persisted
    ids: dict[bytes, str] = field(default_factory=dict)


@dataclass(slots=True, repr=False, eq=False)
class _Changes(Record):
    """Keys of the table changed by the transactions of a stretch of the stream."""

    by_xid: dict[int, set[tuple[Any, ...]]] = field(default_factory=dict)
    unknown: dict[int, str] = field(default_factory=dict)  # xid -> why its keys are unknown
    # xid -> keys whose new row lacked a column (an unchanged TOASTed value)
    partial: dict[int, set[tuple[Any, ...]]] = field(default_factory=dict)

    def absorb(self, other: _Changes) -> None:
        for xid, keys in other.by_xid.items():
            self.by_xid.setdefault(xid, set()).update(keys)
        for xid, keys in other.partial.items():
            self.partial.setdefault(xid, set()).update(keys)
        self.unknown.update(other.unknown)

    def keep(self, other: _Changes, xid: int) -> None:
        """Take ``other``'s record of transaction ``xid``."""
        if xid in other.by_xid:
            self.by_xid.setdefault(xid, set()).update(other.by_xid[xid])
        if xid in other.partial:
            self.partial.setdefault(xid, set()).update(other.partial[xid])
        if xid in other.unknown:
            self.unknown[xid] = other.unknown[xid]


class Window:
    """The stream side of one backfill job (one table), chunk after chunk."""

    def __init__(self, app: str, run: str, target: Target, batch_size: int) -> None:
        self.app = app
        # reads of an earlier run of the job to replay: by the commit LSN of the high
        # watermark they went out with, (id, version digest, event) in id order
        self.replay: dict[int, list[tuple[str, bytes, Any]]] = {}
        self.replayed: dict[bytes, str] = {}  # version digest -> id of the rows replayed
        # set by the runner once the ids of the reads just emitted are stored; the reader
        # queues them only then (cancelled: they are not queued, a later run reads them)
        self.persisted: asyncio.Future[None] | None = None
        self.run = run
        self.schema, self.name = target.schema, target.name
        self.key = target.key
        self.batch_size = batch_size
        self.seq = 0
        self.low_seen = False
        self.high_seen = False
        self.chunk: Chunk | None = None
        self.outcome: asyncio.Future[Outcome] | None = None
        self._before = _Changes()  # since the previous high watermark, up to the low one
        self._after = _Changes()  # since the low watermark
        # the chunks emitted and not yet marked done: their high watermark's commit LSN ->
        # its end
        self.sent: dict[int, int] = {}

    # -- the backfill task's side -----------------------------------------

    def arm(self, seq: int) -> asyncio.Future[Outcome]:
        """Expect the watermarks of chunk ``seq``; the future tells what became of it."""
        self.seq = seq
        self.low_seen = self.high_seen = False
        self.chunk = None
        # a chunk given up (a reconnect): its window is before the next chunk's low watermark
        self._before.absorb(self._after)
        self._after = _Changes()
        self.outcome = asyncio.get_running_loop().create_future()
        return self.outcome

    def give_up(self) -> None:
        """The runner reads the armed chunk again: its high watermark emits nothing."""
        self.chunk = None
        self.high_seen = False

    def forget(self, end_lsn: int) -> None:
        """The chunk whose high watermark ends at ``end_lsn`` was marked done."""
        for commit_lsn, end in list(self.sent.items()):
            if end <= end_lsn:
                del self.sent[commit_lsn]

    def load(self, chunk: Chunk) -> None:
        """The chunk's rows, read after the low watermark and before the high one is written."""
        self.chunk = chunk

    # -- the stream's side (the reader, in stream order) --------------------

    def message(self, fields: dict[str, Any]) -> None:
        """A ``walex.backfill`` watermark of this app arrived in the stream."""
        if fields.get("run") != self.run or fields.get("chunk") != self.seq:
            return  # an old run's or chunk's watermark, replayed after a reconnect
        mark = fields.get("mark")
        if mark == "low":
            self.low_seen = True
            self._before.absorb(self._after)
            self._after = _Changes()
        elif mark == "high" and self.chunk is not None:
            self.high_seen = True

    def observe(self, txn: Transaction) -> list[Transaction] | None:
        """Record the keys a transaction batch changed; at the high watermark, the reads."""
        if self.replay and (entries := self.replay.pop(txn.commit_lsn, None)) is not None:
            return self._replay(txn, entries)
        if self.sent and txn.commit_lsn in self.sent:
            return None  # sent again by a reconnect: its reads are queued already
        if self.high_seen:
            return self._emit(txn)
        changes = self._after if self.low_seen else self._before
        schema, name, key = self.schema, self.name, self.key
        for event in txn.events:
            source = event.source
            if source.table != name or source.schema != schema:
                continue
            kind = event.type
            if kind is _TRUNCATE:
                changes.unknown[txn.xid] = "the table was truncated"
                continue
            for record in (event.new_record, event.old_record):
                if record is None:
                    continue
                try:
                    value = tuple(record[k] for k in key)
                except KeyError:
                    if kind is _UPDATE and record is event.old_record:
                        continue  # an old record without the key: the key did not change
                    changes.unknown[txn.xid] = f"a {kind.value} without the key columns"
                    continue
                if any(v is UNCHANGED_TOAST for v in value):
                    changes.unknown[txn.xid] = f"a {kind.value} with an unsent key column"
                    continue
                value = canonical(value)
                keys = changes.by_xid.get(txn.xid)
                if keys is None:
                    keys = changes.by_xid[txn.xid] = set()
                keys.add(value)
                if (kind is _UPDATE and record is event.new_record
                        and any(v is UNCHANGED_TOAST for v in record.values())):
                    changes.partial.setdefault(txn.xid, set()).add(value)
        return None

    def _emit(self, txn: Transaction) -> list[Transaction]:
        """The high watermark's transaction: the chunk's reads go out just before it."""
        chunk, outcome = self.chunk, self.outcome
        assert chunk is not None and outcome is not None
        self.high_seen = False
        self.chunk = None
        before, after = self._before, self._after
        visible = chunk.snapshot.visible
        # What the snapshot shows, every later snapshot shows: forget those transactions.
        # Those it does not show are kept for the next chunks (one may be waiting for a
        # synchronous standby while its commit already went by in the stream).
        self._before, self._after = _Changes(), _Changes()
        for changes in (before, after):
            for xid in changes.by_xid.keys() | changes.unknown.keys():
                if not visible(xid):
                    self._before.keep(changes, xid)
        result = Outcome(end_lsn=txn.end_lsn)
        hidden = [xid for xid in before.by_xid.keys() | before.unknown.keys() if not visible(xid)]
        if not self.low_seen:
            result.redo = "its low watermark was not seen in this session"
        elif after.unknown:
            result.redo = next(iter(after.unknown.values()))
        else:
            for xid in hidden:
                if xid in before.unknown:
                    result.redo = before.unknown[xid]
                    break
        self.low_seen = False
        if result.redo is not None:
            if not outcome.done():
                outcome.set_result(result)
            return []
        drop: set[tuple[Any, ...]] = set()
        partial: set[tuple[Any, ...]] = set()
        for keys in after.by_xid.values():
            drop |= keys
        for keys in after.partial.values():
            partial |= keys
        for xid in hidden:
            drop |= before.by_xid.get(xid, set())
            partial |= before.partial.get(xid, set())
        commit_lsn, commit_time = txn.commit_lsn, txn.commit_time
        lsn = format_lsn(commit_lsn)
        self.persisted = None
        read = chunk.events
        kept: range | list[int] = range(len(read))
        if drop:
            key = self.key
            kept = []
            for index, event in enumerate(read):
                value = canonical(tuple(event.new_record[k] for k in key))  # type: ignore[index]
                if value not in drop:
                    kept.append(index)
                elif value in partial:  # its handlers lack a column: read it again
                    result.again.append(chunk.bound(index))
            result.dropped = len(read) - len(kept)
        self.replay.clear()  # the stream is past every earlier run's watermark
        replayed, versions, ids = self.replayed, chunk.versions, result.ids
        prefix = f"{commit_lsn:016X}-R"
        events = []
        for index in kept:
            digest = versions[index]
            known = replayed.get(digest) if replayed else None
            if known is not None:  # replayed as it is: delivered (its id kept till done)
                ids[digest] = known
                continue
            event = read[index]
            event.id = ids[digest] = f"{prefix}{len(events):07X}"
            event.timestamp = commit_time
            event.lsn = lsn
            events.append(event)
        result.emitted = len(ids)
        if events:
            self.persisted = asyncio.get_running_loop().create_future()
        self.sent[commit_lsn] = txn.end_lsn
        if not outcome.done():
            outcome.set_result(result)
        return self._batches(txn, events)

    def _replay(self, txn: Transaction, entries: list[tuple[str, bytes, Any]]) -> list[Transaction]:
        """An earlier run's high watermark sent again: its reads still as they were go out
        again just before it, under their ids."""
        lsn, commit_time, replayed = format_lsn(txn.commit_lsn), txn.commit_time, self.replayed
        events = []
        for rid, digest, event in entries:
            event.id, event.lsn, event.timestamp = rid, lsn, commit_time
            replayed[digest] = rid
            events.append(event)
        self.sent[txn.commit_lsn] = txn.end_lsn  # a reconnect sends it again: nothing more
        return self._batches(txn, events)

    def _batches(self, txn: Transaction, events: list[Any]) -> list[Transaction]:
        """The reads, as batches of the high watermark's transaction."""
        size = self.batch_size
        return [
            Transaction(
                xid=txn.xid, commit_lsn=txn.commit_lsn, end_lsn=0, commit_time=txn.commit_time,
                events=events[i:i + size], last=False,
            )
            for i in range(0, len(events), size)
        ]
