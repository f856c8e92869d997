"""walex's data classes built on ``walex.records.Record`` behave as the plain dataclasses they were.

Each is compared with ``@dataclass(slots=True)`` of the same fields: the same
``repr``, equality, (no) hash, ``__match_args__``, slots, ``__init__`` signature,
and ``dataclasses`` functions still work on it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
from typing import Any

import pytest

from walex.records import Record

MODULES = ["walex.pgoutput.messages", "walex.event", "walex.transactions", "walex.handlers",
           "walex.replication.stream", "walex.replication.frames", "walex.checks",
           "walex.backfill.store", "walex.backfill.watermarks"]


def record_classes() -> list[type]:
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        found += [c for c in vars(module).values()
                  if isinstance(c, type) and issubclass(c, Record) and c.__module__ == name]
    return found


CLASSES = record_classes()


def reference(cls: type) -> type:
    """The plain ``@dataclass(slots=True)`` of ``cls``'s fields (and ``__post_init__``),
    under the same name."""
    specs = []
    for f in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"init": f.init, "repr": f.repr, "compare": f.compare}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        specs.append((f.name, f.type, dataclasses.field(**kwargs)))
    namespace = {"__post_init__": cls.__post_init__} if hasattr(cls, "__post_init__") else {}
    ref = dataclasses.make_dataclass(cls.__name__, specs, namespace=namespace, slots=True)
    ref.__qualname__ = cls.__qualname__
    return ref


def params(cls: type) -> list[tuple[str, Any, Any, str]]:
    """What ``cls(...)`` takes: each parameter's name, kind, default and annotation (as
    text: a hand-written ``__init__``'s return annotation is the string 'None')."""
    return [(p.name, p.kind, p.default, str(p.annotation))
            for p in inspect.signature(cls).parameters.values()]


def values(cls: type, start: int) -> dict[str, Any]:
    """Distinct values for the init fields of ``cls`` (of several kinds, repr-able)."""
    kinds = itertools.cycle([lambda i: i, lambda i: f"text {i}", lambda i: [i, None],
                             lambda i: b"\x00" + bytes([i % 256])])
    return {f.name: next(kinds)(start + i) for i, f in enumerate(dataclasses.fields(cls)) if f.init}


def test_the_streaming_path_data_classes_are_records() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"Begin", "Insert", "TupleData", "Event", "Transaction", "Handler"} <= names
    assert len(CLASSES) >= 30


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_record_behaves_as_its_dataclass(cls: type) -> None:
    ref = reference(cls)
    kwargs = values(cls, 1)
    obj, expected = cls(**kwargs), ref(**kwargs)
    assert dataclasses.is_dataclass(obj)
    assert repr(obj) == repr(expected)
    assert cls.__match_args__ == ref.__match_args__
    assert cls.__slots__ == ref.__slots__
    assert not hasattr(obj, "__dict__")
    assert params(cls) == params(ref)
    # equality: field by field, only with the same class
    assert obj == cls(**kwargs)
    assert not obj != cls(**kwargs)
    assert obj.__eq__(expected) is NotImplemented and obj != expected
    for name in kwargs:
        other = cls(**{**kwargs, name: "another value"})
        compared = next(f.compare for f in dataclasses.fields(cls) if f.name == name)
        assert (obj == other) is (not compared)
        assert (expected == ref(**{**kwargs, name: "another value"})) is (not compared)
    with pytest.raises(TypeError, match="unhashable"):
        hash(obj)
    assert dataclasses.replace(obj) == obj
    assert dataclasses.asdict(obj) == dataclasses.asdict(expected)


def test_a_record_inside_itself_repr() -> None:
    from walex.pgoutput.messages import TupleData

    row = TupleData(values=[], plain=True)
    row.values.append(row)
    assert repr(row) == "TupleData(values=[...], plain=True)"
