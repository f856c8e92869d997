"""What a backfill reads: the table, its chunk key, its columns as the stream sends them.

:func:`resolve_target` looks a table up among the publication's tables and
decides the *chunk key*, the columns rows are read in order of:

1. the replica identity index, when the table has ``REPLICA IDENTITY USING
   INDEX`` (its columns are what a delete carries);
2. else the primary key;
3. else, as a documented fallback, the smallest unique index on NOT NULL
   columns with neither an expression nor a predicate (such a table has no
   replica identity for updates and deletes unless it is ``FULL``, and then
   the whole old row, key included, is sent);
4. else a :class:`~walex.errors.SetupError` naming the fix.

The columns are those the stream's Relation message lists (the publication's
column list, generated columns left out as pgoutput leaves them out), in
the same order and with the same types, so a row read here is typed by a
:class:`~walex.relations.Table` exactly like an inserted row.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..checks import quote_ident
from ..errors import ConfigError, SetupError
from ..handlers import table_matcher
from ..pgoutput.messages import Column, Relation

__all__ = ["Target", "resolve_target", "SHAPE"]


@dataclass(slots=True)
class Target:
    """A table to backfill and how to read it."""

    oid: int
    schema: str
    name: str
    relkind: str  # 'r' table, 'p' partitioned table
    columns: list[Column]  # as the Relation message would list them
    replica_identity: str
    key: list[str]  # the chunk key, in index order
    key_types: list[str]  # format_type() of each key column, for the keyset cast
    key_from: str  # "replica identity index", "primary key" or "unique index <name>"
    rowfilter: str | None  # the publication's row filter (PostgreSQL 15+)
    shape: str  # the table's columns, types, keys now (see SHAPE): a change shows DDL
    key_signature: str = ""  # type, typmod and collation of each key column: their order

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def quoted(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def relation(self) -> Relation:
        """The Relation message the stream would send for this table now."""
        return Relation(self.oid, self.schema, self.name, self.replica_identity, self.columns)

    def key_positions(self) -> list[int]:
        names = [c.name for c in self.columns]
        return [names.index(k) for k in self.key]

    def chunk_query(self, where: str | None, after: bool, at: bool = False) -> sql.Composed:
        """``SELECT`` of the next rows in key order, after a key given as text (with
        ``at``: from that key on, itself included); the columns, then a digest of the
        row's version (its key's text and the ``xmin`` of its tuple, the transaction that
        wrote it: 64 bits of ``hashtextextended``, as 16 hex digits; see :mod:`.replay`).

        Run it with the key's text forms (none for the first chunk) and the row
        limit as parameters: the extended protocol, one statement only."""
        keys = sql.SQL(", ").join(sql.Identifier(k) for k in self.key)
        # a record's text form quotes what could make two keys read alike
        version = sql.SQL("lpad(to_hex(hashtextextended(ROW({})::text || ' ' || xmin::text, 0)), "
                          "16, '0')").format(keys)
        cols = sql.SQL(", ").join([*(sql.Identifier(c.name) for c in self.columns), version])
        conditions: list[sql.Composable] = []
        if after:
            bound = sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Placeholder(), sql.SQL(t)) for t in self.key_types
            )
            op = sql.SQL(">=" if at else ">")
            conditions.append(sql.SQL("({}) {} ({})").format(keys, op, bound))
        conditions += self._conditions(where)
        clause = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        return sql.SQL("SELECT {} FROM {}{} ORDER BY {} LIMIT %s::bigint").format(
            cols, self._from(), clause, keys
        )

    def estimate_query(self, where: str | None) -> sql.Composed:
        """The planner's estimate of the rows to read; run it with one parameter (any int)."""
        conditions = self._conditions(where)
        clause = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        return sql.SQL("EXPLAIN (FORMAT JSON) SELECT %s::int FROM {}{}").format(self._from(), clause)

    def check_queries(self, where: str) -> list[sql.Composed]:
        """The condition planned (``EXPLAIN``) between parentheses, as chunks read it, and
        between brackets: parsing both shows it is one expression (see
        :func:`walex.backfill.conditions.check_condition`). They have no parameter: run on
        the extended protocol with none, a ``$1`` of the condition is an error, not a
        reference to what the chunk statements bind (their row limit, the last key read)."""
        cond = sql.SQL(where)  # type: ignore[arg-type]
        return [
            sql.SQL("EXPLAIN SELECT ARRAY[{}\n] FROM {}").format(cond, self._from()),
            sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE {}").format(
                self._from(), sql.SQL(" AND ").join(self._conditions(where, params=False))),
        ]

    def _from(self) -> sql.Composed:
        only = sql.SQL("ONLY ") if self.relkind == "r" else sql.SQL("")
        return sql.SQL("{}{}").format(only, sql.Identifier(self.schema, self.name))

    def _conditions(self, where: str | None, params: bool = True) -> list[sql.Composable]:
        # run with parameters: a '%' of the condition is not one (without: it stays as it
        # is); the line break ends a '--' comment before the closing parenthesis
        return [sql.SQL("({}\n)").format(  # type: ignore[arg-type]
                    sql.SQL(extra.replace("%", "%%") if params else extra))  # type: ignore[arg-type]
                for extra in (self.rowfilter, where) if extra]


