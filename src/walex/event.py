"""The :class:`Event` walex hands to handlers, and its parts.

One Event is one row change (or one table of a TRUNCATE) of a committed
transaction. Invariants:

- ``new_record`` is ``None`` exactly for delete and truncate;
- ``old_record`` is what Postgres sent of the old row: the whole row under
  REPLICA IDENTITY FULL, the key columns on a delete or a key-changing update
  otherwise, else ``None``;
- ``changes`` is ``None`` when the old values are unknown, never a misleading
  ``{}``; an unchanged TOAST value is never reported as a change;
- ``id`` (commit end LSN and position in the transaction) is unique per change
  and stable across replays, so a consumer can drop duplicates.

:data:`UNCHANGED_TOAST` is defined here (the pgoutput decoder,
:mod:`walex.pgoutput.messages`, puts it in rows and re-exports it), so the
event types import nothing of the protocol: a worker, whose events come from
a broker, never loads the pgoutput decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import Any, Final, NamedTuple

from .records import Record

__all__ = ["Event", "EventType", "Change", "Source", "UNCHANGED_TOAST", "UnchangedToast",
           "walex_version"]


@cache
def walex_version() -> str:
    """This walex's version, read from the installed metadata once, when first asked for
    (the lookup lists every installed package: a few milliseconds kept off ``import``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("walex")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "WALEX_VERSION":  # the version, looked up on first use
        return walex_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


class EventType(StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"
    READ = "read"  # an existing row, from a snapshot or a backfill (walex.backfill)


@dataclass(slots=True, frozen=True)
class Source:
    """Where an event comes from; one instance is shared by a table's events."""

    db: str
    schema: str
    table: str
    columns: dict[str, str] = field(default_factory=dict)  # column -> type name
    # the columns identifying a row: the primary key (or the replica identity
    # index); empty when the table has neither
    primary_key: tuple[str, ...] = ()
    name: str = "WalEx"
    version: str = field(default_factory=walex_version)
    # the column types that are domains (or arrays of domains) -> the type their values
    # load as: {"positive_amount": "numeric", "day[]": "date[]"}
    base_types: dict[str, str] = field(default_factory=dict)


class Change(NamedTuple):
    """A column's value before and after an update (a named tuple: cheap to build)."""

    old_value: Any
    new_value: Any


@dataclass(slots=True, repr=False, eq=False)
class Event(Record):
    """One change as handlers receive it: a row inserted, updated, deleted or read, or a truncate."""

    name: str
    type: EventType
    source: Source
    new_record: dict[str, Any] | None
    old_record: dict[str, Any] | None
    changes: dict[str, Change] | None
    timestamp: datetime
    lsn: str
    id: str

    @property
    def table(self) -> str:
        """``schema.table`` of the event's table."""
        return f"{self.source.schema}.{self.source.table}"

    @property
    def record(self) -> dict[str, Any] | None:
        """The row as it is now (``new_record``), or as it was for a delete."""
        return self.new_record if self.new_record is not None else self.old_record
