"""The messages of the pgoutput logical replication protocol, versions 1 to 4.

Plain data, no behaviour. Field names follow the PostgreSQL documentation
("Logical Replication Message Formats"); LSNs are ``int``, timestamps are
tz-aware UTC ``datetime``. ``xid`` on a change is set only inside a streamed
block (protocol 2+, between Stream Start and Stream Stop) and is then the id of
the (sub)transaction that made the change.

A row is a :class:`TupleData`: ``values`` holds one item per column, ``None``
for SQL NULL, :data:`UNCHANGED_TOAST` for a TOASTed value the server did not
resend, ``bytes`` in text format, or :class:`BinaryValue` in binary format;
``plain`` is true when every item is ``None`` or text ``bytes``, so the whole
row can be handed to psycopg's ``Transformer.load_sequence`` at once.

The messages are dataclasses whose ``repr`` and equality are
:class:`walex.records.Record`'s (written once, not compiled per class).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from ..event import UNCHANGED_TOAST, UnchangedToast
from ..records import Record

__all__ = [
    "UNCHANGED_TOAST", "UnchangedToast", "BinaryValue", "TupleData", "Column",
    "Begin", "Commit", "Origin", "Relation", "Type", "Insert", "Update", "Delete",
    "Truncate", "LogicalMessage", "StreamStart", "StreamStop", "StreamCommit",
    "StreamAbort", "BeginPrepare", "Prepare", "CommitPrepared", "RollbackPrepared",
    "StreamPrepare", "Message", "TRUNCATE_CASCADE", "TRUNCATE_RESTART_IDENTITY",
]


class BinaryValue(bytes):
    """A column value sent in binary format (publication option ``binary``)."""

    __slots__ = ()


@dataclass(slots=True, repr=False, eq=False)
class TupleData(Record):
    """A row's column values (see the module)."""

    values: list[bytes | BinaryValue | UnchangedToast | None]
    plain: bool


@dataclass(slots=True, repr=False, eq=False)
class Column(Record):
    """A column of a :class:`Relation`."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(slots=True, repr=False, eq=False)
class Begin(Record):
    """Begin (B): a transaction starts; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(slots=True, repr=False, eq=False)
class Commit(Record):
    """Commit (C): the transaction ends."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True, repr=False, eq=False)
class Origin(Record):
    """Origin (O): the transaction was replicated from elsewhere."""

    commit_lsn: int
    name: str


@dataclass(slots=True, repr=False, eq=False)
class Relation(Record):
    """Relation (R): a table's definition, sent before its first change in a session."""

    relation_id: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: list[Column]
    xid: int | None = None


@dataclass(slots=True, repr=False, eq=False)
class Type(Record):
    """Type (Y): a column's type that is not built in."""

    type_oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(slots=True, repr=False, eq=False)
class Insert(Record):
    """Insert (I): a new row."""

    relation_id: int
    new: TupleData
    xid: int | None = None


@dataclass(slots=True, repr=False, eq=False)
class Update(Record):
    """Update (U): a row's new values, with its old key or row when sent."""

    relation_id: int
    new: TupleData
    old: TupleData | None  # the key ('K') or the whole old row ('O')
    old_kind: Literal["K", "O"] | None
    xid: int | None = None


@dataclass(slots=True, repr=False, eq=False)
class Delete(Record):
    """Delete (D): a row's old key or row."""

    relation_id: int
    old: TupleData
    old_kind: Literal["K", "O"]
    xid: int | None = None


@dataclass(slots=True, repr=False, eq=False)
class Truncate(Record):
    """Truncate (T): tables emptied."""

    relation_ids: list[int]
    options: int  # TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY
    xid: int | None = None

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(slots=True, repr=False, eq=False)
class LogicalMessage(Record):
    """Message (M): a logical decoding message (``pg_logical_emit_message``)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(slots=True, repr=False, eq=False)
class StreamStart(Record):
    """Stream Start (S): a block of an in-progress transaction (protocol 2+)."""

    xid: int
    first_segment: bool


@dataclass(slots=True, repr=False, eq=False)
class StreamStop(Record):
    """Stream Stop (E): the end of a streamed block."""


@dataclass(slots=True, repr=False, eq=False)
class StreamCommit(Record):
    """Stream Commit (c): a streamed transaction committed."""

    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True, repr=False, eq=False)
class StreamAbort(Record):
    """Stream Abort (A): a streamed (sub)transaction aborted."""

    xid: int
    subxid: int
    abort_lsn: int | None = None  # protocol 4 with streaming = parallel
    abort_time: datetime | None = None


@dataclass(slots=True, repr=False, eq=False)
class BeginPrepare(Record):
    """Begin Prepare (b): a two-phase transaction starts (protocol 3+)."""

    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(slots=True, repr=False, eq=False)
class Prepare(Record):
    """Prepare (P): a two-phase transaction was prepared."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(slots=True, repr=False, eq=False)
class StreamPrepare(Record):
    """Stream Prepare (p): a streamed transaction was prepared."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(slots=True, repr=False, eq=False)
class CommitPrepared(Record):
    """Commit Prepared (K): a prepared transaction committed."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    xid: int
    gid: str


@dataclass(slots=True, repr=False, eq=False)
class RollbackPrepared(Record):
    """Rollback Prepared (r): a prepared transaction was rolled back."""

    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_time: datetime
    rollback_time: datetime
    xid: int
    gid: str


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate
    | LogicalMessage | StreamStart | StreamStop | StreamCommit | StreamAbort
    | BeginPrepare | Prepare | StreamPrepare | CommitPrepared | RollbackPrepared
)
