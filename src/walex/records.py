"""``Record``: the base of walex's data classes, cheaper to define at import than a dataclass.

A ``@dataclass`` writes the source of its ``__init__``, ``__repr__`` and
``__eq__`` for every class and compiles it (``exec``) when its module is
imported: some 2 million instructions a class, a tenth of walex's own share of
a process's start when every data class of the streaming path (the pgoutput
messages, events, transactions) is one. walex's are
``@dataclass(slots=True, repr=False, eq=False)`` subclasses of :class:`Record`,
whose ``__repr__`` and ``__eq__`` are those a dataclass generates, written once
for all: only ``__init__`` is compiled per class. They remain dataclasses
(``dataclasses.fields``, ``asdict``, ``replace`` and pattern matching work), with
the same ``repr``, equality, (no) hash and parameters as before; a test compares
each with the plain dataclass of the same fields.

Not for a frozen dataclass (its ``__setattr__`` and ``__hash__`` are generated too)
nor one that orders (``order=True``).
"""

from __future__ import annotations

import reprlib
from dataclasses import fields
from typing import Any

__all__ = ["Record"]

# per class: the names of the fields its repr shows and its equality compares
_SHOWN: dict[type, tuple[str, ...]] = {}
_COMPARED: dict[type, tuple[str, ...]] = {}


def _shown(cls: type) -> tuple[str, ...]:
    names = _SHOWN[cls] = tuple(f.name for f in fields(cls) if f.repr)
    return names


def _compared(cls: type) -> tuple[str, ...]:
    names = _COMPARED[cls] = tuple(f.name for f in fields(cls) if f.compare)
    return names


class Record:
    """``__repr__`` and ``__eq__`` as ``@dataclass`` generates them (see the module)."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # as a dataclass with eq=True, not frozen

    def __eq__(self, other: object) -> Any:
        cls = self.__class__
        if other.__class__ is not cls:
            return NotImplemented
        names = _COMPARED.get(cls)
        if names is None:
            names = _compared(cls)
        return tuple([getattr(self, n) for n in names]) == tuple([getattr(other, n) for n in names])

    @reprlib.recursive_repr()  # "..." for the record inside itself, as a dataclass's
    def __repr__(self) -> str:
        cls = self.__class__
        names = _SHOWN.get(cls)
        if names is None:
            names = _shown(cls)
        return cls.__qualname__ + "(" + ", ".join([f"{n}={getattr(self, n)!r}" for n in names]) + ")"
