"""What a batch of events takes in memory: the unit of ``max_pending_bytes``.

The pipeline bounds what it holds (batches queued for the handlers, in hand,
and waiting in a destination's window) by ``max_pending_bytes``. The assembler
counts a change by the bytes its message took on the wire, one integer add per
change on the hot path; the typed events take several times that in memory
(an ``Event``, a dict per record, an object per value: a W1 row of 180 bytes on
the wire is about 1.3 kB in Python, a jsonb value ten times its text). So
:class:`Sizer` gives each assembled batch its size in memory instead: the deep
size (``sys.getsizeof`` of the event, its records, values, nested json and
arrays) of a few events of the batch, sampled evenly, times the batch's length,
and never less than its wire bytes (a single huge row the sample missed still
counts by its wire size, which its value takes at least). It also learns the
ratio of memory to wire bytes (:attr:`Sizer.scale`), with which the pipeline
turns its byte bounds into the wire units the assembler and the compiled hot
path count in (where a batch is cut, how many batches one read may build).

A backfill counts the rows of its chunks with :func:`events_bytes` too, in
the same units (:mod:`walex.backfill.chunks`).

Objects events share (the table's ``Source``, names, the commit's time and
LSN text, small ints, ``None``) are not counted. What the estimate misses
(allocator rounding, freed memory not returned) is the stated margin of the
setting; tests/test_memory.py checks the estimate against tracemalloc.

:func:`event_bytes`, :func:`value_bytes` and :meth:`Sizer.measure` are the compiled
twins of :func:`py_event_bytes`, :func:`py_value_bytes` and :meth:`Sizer.py_measure`
(``walex._sizes``: the same totals without a Python frame or a ``sys.getsizeof``
call per object) when they were built and ``WALEX_PURE_PYTHON`` is not set at
import; else the pure ones.

Invariants: :meth:`Sizer.measure` costs a fixed number of object walks per
batch, whatever its length; :attr:`Sizer.scale` is at least 1.
"""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from sys import getsizeof
from typing import Any
from uuid import UUID

from .rawevent import RawEvent

__all__ = ["Sizer", "event_bytes", "events_bytes", "py_event_bytes", "py_value_bytes", "value_bytes"]

_SAMPLES = 4  # events walked per batch
_PER_EVENT = 8  # the batch's list slot of each event
_PER_BATCH = 200  # the Transaction and its list
_FIRST_SCALE = 8.0  # memory per wire byte assumed before the first batch was measured
_MOST_NODES = 5000  # nodes of one value walked; beyond, the rest counts at the mean so far
_SHARED = (type(None), bool)
_LEAVES = (int, float, str, bytes)
# types of values with no attributes of their own and no items: their getsizeof is all
_FLAT = frozenset({float, bytes, dt.datetime, dt.date, dt.time, dt.timedelta, Decimal, UUID})


