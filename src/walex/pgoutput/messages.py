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

The messages are dataclasses (:mod:`walex.records`: their ``__init__`` written
out, so importing this module compiles none).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from ..records import Record

__all__ = [
    "UNCHANGED_TOAST", "UnchangedToast", "BinaryValue", "TupleData", "Column",
    "Begin", "Commit", "Origin", "Relation", "Type", "Insert", "Update", "Delete",
    "Truncate", "LogicalMessage", "StreamStart", "StreamStop", "StreamCommit",
    "StreamAbort", "BeginPrepare", "Prepare", "CommitPrepared", "RollbackPrepared",
    "StreamPrepare", "Message", "TRUNCATE_CASCADE", "TRUNCATE_RESTART_IDENTITY",
]


class UnchangedToast:
    """Type of :data:`UNCHANGED_TOAST`: a value PostgreSQL did not resend."""

    _instance: UnchangedToast | None = None

    def __new__(cls) -> UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"

    def __bool__(self) -> bool:
        return False


UNCHANGED_TOAST: Final = UnchangedToast()
"""A TOASTed column value that did not change and that PostgreSQL did not send."""


class BinaryValue(bytes):
    """A column value sent in binary format (publication option ``binary``)."""

    __slots__ = ()


@dataclass(slots=True, init=False, repr=False, eq=False)
class TupleData(Record):
    """A row's column values (see the module)."""

    values: list[bytes | BinaryValue | UnchangedToast | None]
    plain: bool

    def __init__(
        self,
        values: list[bytes | BinaryValue | UnchangedToast | None],
        plain: bool,
    ) -> None:
        self.values = values
        self.plain = plain


@dataclass(slots=True, init=False, repr=False, eq=False)
class Column(Record):
    """A column of a :class:`Relation`."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool

    def __init__(self, name: str, type_oid: int, type_modifier: int, is_key: bool) -> None:
        self.name = name
        self.type_oid = type_oid
        self.type_modifier = type_modifier
        self.is_key = is_key


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(slots=True, init=False, repr=False, eq=False)
class Begin(Record):
    """Begin (B): a transaction starts; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_time: datetime
    xid: int

    def __init__(self, final_lsn: int, commit_time: datetime, xid: int) -> None:
        self.final_lsn = final_lsn
        self.commit_time = commit_time
        self.xid = xid


@dataclass(slots=True, init=False, repr=False, eq=False)
class Commit(Record):
    """Commit (C): the transaction ends."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime

    def __init__(self, flags: int, commit_lsn: int, end_lsn: int, commit_time: datetime) -> None:
        self.flags = flags
        self.commit_lsn = commit_lsn
        self.end_lsn = end_lsn
        self.commit_time = commit_time


@dataclass(slots=True, init=False, repr=False, eq=False)
class Origin(Record):
    """Origin (O): the transaction was replicated from elsewhere."""

    commit_lsn: int
    name: str

    def __init__(self, commit_lsn: int, name: str) -> None:
        self.commit_lsn = commit_lsn
        self.name = name


@dataclass(slots=True, init=False, repr=False, eq=False)
class Relation(Record):
    """Relation (R): a table's definition, sent before its first change in a session."""

    relation_id: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: list[Column]
    xid: int | None = None

    def __init__(
        self,
        relation_id: int,
        namespace: str,
        name: str,
        replica_identity: str,
        columns: list[Column],
        xid: int | None = None,
    ) -> None:
        self.relation_id = relation_id
        self.namespace = namespace
        self.name = name
        self.replica_identity = replica_identity
        self.columns = columns
        self.xid = xid


@dataclass(slots=True, init=False, repr=False, eq=False)
class Type(Record):
    """Type (Y): a column's type that is not built in."""

    type_oid: int
    namespace: str
    name: str
    xid: int | None = None

    def __init__(self, type_oid: int, namespace: str, name: str, xid: int | None = None) -> None:
        self.type_oid = type_oid
        self.namespace = namespace
        self.name = name
        self.xid = xid


@dataclass(slots=True, init=False, repr=False, eq=False)
class Insert(Record):
    """Insert (I): a new row."""

    relation_id: int
    new: TupleData
    xid: int | None = None

    def __init__(self, relation_id: int, new: TupleData, xid: int | None = None) -> None:
        self.relation_id = relation_id
        self.new = new
        self.xid = xid


@dataclass(slots=True, init=False, repr=False, eq=False)
class Update(Record):
    """Update (U): a row's new values, with its old key or row when sent."""

    relation_id: int
    new: TupleData
    old: TupleData | None  # the key ('K') or the whole old row ('O')
    old_kind: Literal["K", "O"] | None
    xid: int | None = None

    def __init__(
        self,
        relation_id: int,
        new: TupleData,
        old: TupleData | None,
        old_kind: Literal["K", "O"] | None,
        xid: int | None = None,
    ) -> None:
        self.relation_id = relation_id
        self.new = new
        self.old = old
        self.old_kind = old_kind
        self.xid = xid


@dataclass(slots=True, init=False, repr=False, eq=False)
class Delete(Record):
    """Delete (D): a row's old key or row."""

    relation_id: int
    old: TupleData
    old_kind: Literal["K", "O"]
    xid: int | None = None

    def __init__(
        self,
        relation_id: int,
        old: TupleData,
        old_kind: Literal["K", "O"],
        xid: int | None = None,
    ) -> None:
        self.relation_id = relation_id
        self.old = old
        self.old_kind = old_kind
        self.xid = xid


