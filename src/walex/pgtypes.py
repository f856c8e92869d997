"""Type names and loaders for the columns of replicated tables.

A :class:`TypeCatalog` owns the psycopg ``AdaptersMap`` used to type every
value walex delivers. It starts as a copy of the global ``psycopg.adapters``
(so types a user registered globally apply) and, for every column type the
server announces that psycopg does not know, looks the type up in ``pg_type``
once and registers what makes it load like the type it is:

- a domain loads as its base type (as a SELECT would return it);
- an array of a non-built-in element (enum, domain, composite, hstore) loads
  as a ``list`` of that element;
- a composite loads as a named tuple whose fields are typed like the same
  types at top level: the field types are resolved before the composite is
  registered, so the result does not depend on the order walex met the types
  in; a value of an older shape of the type is handled by
  :mod:`walex.composites`;
- ``hstore`` loads as a ``dict``;
- anything else (enum, citext, ...) loads as ``str`` unless a loader was
  registered for it.

:meth:`TypeCatalog.base_name` names the type a domain (or an array of
domains) loads as, for the messages a relay publishes. :meth:`TypeCatalog.tolerant`
is the same adapters where psycopg's own loaders of date, time, timetz,
timestamp, timestamptz and interval (and of the domains over them) give a value
Python cannot hold (``infinity``, a year BC or after 9999, ``24:00:00``, an
interval beyond ``timedelta``) as its PostgreSQL text form, a ``str``: a row
is typed with it only when the plain adapters failed, so the common row pays
nothing.

Lookups run on a :class:`~walex.lookups.LookupConnection`, reopened when the
server closed it.

Invariant: after :meth:`TypeCatalog.resolve` returned for a set of OIDs, the
adapters hold a loader for each (or psycopg's text fallback applies) and
:meth:`TypeCatalog.name` knows each type's name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.adapt import AdaptersMap, Loader
from psycopg.postgres import types as builtin_types
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg.types.array import register_array
from psycopg.types.hstore import register_hstore

from . import composites
from .lookups import LookupConnection

__all__ = ["TypeCatalog", "json_loaders"]

_LONG_NUMBER = re.compile(rb"[0-9]{19}")
_DIGITS = b"0123456789"

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency, but optional at run time
    orjson = None  # type: ignore[assignment]


def py_json_loads(data: Any) -> Any:
    """A json/jsonb value in text format: orjson, or json where orjson would differ (it
    turns integers beyond 64 bits into floats, and rejects NaN and Infinity), so values
    are exactly what psycopg's default loader gives, about four times faster.

    The reference for the compiled twin, ``walex._json.loads`` (same rule: a run of 19
    or more digits, or a document orjson rejects, goes to the json module)."""
    raw = bytes(data) if type(data) is not bytes else data
    # the regex only when there are 19 digits at all (deleting them is a cheap C pass)
    if len(raw) - len(raw.translate(None, _DIGITS)) >= 19 and _LONG_NUMBER.search(raw):
        return json.loads(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


try:
    from ._json import loads as compiled_json_loads
except ImportError:  # not built (or no orjson): the pure-Python loader serves
    compiled_json_loads = None


class _FastJsonLoader(Loader):
    """json/jsonb in text format through :func:`py_json_loads`."""

    def load(self, data: Any) -> Any:
        return py_json_loads(data)


class _CompiledJsonLoader(Loader):
    """json/jsonb in text format through ``walex._json.loads``: psycopg calls the
    compiled function directly, with no Python frame per value."""

    load = staticmethod(compiled_json_loads)


def json_loaders() -> frozenset[type[Loader]]:
    """The json/jsonb loader classes walex registers (either twin): what the relay's direct
    encoder (walex.destinations.direct) writes jsonb for without calling them."""
    return frozenset({_FastJsonLoader, _CompiledJsonLoader})


def _json_loader() -> type[Loader] | None:
    """The json/jsonb loader class to register, or None for psycopg's default."""
    if orjson is None or _user_json_loads():
        return None
    if compiled_json_loads is not None and not os.environ.get("WALEX_PURE_PYTHON"):
        return _CompiledJsonLoader
    return _FastJsonLoader


def _user_json_loads() -> bool:
    """Whether the user replaced psycopg's global json loads function."""
    from psycopg.types import json as pgjson

    loader = psycopg.adapters.get_loader(3802, Format.TEXT)
    return getattr(loader, "_loads", pgjson.json.loads) is not pgjson.json.loads

# date, time, timetz, timestamp, timestamptz, interval: types of values Python may not hold
_TEMPORAL = (1082, 1083, 1266, 1114, 1184, 1186)


class _OrText(Loader):
    """A psycopg loader (``inner``, subclassed per loader by :func:`_or_text`) whose value
    Python cannot hold is loaded as its text form, as PostgreSQL wrote it."""

    inner: type[Loader]

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._load = self.inner(oid, context).load

    def load(self, data: Any) -> Any:
        try:
            return self._load(data)
        except (psycopg.DataError, ValueError, OverflowError):
            return bytes(data).decode("utf-8", "replace")


_or_text_classes: dict[type[Loader], type[Loader]] = {}


def _or_text(inner: type[Loader]) -> type[Loader]:
    cls = _or_text_classes.get(inner)
    if cls is None:
        cls = _or_text_classes[inner] = type(f"{inner.__name__}OrText", (_OrText,), {"inner": inner})
    return cls


def _psycopgs(loader: type[Loader]) -> bool:
    """Whether a loader class is psycopg's own (C or Python), not one the user registered."""
    return loader.__module__.split(".")[0] in ("psycopg", "psycopg_binary", "psycopg_c")


