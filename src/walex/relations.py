"""The relation cache: what each table looks like, and how to type its rows.

pgoutput sends a Relation message before the first change of a table in a
session and again whenever the table's definition changed. Each one replaces
the cached :class:`Table` wholesale (never merged), after the column types
were resolved by the :class:`~walex.pgtypes.TypeCatalog`. A :class:`Table`
types a row with one psycopg ``Transformer`` set up once per definition, so
the common row (every value text or NULL) is typed in one C call.

A row the Transformer cannot type (a date of ``infinity``, a year BC or after
9999, a time of ``24:00:00``, ...) is typed again with the catalog's
:meth:`~walex.pgtypes.TypeCatalog.tolerant` adapters, where such a value is its
PostgreSQL text form; only a value that still cannot be typed (a user's loader
raised) stops the stream with a :class:`~walex.errors.DecodeError`.

Invariants: a change is typed only with the definition announced before it in
the stream; a row whose column count differs from its definition is an error,
never silently truncated or padded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from psycopg.adapt import Transformer
from psycopg.pq import Format

from .errors import DecodeError
from .event import Source
from .lsn import format_lsn
from .pgoutput.messages import UNCHANGED_TOAST, BinaryValue, Relation, TupleData
from .pgtypes import TypeCatalog

__all__ = ["Table", "RelationCache"]

_PRIMARY_KEY_QUERY = """
SELECT a.attname FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n
"""


class Table:
    """One table definition as announced by a Relation message."""

    __slots__ = (
        "relation_id", "schema", "name", "replica_identity", "column_names",
        "key_indexes", "type_oids", "source", "subscribed", "raw", "load_plain", "_tx", "_loaders",
        "_tolerant", "_tolerant_tx",
    )

    def __init__(
        self, rel: Relation, catalog: TypeCatalog, db: str, subscribed: bool,
        primary_key: tuple[str, ...] | None = None,
    ) -> None:
        self.relation_id = rel.relation_id
        self.schema = rel.namespace or "pg_catalog"
        self.name = rel.name
        self.replica_identity = rel.replica_identity
        self.column_names = [c.name for c in rel.columns]
        self.key_indexes = [i for i, c in enumerate(rel.columns) if c.is_key]
        self.type_oids = [c.type_oid for c in rel.columns]
        self.source = Source(
            db=db, schema=self.schema, table=self.name,
            columns={c.name: catalog.name(c.type_oid) for c in rel.columns},
            primary_key=(
                tuple(c.name for c in rel.columns if c.is_key) if primary_key is None else primary_key
            ),
            base_types={
                name: base for name, base in (
                    (catalog.name(c.type_oid), catalog.base_name(c.type_oid)) for c in rel.columns
                ) if base is not None
            },
        )
        self.subscribed = subscribed
        # rows kept as sent, typed when read (walex.rawevent), by either hot path
        self.raw = False
        self._tx = Transformer(catalog.adapters)
        self._tx.set_loader_types(self.type_oids, Format.TEXT)
        # the values of a plain row (text or NULL, one per column) to Python values:
        # what load() does for such a row, minus its checks and error; walex._hotpath
        # calls it directly, and load() when it raises
        self.load_plain = self._tx.load_sequence
        self._loaders: dict[tuple[int, int], Any] = {}
        self._tolerant = catalog.tolerant()  # made when a row needs it: _load_tolerant
        self._tolerant_tx: Transformer | None = None

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    def load(self, row: TupleData, tag: str, lsn: int) -> Sequence[Any]:
        """Type one row: Python values in column order (a list when ``row`` is not plain).

        NULL stays ``None`` and an unchanged TOAST value stays
        :data:`~walex.UNCHANGED_TOAST`.
        """
        values = row.values
        if len(values) != len(self.type_oids):
            raise DecodeError(
                f"a {tag} row of {self.qualified_name} at LSN {format_lsn(lsn)} has {len(values)} "
                f"columns but its Relation message announced {len(self.type_oids)}",
                tag=tag, lsn=lsn,
            )
        try:
            if row.plain:
                return self.load_plain(values)  # type: ignore[no-any-return]
            out: list[Any] = []
            for i, value in enumerate(values):
                if value is None or value is UNCHANGED_TOAST:
                    out.append(value)
                else:
                    fmt = Format.BINARY if type(value) is BinaryValue else Format.TEXT
                    out.append(self._loader(i, fmt).load(value))
            return out
        except Exception:
            pass
        try:
            return self._load_tolerant(values)
        except Exception as exc:
            raise self._load_error(values, tag, lsn, exc) from exc

    def _load_tolerant(self, values: list[Any]) -> list[Any]:
        """The row typed with the tolerant adapters: a value Python cannot hold is text."""
        tx = self._tolerant_tx
        if tx is None:
            tx = self._tolerant_tx = Transformer(self._tolerant)
        out: list[Any] = []
        for oid, value in zip(self.type_oids, values):
            if value is None or value is UNCHANGED_TOAST:
                out.append(value)
            else:
                fmt = Format.BINARY if type(value) is BinaryValue else Format.TEXT
                out.append(tx.get_loader(oid, fmt).load(value))
        return out

    def _load_error(self, values: list[Any], tag: str, lsn: int, exc: Exception) -> DecodeError:
        """A DecodeError naming the column whose value the tolerant adapters could not
        type either, and why."""
        where = f"a {tag} row of {self.qualified_name} at LSN {format_lsn(lsn)}"
        cause: Exception = exc
        tx = self._tolerant_tx or self._tx
        for i, value in enumerate(values):
            if value is None or value is UNCHANGED_TOAST:
                continue
            fmt = Format.BINARY if type(value) is BinaryValue else Format.TEXT
            try:
                tx.get_loader(self.type_oids[i], fmt).load(value)
            except Exception as col_exc:
                name = self.column_names[i]
                where = f"column {name!r} ({self.source.columns[name]}) of {where}"
                cause = col_exc
                break
        return DecodeError(
            f"cannot type {where}: {cause}. If a loader registered for its type in "
            "psycopg.adapters raised, make it take this value.",
            tag=tag, lsn=lsn,
        )

    def _loader(self, index: int, fmt: Format) -> Any:
        key = (index, fmt)
        loader = self._loaders.get(key)
        if loader is None:
            loader = self._loaders[key] = self._tx.get_loader(self.type_oids[index], fmt)
        return loader


class RelationCache:
    """Table definitions by relation id, replaced on every Relation message."""

    def __init__(
        self, catalog: TypeCatalog, db: str, is_subscribed: Callable[[str, str], bool],
        is_raw: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.catalog = catalog
        self.db = db
        self.is_subscribed = is_subscribed
        self.is_raw = is_raw  # which tables' rows the hot path keeps as sent (Table.raw)
        self._tables: dict[int, Table] = {}

    async def update(self, rel: Relation) -> Table:
        await self.catalog.resolve(c.type_oid for c in rel.columns)
        schema = rel.namespace or "pg_catalog"
        key = None  # the key columns flagged in the Relation message
        if rel.replica_identity in ("f", "n"):  # they flag every column, or none
            key = await self._primary_key(rel)
        table = Table(rel, self.catalog, self.db, self.is_subscribed(schema, rel.name), key)
        if self.is_raw is not None:
            table.raw = self.is_raw(schema, rel.name)
        self._tables[rel.relation_id] = table
        return table

    async def _primary_key(self, rel: Relation) -> tuple[str, ...]:
        """The primary key columns of a table whose Relation message does not tell them."""
        lookups = self.catalog.lookups
        if lookups is None:
            return ()
        names = [row[0] for row in await lookups.fetch(_PRIMARY_KEY_QUERY, (rel.relation_id,))]
        published = {c.name for c in rel.columns}
        return tuple(names) if names and all(n in published for n in names) else ()

    def refresh_subscriptions(self) -> None:
        """Re-evaluate which cached tables are subscribed, and kept raw (after a config change)."""
        for table in self._tables.values():
            table.subscribed = self.is_subscribed(table.schema, table.name)
            if self.is_raw is not None:
                table.raw = self.is_raw(table.schema, table.name)

    def known(self, relation_id: int) -> Table | None:
        """The cached definition of ``relation_id``, if any."""
        return self._tables.get(relation_id)

    def get(self, relation_id: int, tag: str, lsn: int) -> Table:
        table = self._tables.get(relation_id)
        if table is None:
            raise DecodeError(
                f"{tag} for relation id {relation_id} at LSN {format_lsn(lsn)} arrived before any "
                "Relation message describing it",
                tag=tag, lsn=lsn,
            )
        return table