# the columns with their types and collations, the unique indexes and the replica
# identity of a table, as one string: compared chunk after chunk (NULL once dropped)
SHAPE = """
SELECT (SELECT string_agg(attname || ':' || atttypid || ':' || atttypmod || ':' || attcollation,
                          ',' ORDER BY attnum)
        FROM pg_attribute WHERE attrelid = x.o AND attnum > 0 AND NOT attisdropped)
    || '|' || coalesce((SELECT string_agg(indexrelid || ':' || indkey::text || ':' || indisprimary
                                          || ':' || indisreplident, ',' ORDER BY indexrelid)
                        FROM pg_index WHERE indrelid = x.o AND indisunique AND indisvalid), '')
    || '|' || (SELECT relreplident::text FROM pg_class WHERE oid = x.o)
FROM (SELECT %s::oid AS o) x
"""

_PUBLISHED = """
SELECT p.schemaname, p.tablename, c.oid, c.relkind, c.relreplident
FROM pg_publication_tables p
JOIN pg_namespace n ON n.nspname = p.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
WHERE p.pubname = %s
"""

_COLUMNS = """
SELECT a.attname, a.atttypid, a.atttypmod, a.attnotnull
FROM pg_attribute a
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped {generated}
ORDER BY a.attnum
"""

# unique indexes usable as chunk keys: name, replica identity?, primary?, columns,
# all columns NOT NULL?, column types, their signature (type, typmod, collation)
_INDEXES = """
SELECT ic.relname, i.indisreplident, i.indisprimary,
       array_agg(a.attname ORDER BY k.n),
       bool_and(a.attnotnull),
       array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.n),
       string_agg(a.atttypid || ':' || a.atttypmod || ':' || a.attcollation, ',' ORDER BY k.n)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
  AND i.indexprs IS NULL AND k.n <= i.indnkeyatts
GROUP BY i.indexrelid, i.indisreplident, i.indisprimary, ic.relname
"""


async def resolve_target(
    conn: psycopg.AsyncConnection, publication: str, spec: str, subscriptions: list[str]
) -> Target:
    """The published table ``spec`` names (``"t"`` or ``"schema.t"``), ready to be read."""
    if not isinstance(spec, str) or not spec or spec.count(".") > 1 or spec in ("*", "all"):
        raise ConfigError(f"backfill needs one table, 'name' or 'schema.name'; got {spec!r}")
    matches = table_matcher(spec)
    cur = conn.cursor()
    await cur.execute(_PUBLISHED, (publication,))
    found = [row for row in await cur.fetchall() if matches(row[0], row[1])]
    if not found:
        raise await _not_published(cur, publication, spec)
    if len(found) > 1:
        names = ", ".join(f"{s}.{t}" for s, t, *_ in found)
        raise ConfigError(f"table {spec!r} is ambiguous ({names}); name it as 'schema.table'")
    schema, name, oid, relkind, identity = found[0]
    if not any(table_matcher(s)(schema, name) for s in subscriptions):
        raise ConfigError(
            f"table {schema}.{name} is not among the app's subscriptions {subscriptions!r}: its "
            "read events would reach no handler. Fix: add it to subscriptions."
        )
    version = conn.info.server_version
    if version < 140000:
        raise SetupError(
            f"backfill needs PostgreSQL 14 or later (logical decoding messages in pgoutput); "
            f"this server is {version // 10000}"
        )
    columns = await _columns(cur, publication, oid, schema, name, version)
    rowfilter = None
    if version >= 150000:
        await cur.execute(
            "SELECT rowfilter FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s "
            "AND tablename = %s", (publication, schema, name),
        )
        row = await cur.fetchone()
        rowfilter = row[0] if row else None
    await cur.execute(_INDEXES, (oid,))
    indexes = await cur.fetchall()
    published = {c.name for c in columns}
    ranked = []
    for index, replident, primary, key, not_null, key_types, signature in indexes:
        kind = 0 if replident and identity == "i" else 1 if primary else 2
        if not_null and all(k in published for k in key):
            ranked.append((kind, len(key), index, list(key), list(key_types), signature))
    if not ranked:
        raise SetupError(
            f"table {schema}.{name} has no primary key (nor a unique index on NOT NULL columns "
            "that the publication sends): walex reads existing rows in key order to keep them "
            "consistent with the stream. Fix: ALTER TABLE "
            f"{quote_ident(schema)}.{quote_ident(name)} ADD PRIMARY KEY (...);"
        )
    kind, _, index, key, key_types, signature = min(ranked)
    key_from = ("replica identity index", "primary key", f"unique index {index}")[kind]
    flagged = set(_identity_columns(identity, indexes, columns))
    cols = [Column(c.name, c.type_oid, c.type_modifier, c.name in flagged) for c in columns]
    await cur.execute(SHAPE, (oid,))
    shape = (await cur.fetchone() or ("",))[0] or ""
    return Target(oid, schema, name, relkind, cols, identity, key, key_types, key_from, rowfilter,
                  shape, signature)