_PG_TYPE_QUERY = """
SELECT t.oid, t.typname, n.nspname, t.typtype, t.typbasetype, t.typelem, t.typarray,
       format_type(t.oid, NULL)
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid = ANY(%s)
"""


class TypeCatalog:
    """Resolves column type OIDs to names and loaders, one query per new type."""

    def __init__(self, lookups: LookupConnection | None = None) -> None:
        self.lookups = lookups
        self.forget()

    def forget(self) -> None:
        """Start again from psycopg's global adapters: types are looked up anew when
        next met (at a new session, so a type altered meanwhile is read again)."""
        self.adapters = AdaptersMap(psycopg.adapters)
        loader = _json_loader()
        if loader is not None:
            for oid in (114, 3802):  # json, jsonb in text format
                self.adapters.register_loader(oid, loader)
        self._names: dict[int, str] = {}
        self._domains: dict[int, int] = {}  # domain -> its base type, for the domains walex types
        self._arrays: dict[int, int] = {}  # array -> its element, for the arrays walex registered
        self._tolerant: AdaptersMap | None = None

    def name(self, oid: int) -> str:
        """The type's name as Postgres spells it (``int4``, ``text[]``, ``mood``)."""
        known = self._names.get(oid)
        if known is not None:
            return known
        info = builtin_types.get(oid)
        if info is None:
            return str(oid)
        return f"{info.name}[]" if info.array_oid == oid and info.oid != oid else info.name

    def base_name(self, oid: int) -> str | None:
        """The name of the type a domain's values load as (``date``; ``date[]`` for an array
        of a domain over date); None for a type that is neither."""
        base = self._domains.get(oid)
        if base is not None:
            return self.base_name(base) or self.name(base)
        element = self._arrays.get(oid)
        if element is not None:
            inner = self.base_name(element)
            return None if inner is None else f"{inner}[]"
        return None

    def tolerant(self) -> AdaptersMap:
        """The adapters, with the text form for the values of psycopg's own date and time
        loaders that Python cannot hold (see the module's docstring)."""
        if self._tolerant is None:
            tolerant = AdaptersMap(self.adapters)
            for oid in _TEMPORAL:
                loader = self.adapters.get_loader(oid, Format.TEXT)
                if loader is not None and _psycopgs(loader):
                    tolerant.register_loader(oid, _or_text(loader))
            for domain in self._domains:
                base = domain
                while base in self._domains:
                    base = self._domains[base]
                if base in _TEMPORAL and self.adapters.get_loader(domain, Format.TEXT) is \
                        self.adapters.get_loader(base, Format.TEXT):
                    tolerant.register_loader(domain, tolerant.get_loader(base, Format.TEXT))
            self._tolerant = tolerant
        return self._tolerant

    def _is_known(self, oid: int) -> bool:
        return oid in self._names or (
            builtin_types.get(oid) is not None
            and self.adapters.get_loader(oid, Format.TEXT) is not None
        )

    async def resolve(self, oids: Iterable[int]) -> None:
        """Make sure every OID has a name and a loader; queries ``pg_type`` for new ones."""
        pending = sorted({oid for oid in oids if not self._is_known(oid)})
        if not pending or self.lookups is None:
            return
        rows = await self.lookups.fetch(_PG_TYPE_QUERY, (pending,))
        by_oid = {row[0]: row for row in rows}
        # Elements and base types first, so arrays and domains can reuse them.
        deps = {r[4] for r in rows if r[4]} | {r[5] for r in rows if r[5]}
        if deps - set(pending):
            await self.resolve(deps - set(pending))
        # Elements before arrays, so an array is named after its element.
        for oid in sorted(pending, key=lambda o: bool(by_oid.get(o, (0,) * 8)[5])):
            if oid in self._names:
                continue  # registered meanwhile, as a field of a composite
            row = by_oid.get(oid)
            if row is None:
                self._names[oid] = str(oid)  # dropped meanwhile: text fallback
                continue
            await self._register(row)

    async def _register(self, row: tuple) -> None:
        oid, typname, nspname, typtype, basetype, elem, array_oid, _formatted = row
        user_loader = self.adapters.get_loader(oid, Format.TEXT) is not None
        self._tolerant = None  # made again with this type when next asked for
        if elem and typtype == "b" and typname.startswith("_"):  # an array type
            self._names[oid] = f"{self.name(elem)}[]"
            if not user_loader:
                register_array(TypeInfo(self.name(elem), elem, oid), self.adapters)
                self._arrays[oid] = elem
            return
        self._names[oid] = typname if nspname in ("pg_catalog", "public") else f"{nspname}.{typname}"
        if user_loader or self.lookups is None:
            return  # the user registered this type already
        if typtype == "d":
            self._domains[oid] = basetype
            for fmt in (Format.TEXT, Format.BINARY):
                loader = self.adapters.get_loader(basetype, fmt)
                if loader is not None:
                    self.adapters.register_loader(oid, loader)
        elif typtype == "c":
            attributes = await self.lookups.fetch(composites.ATTRIBUTES_QUERY, (oid,))
            # Fields first: the composite's loader takes their loaders when it is made.
            await self.resolve(typid for _name, typid, dropped in attributes if not dropped)
            composites.register(
                self.adapters, typname, f"{nspname}.{typname}", oid, array_oid, attributes
            )
        elif typname == "hstore":
            register_hstore(TypeInfo(typname, oid, array_oid), self.adapters)