@dataclass(slots=True, init=False, repr=False, eq=False)
class Truncate(Record):
    """Truncate (T): tables emptied."""

    relation_ids: list[int]
    options: int  # TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY
    xid: int | None = None

    def __init__(self, relation_ids: list[int], options: int, xid: int | None = None) -> None:
        self.relation_ids = relation_ids
        self.options = options
        self.xid = xid

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(slots=True, init=False, repr=False, eq=False)
class LogicalMessage(Record):
    """Message (M): a logical decoding message (``pg_logical_emit_message``)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None

    def __init__(
        self,
        transactional: bool,
        lsn: int,
        prefix: str,
        content: bytes,
        xid: int | None = None,
    ) -> None:
        self.transactional = transactional
        self.lsn = lsn
        self.prefix = prefix
        self.content = content
        self.xid = xid


@dataclass(slots=True, init=False, repr=False, eq=False)
class StreamStart(Record):
    """Stream Start (S): a block of an in-progress transaction (protocol 2+)."""

    xid: int
    first_segment: bool

    def __init__(self, xid: int, first_segment: bool) -> None:
        self.xid = xid
        self.first_segment = first_segment


@dataclass(slots=True, init=False, repr=False, eq=False)
class StreamStop(Record):
    """Stream Stop (E): the end of a streamed block."""


@dataclass(slots=True, init=False, repr=False, eq=False)
class StreamCommit(Record):
    """Stream Commit (c): a streamed transaction committed."""

    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime

    def __init__(
        self,
        xid: int,
        flags: int,
        commit_lsn: int,
        end_lsn: int,
        commit_time: datetime,
    ) -> None:
        self.xid = xid
        self.flags = flags
        self.commit_lsn = commit_lsn
        self.end_lsn = end_lsn
        self.commit_time = commit_time


@dataclass(slots=True, init=False, repr=False, eq=False)
class StreamAbort(Record):
    """Stream Abort (A): a streamed (sub)transaction aborted."""

    xid: int
    subxid: int
    abort_lsn: int | None = None  # protocol 4 with streaming = parallel
    abort_time: datetime | None = None

    def __init__(
        self,
        xid: int,
        subxid: int,
        abort_lsn: int | None = None,
        abort_time: datetime | None = None,
    ) -> None:
        self.xid = xid
        self.subxid = subxid
        self.abort_lsn = abort_lsn
        self.abort_time = abort_time


@dataclass(slots=True, init=False, repr=False, eq=False)
class BeginPrepare(Record):
    """Begin Prepare (b): a two-phase transaction starts (protocol 3+)."""

    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str

    def __init__(
        self,
        prepare_lsn: int,
        end_lsn: int,
        prepare_time: datetime,
        xid: int,
        gid: str,
    ) -> None:
        self.prepare_lsn = prepare_lsn
        self.end_lsn = end_lsn
        self.prepare_time = prepare_time
        self.xid = xid
        self.gid = gid


@dataclass(slots=True, init=False, repr=False, eq=False)
class Prepare(Record):
    """Prepare (P): a two-phase transaction was prepared."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str

    def __init__(
        self,
        flags: int,
        prepare_lsn: int,
        end_lsn: int,
        prepare_time: datetime,
        xid: int,
        gid: str,
    ) -> None:
        self.flags = flags
        self.prepare_lsn = prepare_lsn
        self.end_lsn = end_lsn
        self.prepare_time = prepare_time
        self.xid = xid
        self.gid = gid


@dataclass(slots=True, init=False, repr=False, eq=False)
class StreamPrepare(Record):
    """Stream Prepare (p): a streamed transaction was prepared."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str

    def __init__(
        self,
        flags: int,
        prepare_lsn: int,
        end_lsn: int,
        prepare_time: datetime,
        xid: int,
        gid: str,
    ) -> None:
        self.flags = flags
        self.prepare_lsn = prepare_lsn
        self.end_lsn = end_lsn
        self.prepare_time = prepare_time
        self.xid = xid
        self.gid = gid


@dataclass(slots=True, init=False, repr=False, eq=False)
class CommitPrepared(Record):
    """Commit Prepared (K): a prepared transaction committed."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    xid: int
    gid: str

    def __init__(
        self,
        flags: int,
        commit_lsn: int,
        end_lsn: int,
        commit_time: datetime,
        xid: int,
        gid: str,
    ) -> None:
        self.flags = flags
        self.commit_lsn = commit_lsn
        self.end_lsn = end_lsn
        self.commit_time = commit_time
        self.xid = xid
        self.gid = gid


@dataclass(slots=True, init=False, repr=False, eq=False)
class RollbackPrepared(Record):
    """Rollback Prepared (r): a prepared transaction was rolled back."""

    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_time: datetime
    rollback_time: datetime
    xid: int
    gid: str

    def __init__(
        self,
        flags: int,
        prepare_end_lsn: int,
        rollback_end_lsn: int,
        prepare_time: datetime,
        rollback_time: datetime,
        xid: int,
        gid: str,
    ) -> None:
        self.flags = flags
        self.prepare_end_lsn = prepare_end_lsn
        self.rollback_end_lsn = rollback_end_lsn
        self.prepare_time = prepare_time
        self.rollback_time = rollback_time
        self.xid = xid
        self.gid = gid


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate
    | LogicalMessage | StreamStart | StreamStop | StreamCommit | StreamAbort
    | BeginPrepare | Prepare | StreamPrepare | CommitPrepared | RollbackPrepared
)
