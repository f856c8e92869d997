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
watermarks (another instance may have moved it past them). A high watermark whose transaction was cut
off by a reconnect before its commit came counts only when it comes again
(the runner's :meth:`~walex.backfill.runner.Backfills.batch` forgets it).

Read event ids are ``<the job's id LSN, 16 hex digits>-R<24 hex digits>``
(:func:`read_id`): the id LSN is where the job first started (kept in the
progress store until the table is requested anew, :mod:`.store`), the 24 digits
a digest of the app, the table, that LSN, the row's key (text forms) and its
version, the ``xmin`` of the tuple read (the transaction that wrote it). A
row read again by the same job, in a later chunk or after a restart (a lost
connection, a crash, a standby that took over), therefore carries the same
id as long as it did not change: consumers drop it as a duplicate. A row
that changed in between is another version (another ``xmin``) with other
values: it gets another id, as a streamed change would, and is not dropped
as a duplicate of the older copy. A new request of the table is a new job (a
new id LSN): its reads are not duplicates of the previous job's. Read ids
never equal a streamed id (whose second part has 8 hex digits and no ``R``);
unlike streamed ids they are not in commit order (a reread must keep its
id), and their first part is not the commit LSN of the read (``event.lsn``
is: the high watermark's), but it is an LSN no later than the snapshot the
row was read in.
"""

from __future__ import annotations

import asyncio
import hashlib
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

__all__ = ["PREFIX", "payload", "parse", "Window", "Outcome", "ReadIds"]

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


class ReadIds:
    """The ids of one job's read events (see the module docstring)."""

    __slots__ = ("prefix", "_base")

    def __init__(self, app: str, schema: str, table: str, id_lsn: int) -> None:
        self.prefix = f"{id_lsn:016X}-R"
        seed = "\0".join((app, schema, table, str(id_lsn), ""))
        self._base = hashlib.blake2b(seed.encode("utf-8", "surrogateescape"), digest_size=12)

    def __call__(self, key: tuple[str, ...], version: str) -> str:
        """The id of the row of key ``key`` (text forms; PostgreSQL text holds no NUL, so
        NUL separates them unambiguously) at version ``version`` (its ``xmin``)."""
        h = self._base.copy()
        h.update("\0".join((str(len(key)), *key, version)).encode("utf-8", "surrogateescape"))
        return self.prefix + h.hexdigest().upper()


@dataclass(slots=True, repr=False, eq=False)
class Outcome(Record):
    """What became of a chunk at its high watermark."""

    end_lsn: int = 0  # end of the high watermark's transaction: acknowledged after the reads
    emitted: int = 0
    dropped: int = 0  # rows left to the stream
    redo: str | None = None  # why the chunk must be read again
    # rows left to the stream whose streamed change lacked a column: read them again
    again: list[Bound] = field(default_factory=list)


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

    def __init__(self, app: str, run: str, target: Target, batch_size: int,
                 ids: ReadIds) -> None:
        self.app = app
        self.ids = ids
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
        ids, bound, versions = self.ids, chunk.bound, chunk.versions
        events = []
        for index in kept:
            event = read[index]
            event.timestamp = commit_time
            event.lsn = lsn
            event.id = ids(bound(index)[1], versions[index])
            events.append(event)
        result.emitted = len(events)
        self.sent[commit_lsn] = txn.end_lsn
        if not outcome.done():
            outcome.set_result(result)
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
