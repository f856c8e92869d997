"""Typed :class:`~walex.event.Event` s from pgoutput change messages.

One function per change kind; each types the row(s) with the table's
definition (:class:`~walex.relations.Table`) and applies the Event rules:
``old_record`` is the key columns for a key ('K') tuple and the whole row for
an old-row ('O') tuple; ``changes`` is computed only from a whole old row,
comparing the raw values PostgreSQL sent (so NaN and equal-but-differently
written values are handled as the server sees them); a value PostgreSQL did
not resend (unchanged TOAST) is filled from the old row when it sent one and
is never a change. ``timestamp``, ``lsn`` and ``id`` are set by the
transaction assembler when the commit is known.

The compiled twin (``walex._hotpath``) gives the same Events, with one
difference no handler can see but for ``is``: on an update that sent the
whole old row, a column sent unchanged is typed once when its value is
immutable (int, str, Decimal, datetime, ...), the old record holding the new
record's object; mutable values (json, arrays, ...) are typed for each record.
"""

from __future__ import annotations

from typing import Any

from .event import Change, Event, EventType
from .pgoutput import messages as m
from .relations import Table

__all__ = ["insert_event", "update_event", "delete_event", "truncate_event"]

_INSERT, _UPDATE, _DELETE, _TRUNCATE = (
    EventType.INSERT, EventType.UPDATE, EventType.DELETE, EventType.TRUNCATE,
)
_UNSET: Any = None


def truncate_event(table: Table) -> Event:
    return Event(table.name, _TRUNCATE, table.source, None, None, None, _UNSET, "", "")


def insert_event(table: Table, msg: m.Insert, lsn: int) -> Event:
    new = dict(zip(table.column_names, table.load(msg.new, "Insert", lsn)))
    return Event(table.name, _INSERT, table.source, new, None, None, _UNSET, "", "")


def _key_record(table: Table, values: list[Any]) -> dict[str, Any]:
    names = table.column_names
    return {names[i]: values[i] for i in table.key_indexes}


def update_event(table: Table, msg: m.Update, lsn: int) -> Event:
    names = table.column_names
    new_values = table.load(msg.new, "Update", lsn)  # a list unless every value was sent
    old_record = changes = None
    if msg.old is not None:
        old_values = table.load(msg.old, "Update", lsn)
        raw_new, raw_old = msg.new.values, msg.old.values
        if msg.old_kind == "K":
            old_record = _key_record(table, old_values)
            # An unchanged TOASTed key is not resent, but the old key holds its value.
            for i in table.key_indexes:
                if raw_new[i] is m.UNCHANGED_TOAST and raw_old[i] is not m.UNCHANGED_TOAST:
                    new_values[i] = old_values[i]
        elif msg.new.plain and msg.old.plain:  # the common case: every value was sent
            changes = {
                name: Change(old, new)
                for name, raw, raw_was, new, old in zip(names, raw_new, raw_old, new_values, old_values)
                if raw != raw_was
            }
            old_record = dict(zip(names, old_values))
        else:
            changes = {}
            for i, raw in enumerate(raw_new):
                if raw is m.UNCHANGED_TOAST:
                    if raw_old[i] is not m.UNCHANGED_TOAST:
                        new_values[i] = old_values[i]  # not resent: same as before
                elif raw != raw_old[i] and raw_old[i] is not m.UNCHANGED_TOAST:
                    changes[names[i]] = Change(old_values[i], new_values[i])
            old_record = dict(zip(names, old_values))
    new = dict(zip(names, new_values))
    return Event(table.name, _UPDATE, table.source, new, old_record, changes, _UNSET, "", "")


def delete_event(table: Table, msg: m.Delete, lsn: int) -> Event:
    old_values = table.load(msg.old, "Delete", lsn)
    if msg.old_kind == "K":
        old_record = _key_record(table, old_values)
    else:
        old_record = dict(zip(table.column_names, old_values))
    return Event(table.name, _DELETE, table.source, None, old_record, None, _UNSET, "", "")
