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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

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


@dataclass(slots=True)
class TupleData:
    values: list[bytes | BinaryValue | UnchangedToast | None]
    plain: bool


@dataclass(slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(slots=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: list[Column]
    xid: int | None = None


@dataclass(slots=True)
class Type:
    type_oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(slots=True)
class Insert:
    relation_id: int
    new: TupleData
    xid: int | None = None


@dataclass(slots=True)
class Update:
    relation_id: int
    new: TupleData
    old: TupleData | None  # the key ('K') or the whole old row ('O')
    old_kind: Literal["K", "O"] | None
    xid: int | None = None


@dataclass(slots=True)
class Delete:
    relation_id: int
    old: TupleData
    old_kind: Literal["K", "O"]
    xid: int | None = None


@dataclass(slots=True)
class Truncate:
    relation_ids: list[int]
    options: int  # TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY
    xid: int | None = None

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(slots=True)
class StreamStop:
    pass


@dataclass(slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True)
class StreamAbort:
    xid: int
    subxid: int
    abort_lsn: int | None = None  # protocol 4 with streaming = parallel
    abort_time: datetime | None = None


@dataclass(slots=True)
class BeginPrepare:
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(slots=True)
class Prepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(slots=True)
class StreamPrepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(slots=True)
class CommitPrepared:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    xid: int
    gid: str


@dataclass(slots=True)
class RollbackPrepared:
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
