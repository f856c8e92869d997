"""Handler modules: :class:`Events` and the decorators users write.

``Events()`` is the Python form of WalEx's ``use WalEx.Event``: a registry of
handlers, each bound to a table (or ``"all"``), a set of event types, filters
and per-event functions. The decorators and :meth:`Events.register` share one
code path; every argument is checked when the handler is registered, so a
filter in the wrong shape fails at import time instead of being ignored.

A handler receives a list of events of one transaction: those of its table
that match its types and filters, in WAL order (for ``"all"``: those of every
subscribed table). Coroutine functions run on the event loop; plain ones on
the app's threads (see :mod:`walex.threads`).

Filters (all optional, combined with AND):

- ``unwatched_records={"col": value, ...}``: drop an event whose record (the
  old record for a delete) matches every pair; an empty mapping drops nothing;
- ``unwatched_fields=[...]``: drop an update whose changed columns are all
  listed (so also an update that changed nothing); an update whose old values
  are unknown (no ``REPLICA IDENTITY FULL``) is kept; an empty list drops
  nothing;
- ``columns_changed=[...]``: keep an update only if one of these changed; an
  update whose old values are unknown is kept; inserts, deletes and truncates
  pass;
- ``where=callable``: keep the event if ``callable(event)`` is true (a
  predicate that raises is a handler failure under the app's error policy).

``functions=[f, ...]`` is not a filter: each function runs once per event the
handler selected.

``max_batch=N`` (off by default) batches across transactions: when several
committed transactions are queued, the handler gets their selected events in
one call, at most ``N`` events a call, in WAL order; a transaction is
acknowledged only after every call holding any of its events returned. Nothing
waits for a batch to fill: with nothing else queued the call is made at once.
A transaction with more than ``N`` selected events is handed over in calls of
``N``. Not with ``functions=`` (those run per event anyway). Any other keyword, or an argument of the wrong shape, raises
:class:`~walex.errors.ConfigError` when the handler is registered.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .event import UNCHANGED_TOAST, Event, EventType
from .records import Record

__all__ = ["Events", "Handler", "table_matcher"]

EventFilter = Callable[[Event], bool]
ALL_TYPES = frozenset(EventType)
OPTIONS = ("unwatched_records", "unwatched_fields", "columns_changed", "where", "functions",
           "max_batch")


def table_matcher(spec: str) -> Callable[[str, str], bool]:
    """``"user"`` matches a table of that name in any schema, ``"s.user"`` exactly, ``"*"`` all."""
    if spec in ("*", "all"):
        return lambda schema, table: True
    schema, dot, table = spec.rpartition(".")
    if dot:
        return lambda s, t: s == schema and t == table
    return lambda s, t: t == spec


@dataclass(slots=True, repr=False, eq=False)
class Handler(Record):
    """A registered handler: its callback and what it takes (:meth:`Events.on_event`)."""

    callback: Callable[[list[Event]], Any]
    table: str  # "all", "name" or "schema.name"
    types: frozenset[EventType]
    filters: list[EventFilter] = field(default_factory=list)
    functions: list[Callable[[Event], Any]] = field(default_factory=list)
    is_async: bool = False
    matches_table: Callable[[str, str], bool] = field(default=lambda s, t: True)
    max_batch: int = 0  # > 0: events of several queued transactions per call, at most this many
    takes_all: bool = False  # every table and every type: concerns() is true of any event
    # one call per transaction and nothing else (no functions, no max_batch): the
    # dispatcher's fast paths; set at registration
    single: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.single = not self.functions and not self.max_batch

    @property
    def name(self) -> str:
        return getattr(self.callback, "__qualname__", repr(self.callback))

    def concerns(self, event: Event) -> bool:
        """Whether the event is of this handler's table and types (filters aside)."""
        source = event.source
        return event.type in self.types and self.matches_table(source.schema, source.table)

    def passes(self, event: Event) -> bool:
        """Whether every filter keeps the event (a filter may raise)."""
        return all(f(event) for f in self.filters)


