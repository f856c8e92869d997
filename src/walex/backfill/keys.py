"""Chunk keys compared the way PostgreSQL compares them, in a hashable form.

The watermark logic puts the keys a streamed change touched in a set and
looks each row of a chunk up in it. A key's values are typed as handlers
get them, and Python's equality is not PostgreSQL's for every type:

- arrays load as lists, ``jsonb`` and ``hstore`` as dicts, a multirange as a
  list-like object: unhashable, so they become tuples and frozensets;
- ``NaN`` (``float8``, ``numeric``) is not equal to itself in Python, while
  a btree index holds it equal to itself: every NaN becomes one marker;
- inside a ``jsonb`` value ``true`` and ``1`` are equal in Python and not in
  PostgreSQL: booleans are tagged.

Both sides of a comparison (the stream's record and the chunk's row) come
from the same stored value through the same loaders, so mapping each value
to a canonical form that keeps apart what PostgreSQL keeps apart is enough.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

__all__ = ["canonical"]

# key values that hash and compare like PostgreSQL does as they are (the common keys)
_PLAIN = frozenset({int, str, bytes, UUID, datetime, date, time, timedelta})


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NAN = _Marker("NaN")
_BOOL, _SEQ, _MAP, _OTHER = (_Marker(n) for n in ("bool", "sequence", "mapping", "other"))


def canonical(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The key ``values`` in a hashable form, equal exactly when PostgreSQL's are."""
    for v in values:
        if type(v) not in _PLAIN:
            return tuple(_canon(v) for v in values)
    return values


def _canon(v: Any) -> Any:
    kind = type(v)
    if kind in _PLAIN or v is None:
        return v
    if kind is bool:
        return (_BOOL, v)
    if kind is float:
        return _NAN if v != v else v
    if kind is Decimal:
        return _NAN if v.is_nan() else v
    if kind is list or kind is tuple:
        return (_SEQ, tuple(_canon(x) for x in v))
    if isinstance(v, Mapping):
        return (_MAP, frozenset((_canon(k), _canon(x)) for k, x in v.items()))
    try:
        hash(v)
    except TypeError:
        if isinstance(v, (list, tuple)) or hasattr(v, "__iter__"):
            return (_SEQ, type(v).__name__, tuple(_canon(x) for x in v))
        return (_OTHER, type(v).__name__, repr(v))
    if isinstance(v, tuple):  # a named tuple (a composite type): its fields may need it too
        return (_SEQ, type(v).__name__, tuple(_canon(x) for x in v))
    return v
