"""Loading composite values, including values of an older shape of their type.

PostgreSQL sends no message when a composite type is altered, and WAL written
before an ``ALTER TYPE`` keeps the old shape: a value has as many fields as its
type had when the value was written. walex reads the definition once, when it
meets the type, so a value may have fewer or more fields than that definition.
:func:`register` installs a text loader that types each value by its own shape:

- as many fields as the definition: a named tuple, each field typed like the
  same type at top level (the field types are resolved before registration);
- fewer fields, and no attribute of the type was ever dropped: the value was
  written before ``ALTER TYPE ... ADD ATTRIBUTE``; the fields it has are typed
  by position and the missing ones are ``None``, as PostgreSQL itself reads
  such a value;
- anything else (more fields than walex knows, the type was altered while walex
  ran; or a dropped attribute makes the positions ambiguous): the value's text
  form, a ``str`` as PostgreSQL wrote it, with one warning per type.

(After both a DROP and an ADD ATTRIBUTE, an old value with as many fields as
the current definition cannot be told apart from a new one: it is typed with
the current fields.) walex reads definitions again at each new session.

Invariant: loading a value never fails because of its shape, so a change
written before a type was altered can always be delivered and acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.pq import Format
from psycopg.types.composite import CompositeInfo, _parse_text_record, register_composite

__all__ = ["ATTRIBUTES_QUERY", "register"]

log = logging.getLogger("walex")

_TEXT_OID = 25

ATTRIBUTES_QUERY = """
SELECT a.attname, a.atttypid::int8, a.attisdropped
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_attribute a ON a.attrelid = t.typrelid
WHERE t.oid = %s AND a.attnum > 0
ORDER BY a.attnum
"""
"""The attributes of a composite type, dropped ones included (``atttypid`` 0)."""


class _ShapeTolerantLoader(Loader):
    """Text loader of one composite type (subclassed per type by :func:`register`)."""

    info: CompositeInfo
    factory: Any
    qualified_name: str
    may_pad: bool  # no attribute was ever dropped
    warned: bool = False

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._context = context
        self._fields = len(self.info.field_types)
        self._tx = self._transformer(self._fields)
        self._shorter: dict[int, Transformer] = {}
        self._text = Transformer(context).get_loader(_TEXT_OID, Format.TEXT)

    def _transformer(self, count: int) -> Transformer:
        tx = Transformer(self._context)
        tx.set_loader_types(self.info.field_types[:count], Format.TEXT)
        return tx

    def load(self, data: Any) -> Any:
        n = self._fields
        fields: Sequence[bytes | None]
        if data == b"()":  # no field, or one NULL field
            fields = (None,) if n else ()
        else:
            fields = tuple(_parse_text_record(data[1:-1]))
        k = len(fields)
        if k == n:
            try:
                return self.factory(*self._tx.load_sequence(fields))
            except Exception:
                if self.may_pad:
                    raise  # the shape fits: a value psycopg cannot load, reported as such
        elif k < n and self.may_pad:
            tx = self._shorter.get(k)
            if tx is None:
                tx = self._shorter[k] = self._transformer(k)
            return self.factory(*tx.load_sequence(fields), *(None,) * (n - k))
        self._mismatch(k)
        return self._text.load(data)

    def _mismatch(self, count: int) -> None:
        cls = type(self)
        if cls.warned:
            return
        cls.warned = True
        names = ", ".join(self.info.field_names)
        if self.may_pad:
            why = ("the type was altered (ALTER TYPE) after walex read its definition; "
                   "walex reads the new one when it reconnects or restarts")
        else:
            why = ("an attribute of the type was dropped, so which field is which cannot "
                   "be told from a value written before")
        log.warning(
            "composite type %s: a value with %d fields does not fit the definition walex "
            "read (%d fields: %s): %s. Such values are delivered as their text form (a str).",
            self.qualified_name, count, self._fields, names, why,
        )


def register(
    adapters: AdaptersMap, name: str, qualified_name: str, oid: int, array_oid: int,
    attributes: Sequence[tuple[str, int, bool]],
) -> None:
    """Register loaders of a composite type whose field types are already resolved.

    ``attributes`` are the rows of :data:`ATTRIBUTES_QUERY`.
    """
    live = [(attname, typid) for attname, typid, dropped in attributes if not dropped]
    info = CompositeInfo(
        name, oid, array_oid, field_names=[a for a, _ in live], field_types=[t for _, t in live]
    )
    register_composite(info, adapters)  # the named tuple class, binary loader, dumpers
    loader = type(f"{info.python_type.__name__}ShapeLoader", (_ShapeTolerantLoader,), {
        "info": info, "factory": info.python_type, "qualified_name": qualified_name,
        "may_pad": len(live) == len(attributes),
    })
    adapters.register_loader(oid, loader)