class Events:
    """A handler module: register handlers with the ``on_*`` decorators."""

    def __init__(self) -> None:
        self.handlers: list[Handler] = []

    def register(
        self,
        callback: Callable[[list[Event]], Any],
        table: str = "all",
        *,
        types: Iterable[EventType | str] | None = None,
        unwatched_records: Mapping[str, Any] | None = None,
        unwatched_fields: Iterable[str] | None = None,
        columns_changed: Iterable[str] | None = None,
        where: EventFilter | None = None,
        functions: Iterable[Callable[[Event], Any]] | None = None,
        max_batch: int | None = None,
    ) -> Handler:
        """Register ``callback``; the decorators call this."""
        if not callable(callback):
            raise ConfigError(f"a handler must be callable, got {callback!r}")
        if not isinstance(table, str) or not table:
            raise ConfigError(f"table must be a table name or 'all', got {table!r}")
        try:
            kinds = ALL_TYPES if types is None else frozenset(EventType(t) for t in types)
        except ValueError:
            raise ConfigError(
                f"types must be among {[t.value for t in EventType]}, got {types!r}"
            ) from None
        filters: list[EventFilter] = []
        if unwatched_records is not None:
            if not isinstance(unwatched_records, Mapping) or not all(
                isinstance(k, str) for k in unwatched_records
            ):
                raise ConfigError(
                    "unwatched_records must be a mapping of column name to value, e.g. "
                    f"{{'event_subscribe': False}}; got {unwatched_records!r}"
                )
            if unwatched_records:
                filters.append(_unwatched_records(dict(unwatched_records)))
        if unwatched_fields is not None:
            fields = _columns("unwatched_fields", unwatched_fields)
            if fields:
                filters.append(_unwatched_fields(fields))
        if columns_changed is not None:
            columns = _columns("columns_changed", columns_changed)
            if not columns:
                raise ConfigError(
                    "columns_changed needs at least one column name; without it no update "
                    "would ever be kept"
                )
            filters.append(_columns_changed(columns))
        if where is not None:
            if not callable(where):
                raise ConfigError(f"where must be a callable taking an event, got {where!r}")
            filters.append(where)
        if functions is None:
            funcs: list[Callable[[Event], Any]] = []
        elif isinstance(functions, (list, tuple)):
            funcs = list(functions)
        else:
            raise ConfigError(
                f"functions must be a list of callables taking an event, got {functions!r}"
            )
        for func in funcs:
            if not callable(func):
                raise ConfigError(f"functions must be callables taking an event, got {func!r}")
        if max_batch is not None:
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
                raise ConfigError(
                    f"max_batch must be a whole number of events >= 1, e.g. max_batch=5000; "
                    f"got {max_batch!r}"
                )
            if funcs:
                raise ConfigError(
                    "max_batch cannot be combined with functions=: functions run once per event "
                    "already; register the functions on a handler of their own without max_batch"
                )
        handler = Handler(
            callback, table, kinds, filters, funcs,
            is_async=inspect.iscoroutinefunction(callback),
            matches_table=table_matcher(table),
            max_batch=max_batch or 0,
            takes_all=table in ("*", "all") and kinds == ALL_TYPES,
        )
        self.handlers.append(handler)
        return handler

    def _decorator(self, table: str, types: Iterable[EventType] | None, **options: Any) -> Any:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown handler option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"the options are {', '.join(OPTIONS)}"
            )

        def decorate(callback: Callable[[list[Event]], Any]) -> Callable[[list[Event]], Any]:
            self.register(callback, table, types=types, **options)
            return callback

        if callable(table):  # used bare: @events.on_insert
            callback, table = table, "all"
            return decorate(callback)
        return decorate

    def on_event(self, table: str = "all", **options: Any) -> Any:
        """Every event of ``table`` (or of every subscribed table with ``"all"``)."""
        return self._decorator(table, None, **options)

    def on_insert(self, table: str = "all", **options: Any) -> Any:
        return self._decorator(table, [EventType.INSERT], **options)

    def on_update(self, table: str = "all", **options: Any) -> Any:
        return self._decorator(table, [EventType.UPDATE], **options)

    def on_delete(self, table: str = "all", **options: Any) -> Any:
        return self._decorator(table, [EventType.DELETE], **options)

    def on_truncate(self, table: str = "all", **options: Any) -> Any:
        return self._decorator(table, [EventType.TRUNCATE], **options)

    def on_read(self, table: str = "all", **options: Any) -> Any:
        """Existing rows delivered by a snapshot or a backfill (:mod:`walex.backfill`)."""
        return self._decorator(table, [EventType.READ], **options)


def _columns(option: str, value: Iterable[str]) -> frozenset[str]:
    items = None if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable) \
        else list(value)  # once: an iterator is consumed by reading it
    if items is None or not all(isinstance(c, str) for c in items):
        raise ConfigError(f"{option} must be a list of column names, e.g. ['updated_at']; got {value!r}")
    return frozenset(items)


def _unwatched_records(pairs: dict[str, Any]) -> EventFilter:
    items = list(pairs.items())

    def keep(event: Event) -> bool:
        record = event.record
        if record is None:
            return True
        return not all(col in record and record[col] == value for col, value in items)

    return keep


def _old_values_known(event: Event) -> bool:
    old = event.old_record
    return event.changes is not None and not any(v is UNCHANGED_TOAST for v in (old or {}).values())


def _unwatched_fields(columns: frozenset[str]) -> EventFilter:
    def keep(event: Event) -> bool:
        if event.type is not EventType.UPDATE or not _old_values_known(event):
            return True
        return not columns.issuperset(event.changes)  # type: ignore[arg-type]

    return keep


def _columns_changed(columns: frozenset[str]) -> EventFilter:
    def keep(event: Event) -> bool:
        if event.type is not EventType.UPDATE or not _old_values_known(event):
            return True
        return not columns.isdisjoint(event.changes)  # type: ignore[arg-type]

    return keep