def py_value_bytes(value: Any) -> int:
    """Deep size of one typed value: containers (json objects and arrays, arrays, composites,
    which are named tuples) with their items; ``None`` and booleans are shared."""
    kind = type(value)
    if kind in _LEAVES:
        return getsizeof(value) if kind is not int or not -5 <= value <= 256 else 0
    if kind in _FLAT:
        return getsizeof(value)
    if kind in _SHARED:
        return 0
    if kind is not dict and kind is not list and not isinstance(value, tuple):
        extra = getattr(value, "__dict__", None)  # a value class with attributes
        return getsizeof(value) + (getsizeof(extra) if extra is not None else 0)
    total, nodes, stack = 0, 0, [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SHARED:
            continue
        if kind is int and -5 <= item <= 256:  # the interpreter's shared small ints
            continue
        total += getsizeof(item)
        nodes += 1
        if kind is dict:  # keys up to 64 bytes: shared through orjson's key cache
            for key in item:
                if type(key) is not str or len(key) > 64:
                    stack.append(key)
            stack.extend(item.values())
        elif kind is list or isinstance(item, tuple):
            stack.extend(item)
        if nodes >= _MOST_NODES and stack:  # a huge document: the rest at the mean node size
            return total + total // nodes * len(stack)
    return total


def _raw_bytes(event: Any, raw: tuple[Any, ...]) -> int:
    """Deep size of a RawEvent not typed yet: its rows as sent (one bytes object each,
    walex.rawrow), not the Table they share."""
    total = getsizeof(event) + getsizeof(event.id) + getsizeof(raw) + getsizeof(raw[4])
    for row in (raw[1], raw[2]):
        if row is not None:
            total += getsizeof(row)
    return total


def py_event_bytes(event: Any) -> int:
    """Deep size of one event: the object, its id, records, values and changes (a value the
    old record shares with the new one counted once); for a RawEvent (walex.rawevent) not
    typed yet, its rows as sent."""
    if type(event) is RawEvent:
        raw = event.raw
        if raw is not None:
            return _raw_bytes(event, raw)
    total = getsizeof(event) + getsizeof(event.id)
    new, old, changes = event.new_record, event.old_record, event.changes
    if new is not None:
        total += getsizeof(new)
        for value in new.values():  # value_bytes, its common cases without a call
            kind = type(value)
            if kind is str or kind in _FLAT:
                total += getsizeof(value)
            elif kind is int:
                if not -5 <= value <= 256:
                    total += getsizeof(value)
            elif value is not None and kind is not bool:
                total += py_value_bytes(value)
    if old is not None:
        total += getsizeof(old)
        get = new.get if new is not None else None
        for key, value in old.items():
            if get is None or get(key) is not value:
                total += py_value_bytes(value)
    if changes:  # named tuples of values the records hold
        total += getsizeof(changes) + 56 * len(changes)
    return total


value_bytes = py_value_bytes
event_bytes = py_event_bytes
try:
    from . import _sizes
except ImportError:  # not built: the pure twins serve
    _sizes = None  # type: ignore[assignment]
if _sizes is not None and not os.environ.get("WALEX_PURE_PYTHON"):
    value_bytes = _sizes.value_bytes
    event_bytes = _sizes.event_bytes


def events_bytes(events: Any) -> int:
    """Deep size of a list of events, estimated from at most a fixed number of them, sampled
    evenly (their mean times the length), with each one's slot in the list. Also what a
    backfill counts its chunks by (:mod:`walex.backfill.chunks`)."""
    n = len(events)
    if n <= _SAMPLES:
        held = sum(event_bytes(e) for e in events)
    else:
        step = (n - 1) / (_SAMPLES - 1)
        held = sum(event_bytes(events[round(i * step)]) for i in range(_SAMPLES)) * n // _SAMPLES
    return held + _PER_EVENT * n


class Sizer:
    """Sizes batches in memory bytes and learns the ratio of memory to wire bytes."""

    __slots__ = ("scale",)

    def __init__(self) -> None:
        self.scale = _FIRST_SCALE

    def py_measure(self, txn: Any) -> int:
        """Set ``txn.size`` (wire bytes, as assembled) to the batch's size in memory; returns it."""
        wire = txn.size
        events = txn.events
        if len(events) == 1:  # a one-change transaction: the common case, without a call
            held = event_bytes(events[0]) + _PER_EVENT + _PER_BATCH
        else:
            held = events_bytes(events) + _PER_BATCH
        if wire > 4096:  # big enough to learn from (one-row batches count their header too)
            self.scale = max(1.0, held / wire)
        size = txn.size = max(held, wire)
        return size

    def wire(self, memory: int) -> int:
        """``memory`` bytes in the wire units the assembler counts (at least 1)."""
        return max(1, int(memory / self.scale))

    # the compiled twin of py_measure when built (and WALEX_PURE_PYTHON not set at import)
    measure = py_measure


if _sizes is not None:
    _sizes.bind(RawEvent, _FLAT, _MOST_NODES, _PER_EVENT, _PER_BATCH, events_bytes)
    if event_bytes is _sizes.event_bytes:
        Sizer.measure = _sizes.measure  # type: ignore[method-assign]
