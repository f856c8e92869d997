"""Events whose rows are typed only when something reads them.

An app that relays (destinations) never looks at the typed values of a table
no handler takes: it needs the CloudEvent's JSON, which can be written
straight from the text PostgreSQL sent (:mod:`walex.destinations.direct`).
For such a table (``Table.raw``, set by the pipeline; ``raw_rows`` forces it
on or off) the compiled hot path, and the pure-Python one through
:func:`change_event`, build a :class:`RawEvent` for a change whose rows came
whole and as text (no unchanged TOAST value, no binary value, the table's
width): an :class:`~walex.event.Event` that keeps the raw values and the
:class:`~walex.relations.Table` that types them, and types them the first
time ``new_record``, ``old_record`` or ``changes`` is read (by a filter, a
backfill, an ``on_error`` callback, ``repr``, ``==``...), with exactly the rules of
:mod:`walex.rows`, so that nothing but ``type(event)`` tells it from the
Event the typed path builds (it compares equal to it).

``raw`` is ``(table, new, old, old_kind, lsn)``: ``new`` and ``old`` the rows as
sent (each one ``bytes`` object, the row's TupleData: :mod:`walex.rawrow`; ``None`` for
a row not sent),
``old_kind`` ``"K"``, ``"O"`` or ``""``, ``lsn`` the change's (for the
errors of typing). It is ``None`` once the rows were typed.

Invariant: a RawEvent's typed rows equal those the typed path gives for the
same change (``tests/test_rawevent.py``); :meth:`RawEvent.typed` gives them
without keeping them (the encoder's fallback: the event stays small).
"""

from __future__ import annotations

from typing import Any

from .event import Event, EventType
from .pgoutput.messages import Delete, Insert, TupleData, Update
from .relations import Table
from .rawrow import pack_row, row_values
from .rows import delete_event, insert_event, update_event

__all__ = ["RawEvent", "change_event", "typed_rows"]

_NEW = Event.__dict__["new_record"]  # the slots' member descriptors
_OLD = Event.__dict__["old_record"]
_CHANGES = Event.__dict__["changes"]
_INSERT, _UPDATE = EventType.INSERT, EventType.UPDATE
_KIND = {Insert: _INSERT, Update: _UPDATE, Delete: EventType.DELETE}


def typed_rows(kind: EventType, raw: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """``(new_record, old_record, changes)`` of a change from its raw rows: the Event
    :mod:`walex.rows` builds from the change message, for rows that came whole as text."""
    table, new, old, old_kind, lsn = raw
    old_row = TupleData(list(row_values(old)), True) if old is not None else None
    new_row = TupleData(list(row_values(new)), True) if new is not None else None
    if kind is _INSERT:
        event = insert_event(table, Insert(table.relation_id, new_row), lsn)  # type: ignore[arg-type]
    elif kind is _UPDATE:
        event = update_event(table, Update(table.relation_id, new_row,  # type: ignore[arg-type]
                                           old_row, old_kind or None), lsn)
    else:
        event = delete_event(table, Delete(table.relation_id, old_row, old_kind), lsn)
    return event.new_record, event.old_record, event.changes


def change_event(table: Table, msg: Insert | Update | Delete, lsn: int) -> Event:
    """The Event of a change message, as the pure-Python path makes it (the assembler, and
    the changes of a spilled transaction read back): a :class:`RawEvent` where the compiled
    hot path makes one (a ``Table`` whose ``raw`` is True, every row sent whole as text at
    the table's width), else the typed Event of :mod:`walex.rows`. Its timestamp, lsn and
    id are set later, as for the typed ones."""
    kind = type(msg)
    if table.raw is True and type(table) is Table:
        width = len(table.type_oids)
        new = msg.new if kind is not Delete else None  # type: ignore[union-attr]
        old = msg.old if kind is not Insert else None  # type: ignore[union-attr]
        if (new is None or (new.plain and len(new.values) == width)) and (
                old is None or (old.plain and len(old.values) == width)) and (
                new is not None or kind is Delete):
            raw = (table, None if new is None else pack_row(new.values),
                   None if old is None else pack_row(old.values),
                   "" if kind is Insert else (msg.old_kind or ""), lsn)  # type: ignore[union-attr]
            return RawEvent.of(table.name, _KIND[kind], table.source, raw, None, "", "")
    if kind is Insert:
        return insert_event(table, msg, lsn)  # type: ignore[arg-type]
    if kind is Update:
        return update_event(table, msg, lsn)  # type: ignore[arg-type]
    return delete_event(table, msg, lsn)  # type: ignore[arg-type]


class RawEvent(Event):
    """An :class:`~walex.event.Event` typed on first access of its rows (see the module)."""

    __slots__ = ("raw",)

    @classmethod
    def of(cls, name: str, kind: EventType, source: Any, raw: tuple[Any, ...], timestamp: Any,
           lsn: str, id: str) -> RawEvent:
        """A RawEvent with its rows not typed yet (what the compiled hot path builds in C, and change_event)."""
        event = object.__new__(cls)
        for attr, value in (("name", name), ("type", kind), ("source", source),
                            ("timestamp", timestamp), ("lsn", lsn), ("id", id), ("raw", raw)):
            object.__setattr__(event, attr, value)
        return event

    def _typed(self) -> None:
        raw = getattr(self, "raw", None)
        if raw is None:  # typed meanwhile (by another thread), or built typed
            return
        new, old, changes = typed_rows(self.type, raw)
        _NEW.__set__(self, new)
        _OLD.__set__(self, old)
        _CHANGES.__set__(self, changes)
        self.raw = None

    def typed(self) -> Event:
        """A plain Event with this one's rows typed, this one left as it is."""
        raw = getattr(self, "raw", None)
        if raw is None:
            new, old, changes = self.new_record, self.old_record, self.changes
        else:
            new, old, changes = typed_rows(self.type, raw)
        return Event(self.name, self.type, self.source, new, old, changes, self.timestamp,
                     self.lsn, self.id)

    def __eq__(self, other: object) -> bool:
        """Equal to an Event (typed or raw) with the same fields, its rows typed: a RawEvent
        is the Event the typed path builds, whichever side of ``==`` it is on (Python asks
        the subclass first)."""
        if not isinstance(other, Event):
            return NotImplemented
        return (self.name, self.type, self.source, self.new_record, self.old_record, self.changes,
                self.timestamp, self.lsn, self.id) == (
                other.name, other.type, other.source, other.new_record, other.old_record,
                other.changes, other.timestamp, other.lsn, other.id)

    __hash__ = None  # type: ignore[assignment]  # as Event's: mutable, compared by value

    def _get(descriptor: Any) -> Any:  # type: ignore[misc]  # noqa: N805 - builds properties
        def get(self: RawEvent) -> Any:
            try:
                return descriptor.__get__(self)
            except AttributeError:
                self._typed()
                return descriptor.__get__(self)

        def put(self: RawEvent, value: Any) -> None:
            if getattr(self, "raw", None) is not None:
                self._typed()  # the others typed before one is replaced
            else:
                self.raw = None  # built by __init__ (dataclasses.replace): typed already
            descriptor.__set__(self, value)

        return property(get, put)

    new_record = _get(_NEW)  # type: ignore[assignment]
    old_record = _get(_OLD)  # type: ignore[assignment]
    changes = _get(_CHANGES)  # type: ignore[assignment]
    del _get
