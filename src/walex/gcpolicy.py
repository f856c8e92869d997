"""The cyclic garbage collector's young-generation threshold while walex streams.

Why: every row becomes a few container objects (the Event, its record dicts,
json values, ``changes``) that live until their batch was handled, so nearly
all of them survive the young collections and are promoted to the oldest
generation. With CPython's default thresholds (700, 10, 10) a full collection,
which walks every object of the process, comes after about 70,000 such
allocations: about every 10,000 rows of an update stream, 3 us per row
whatever the heap's size (more objects to walk, but fewer full collections),
and more when many batches wait in the queue (``bench/PROFILE.md``).
Raising generation 0's threshold to 10,000 makes full collections about 14
times rarer; garbage cycles then wait at most that many allocations longer.
The default is 100,000: a relay holds its events until the broker confirmed
them, so at 10,000 the young collections still walked each of them about
once (12% of a W1 relay's CPU to NATS); at 100,000 most are confirmed and
freed before a collection comes (1.4%, ``BENCH_GC=stats``, bench/PROFILE.md).

What: while an app streams, generation 0's threshold is at least its
``gc_threshold`` (the other two thresholds are kept); when the last streaming
app stops, the thresholds found at the first start
come back, unless someone changed them meanwhile. Process-wide, like every
GC setting, hence the setting ``gc_threshold=0`` to leave the GC alone. Never
lowers a threshold and never disables the collector.
"""

from __future__ import annotations

import gc

__all__ = ["hold", "release"]

_holders: list[int] = []  # the gc_threshold of each streaming app
_saved: tuple[int, int, int] | None = None  # the thresholds before the first hold
_set: tuple[int, int, int] | None = None  # what walex set last


def _apply() -> None:
    global _set
    assert _saved is not None
    young, *older = gc.get_threshold()
    wanted = max(_holders)
    if young != 0 and young < wanted:  # 0: the user disabled automatic collection; leave it
        gc.set_threshold(wanted, *older)
    _set = gc.get_threshold()


def hold(young: int) -> None:
    """An app starts streaming: generation 0's threshold becomes at least ``young``."""
    global _saved
    if young <= 0:
        return
    if not _holders:
        _saved = gc.get_threshold()
    _holders.append(young)
    _apply()


def release(young: int) -> None:
    """The app that called ``hold(young)`` stopped streaming."""
    global _saved, _set
    if young <= 0 or young not in _holders:
        return
    _holders.remove(young)
    if _holders:
        return
    if _saved is not None and gc.get_threshold() == _set:  # nobody changed it meanwhile
        gc.set_threshold(*_saved)
    _saved = _set = None