_EXISTING = """
SELECT n.nspname, c.relname, c.relkind,
       ARRAY(SELECT p.schemaname || '.' || p.tablename
             FROM pg_partition_tree(c.oid) t
             JOIN pg_class pc ON pc.oid = t.relid
             JOIN pg_namespace pn ON pn.oid = pc.relnamespace
             JOIN pg_publication_tables p ON p.schemaname = pn.nspname AND p.tablename = pc.relname
             WHERE p.pubname = %s AND t.relid <> c.oid ORDER BY 1)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relname = %s AND (n.nspname = %s OR %s = '')
"""


async def _not_published(cur: psycopg.AsyncCursor, publication: str, spec: str) -> SetupError:
    """Why ``spec`` is not among the publication's tables, and the fix."""
    schema, _, name = spec.rpartition(".")
    await cur.execute(_EXISTING, (publication, name, schema, schema))
    rows = await cur.fetchall()
    if not rows:
        return SetupError(
            f"table {spec!r} does not exist (was it dropped or renamed?): there is nothing to "
            "backfill. Fix: name an existing table, 'name' or 'schema.name'"
        )
    for nsp, rel, relkind, parts in rows:
        if relkind == "p" and parts:
            shown = ", ".join(parts[:3]) + (", ..." if len(parts) > 3 else "")
            return SetupError(
                f"table {nsp}.{rel} is partitioned and publication {publication!r} publishes "
                f"its partitions ({shown}), not the table itself (publish_via_partition_root "
                "is off), so the stream names each partition. Fix: backfill each partition, or "
                f"ALTER PUBLICATION {quote_ident(publication)} SET "
                "(publish_via_partition_root = true);"
            )
    return SetupError(
        f"table {spec!r} is not in publication {publication!r}, so walex cannot keep "
        "its rows in step with the stream. Fix: ALTER PUBLICATION "
        f"{quote_ident(publication)} ADD TABLE {spec};"
    )


async def _columns(
    cur: psycopg.AsyncCursor, publication: str, oid: int, schema: str, name: str, version: int
) -> list[Column]:
    """The columns pgoutput sends for the table, in its order."""
    generated = "" if version >= 180000 else "AND a.attgenerated = ''"
    await cur.execute(sql.SQL(_COLUMNS.format(generated=generated)), (oid,))  # type: ignore[arg-type]
    rows = await cur.fetchall()
    if version >= 150000:  # column lists; PostgreSQL 18 also decides on generated columns there
        await cur.execute(
            "SELECT attnames FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s "
            "AND tablename = %s", (publication, schema, name),
        )
        row = await cur.fetchone()
        if row and row[0] is not None:
            sent = set(row[0])
            rows = [r for r in rows if r[0] in sent]
    return [Column(n, typ, mod, False) for n, typ, mod, _ in rows]


def _identity_columns(identity: str, indexes: list[tuple], columns: list[Column]) -> list[str]:
    """The columns pgoutput flags as key columns in its Relation message."""
    if identity == "f":
        return [c.name for c in columns]
    for _, replident, primary, names, *_ in indexes:
        if (identity == "i" and replident) or (identity == "d" and primary):
            return list(names)
    return []
