"""A backfill's ``where`` cannot refer to the parameters of the statements it is read in."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from support import collecting, run
from walex import ConfigError


# accepted before (checked with 1 bound to $1), then read as the first chunk's row limit
# (10) and the next chunks' last key: 90 and 99 of 100 rows delivered, the job 'done'
@pytest.mark.parametrize("where", ["id > $1", "id <> $1::int"])
def test_a_condition_naming_a_statement_parameter_is_refused(
    dsn: str, admin: psycopg.Connection, where: str,
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> tuple[Any, Any]:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=10) as rec:
            try:
                refused: Any = await asyncio.wait_for(rec.app.backfill("t", where=where), 30)
            except ConfigError as exc:
                refused = exc
            # the backfill's connection is still good for a valid condition
            after = await asyncio.wait_for(rec.app.backfill("t", where="id > 10"), 30)
            return refused, after

    refused, after = run(main(), timeout=90)
    assert isinstance(refused, ConfigError), (
        f"accepted: state {refused.state}, {refused.rows_done} of 100 rows")
    assert str(refused).startswith(
        f"where {where!r} is not a valid condition on public.t: it refers to a statement "
        "parameter ($1, ...)"), str(refused)
    assert "Fix: write the value itself" in str(refused)
    assert (after.state, after.rows_done) == ("done", 90)
