"""json/jsonb values load exactly as psycopg's default (json module) loader gives them.

On both of walex's loaders: the pure-Python one (``walex.pgtypes.py_json_loads``)
and its compiled twin (``walex._json.loads``), end to end and on generated documents.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.pq import Format

from support import collecting, run
from walex.pgtypes import TypeCatalog, compiled_json_loads, py_json_loads

needs_compiled = pytest.mark.skipif(
    compiled_json_loads is None, reason="walex._json (the compiled json loader) is not built"
)

DOCUMENTS = [
    '{"a": 1, "b": "x", "c": [true, false, null]}',
    '{"big": 123456789012345678901234567890, "neg": -9223372036854775809}',
    '[18446744073709551615, 1.5, 1e300, -0.0, 3.141592653589793238462643383279]',
    '{"unicode": "žluťoučký kůň \\u00e9 \\ud83d\\ude00", "nested": {"deep": [[[1]]]}}',
    '{"dup": 1, "dup": 2}',
]


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_json_and_jsonb_values_match_the_json_module(
    dsn: str, admin: psycopg.Connection, pure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pure:
        monkeypatch.setenv("WALEX_PURE_PYTHON", "1")
    else:
        monkeypatch.delenv("WALEX_PURE_PYTHON", raising=False)
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


def outcome(loads: Any, data: Any) -> str:
    try:
        return repr(loads(data))
    except Exception as exc:  # noqa: BLE001 - the error is part of the outcome
        return f"{type(exc).__name__}: {exc}"


EDGES = [
    b"[123456789012345678]", b"[1234567890123456789]", b"[-1234567890123456789]",  # 18, 19 digits
    b"[9223372036854775807, -9223372036854775808, 18446744073709551616]",
    b'{"id": "12345678901234567890"}', b"[0.12345678901234567891]", b"[1.5e308, 1e400, -1e400]",
    b"[NaN]", b"[-Infinity, Infinity]", b"1234567890123456789", b"0", b"  [1] ", b"",
    b"[1,", b"[1] x", b'"\\ud800"', b'{"a": 1e999999999999999999}', b"\xff", b"[12345678901234567x]",
    b"a" * 30 + b"1" * 18 + b"b", b"1" * 18 + b"a" + b"1" * 18,
]


@needs_compiled
def test_the_compiled_loader_is_registered_and_matches_the_pure_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WALEX_PURE_PYTHON", raising=False)
    compiled = TypeCatalog().adapters
    monkeypatch.setenv("WALEX_PURE_PYTHON", "1")
    pure = TypeCatalog().adapters
    for oid in (114, 3802):
        assert compiled.get_loader(oid, Format.TEXT).load is compiled_json_loads
        assert pure.get_loader(oid, Format.TEXT).load is not compiled_json_loads
    for doc in EDGES:
        for data in (doc, memoryview(doc), bytearray(doc)):
            assert outcome(compiled_json_loads, data) == outcome(py_json_loads, data), doc
        assert outcome(compiled_json_loads, doc) == outcome(json.loads, doc), doc


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(value=JSON, ascii=st.booleans(), digits=st.integers(0, 25))
def test_generated_documents_load_alike(value: Any, ascii: bool, digits: int) -> None:
    doc = json.dumps([value, int("7" * digits or "0")], ensure_ascii=ascii).encode()
    expected = outcome(json.loads, doc)
    assert outcome(py_json_loads, doc) == expected
    assert outcome(compiled_json_loads, doc) == expected
