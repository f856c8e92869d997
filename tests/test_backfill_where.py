"""A backfill's ``where`` is one SQL expression (walex.backfill.runner.check_condition):
never a second statement, never a text that closes the parentheses it is read in."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from support import collecting, run, until
from walex import ConfigError, EventType, WalEx

HOSTILE = [
    "true) ; DROP TABLE victim; SELECT (1",  # a second statement (ran on the simple protocol)
    "true; DROP TABLE victim",
    "id > 95) OR (true",  # escapes the keyset condition: the first chunk again and again
    "id > 95) OR (true) --",  # the same, its closing parenthesis commented out
    "id > 95) OR (true) /*",
    "id > 95)) OR ((true",
    "id > 95] OR ARRAY[true",
    "id > 95) OR ARRAY[1] = ARRAY[(1",
]

ALLOWED = [  # brackets, comments and semicolons inside strings, quoted names, comments
    ("v = ');DROP TABLE victim;--'", []),
    ("v <> $$) OR (true$$ AND id <= 3", [1, 2, 3]),
    ("v = E'\\')' OR id = 4", [4]),
    ('"id" = 5 -- ) OR (true', [5]),
    ("id = 6 /* ) OR (true */", [6]),
    ("(ARRAY[id])[1] = 7", [7]),
    ("id IN (SELECT n FROM victim)", [8]),
    ("v LIKE 'v%' AND id % 50 = 0", [50, 100]),
]


def _schema(admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    admin.execute("CREATE TABLE victim (n int)")
    admin.execute("INSERT INTO victim VALUES (8)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")


def test_a_condition_is_one_expression_and_nothing_else(dsn: str, admin: psycopg.Connection) -> None:
    _schema(admin)

    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=10) as rec:
            for where in HOSTILE:
                try:
                    job = await asyncio.wait_for(rec.app.backfill("t", where=where), 30)
                except TimeoutError:
                    results[where] = "looped"
                    break
                except Exception as exc:
                    results[where] = f"{type(exc).__name__}: {exc}"
                else:
                    results[where] = job
            for where, _ in ALLOWED:
                before = len(rec.events)
                job = await asyncio.wait_for(rec.app.backfill("t", where=where), 30)
                await until(lambda: len(rec.events) >= before + job.rows_done, "the reads")
                results[where] = [e.new_record["id"] for e in rec.events[before:]
                                  if e.type is EventType.READ]
        return results

    results = run(main(), timeout=240)
    assert admin.execute("SELECT n FROM victim").fetchall() == [(8,)]  # never dropped
    for where in HOSTILE:
        assert isinstance(results.get(where), str), (where, results.get(where))
        assert results[where].startswith(
            f"ConfigError: where {where!r} is not a valid condition on public.t: "), results[where]
    assert "cannot close a parenthesis or bracket it did not open" in results[HOSTILE[2]]
    for where, ids in ALLOWED:
        assert results[where] == ids, where


def test_a_stored_condition_is_checked_before_it_is_run(dsn: str, admin: psycopg.Connection) -> None:
    """A request written into the progress store by hand (or by an earlier walex) with a
    hostile condition: the job fails, nothing of it runs."""
    _schema(admin)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["t"]) as rec:  # makes the store
            await rec.app.backfill("t", where="id = 1")
        admin.execute("UPDATE walex_backfill SET state = 'pending', "
                      "condition = 'true) ; DROP TABLE victim; SELECT (1'")
        app = WalEx(dsn, publication="pub", name=rec.app.settings.name, subscriptions=["t"])
        async with app:
            await until(lambda: admin.execute("SELECT state FROM walex_backfill").fetchone()[0]
                        == "failed", "the job to fail", 30)

    run(main())
    assert admin.execute("SELECT n FROM victim").fetchall() == [(8,)]
    error = admin.execute("SELECT error FROM walex_backfill").fetchone()[0]
    assert error.startswith("where 'true) ; DROP TABLE victim; SELECT (1' is not a valid condition")


@pytest.mark.parametrize("where", ["", "  ", 5])
def test_a_condition_must_be_sql_text(dsn: str, admin: psycopg.Connection, where: Any) -> None:
    _schema(admin)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["t"]) as rec:
            with pytest.raises(ConfigError, match="where must be an SQL condition"):
                await rec.app.backfill("t", where=where)

    run(main())
