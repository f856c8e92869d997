"""A backfill's condition and size: checks of a ``where`` before it is stored or read by,
and the planner's estimate of the rows to read.

Both run on the backfill's connection (:class:`walex.lookups.DeadlineConnection`, so
within ``backfill_query_timeout``); a lost connection raises ``psycopg.OperationalError``
for the caller to retry, every other problem of a condition is a
:class:`~walex.errors.ConfigError` naming it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import psycopg

from ..errors import ConfigError

if TYPE_CHECKING:
    from .target import Target

__all__ = ["check_condition", "estimate"]


async def check_condition(conn: psycopg.AsyncConnection, target: Target, where: str | None) -> None:
    """A ConfigError naming the problem when ``where`` is not one valid condition on the table.

    The condition is parsed and planned (not run) twice, on the extended protocol
    (one statement only) with no parameter bound (a ``$1`` would be what chunk
    statements bind: their row limit, the last key read), in a read-only transaction:
    once between parentheses (``WHERE (...)``, as chunks are read), once between
    brackets (``ARRAY[...]``).
    A text that closes a parenthesis it did not open (``id > 5) OR (true``) parses
    in the first form but not the second, and one that closes a bracket it did not
    open not in the first: what passes both is one expression, which cannot reach
    outside the parentheses it is read in. Strings, quoted names and comments are
    PostgreSQL's to read, as in any condition."""
    if where is None:
        return
    if not isinstance(where, str) or not where.strip() or "\0" in where:
        raise ConfigError(f"where must be an SQL condition, got {where!r}")
    for query in target.check_queries(where):
        try:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION READ ONLY")
                # binary: the extended protocol although no parameter is bound
                await conn.cursor(binary=True).execute(query, prepare=False)
        except psycopg.errors.ProtocolViolation:  # "bind message supplies 0 parameters"
            raise ConfigError(
                f"where {where!r} is not a valid condition on {target.qualified}: it refers to "
                "a statement parameter ($1, ...), which the statements chunks are read by "
                "bind to their own values (the row limit, the last key read). Fix: write the "
                "value itself"
            ) from None
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            hint = ""
            if isinstance(exc, psycopg.errors.SyntaxError):
                hint = (" (a condition is one SQL expression: it cannot close a parenthesis or "
                        "bracket it did not open, nor hold a ';' outside a string)")
            raise ConfigError(
                f"where {where!r} is not a valid condition on {target.qualified}: "
                f"{str(exc).strip().splitlines()[0]}{hint}"
            ) from None


async def estimate(conn: psycopg.AsyncConnection, target: Target, where: str | None) -> int | None:
    """The planner's estimate of the rows to read."""
    try:
        cur = await conn.execute(target.estimate_query(where), (1,), prepare=False)
        row = await cur.fetchone()
    except psycopg.OperationalError:
        raise
    except psycopg.Error:
        return None
    plan: Any = row[0] if row else None
    if isinstance(plan, str):
        plan = json.loads(plan)
    try:
        return int(plan[0]["Plan"]["Plan Rows"])
    except (TypeError, KeyError, IndexError, ValueError):
        return None
