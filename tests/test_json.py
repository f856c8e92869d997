"""json/jsonb values load exactly as psycopg's default (json module) loader gives them."""

from __future__ import annotations

import json

import psycopg

from support import collecting, run

DOCUMENTS = [
    '{"a": 1, "b": "x", "c": [true, false, null]}',
    '{"big": 123456789012345678901234567890, "neg": -9223372036854775809}',
    '[18446744073709551615, 1.5, 1e300, -0.0, 3.141592653589793238462643383279]',
    '{"unicode": "žluťoučký kůň \\u00e9 \\ud83d\\ude00", "nested": {"deep": [[[1]]]}}',
    '{"dup": 1, "dup": 2}',
]


def test_json_and_jsonb_values_match_the_json_module(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE docs (id int PRIMARY KEY, j json, jb jsonb)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE docs")

    async def main() -> list:
        async with collecting(dsn, subscriptions=["docs"]) as rec:
            for i, doc in enumerate(DOCUMENTS):
                admin.execute("INSERT INTO docs VALUES (%s, %s, %s)", (i, doc, doc))
            return await rec.wait_for(len(DOCUMENTS))

    events = run(main())
    rows = admin.execute("SELECT j::text, jb::text FROM docs ORDER BY id").fetchall()
    for event, (j_text, jb_text) in zip(events, rows):
        for column, text in (("j", j_text), ("jb", jb_text)):
            expected = json.loads(text)
            got = event.new_record[column]
            assert got == expected and repr(got) == repr(expected), (column, text)
