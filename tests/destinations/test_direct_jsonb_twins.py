"""The compiled ``_jsonb`` checks a jsonb text token by token, skips eight string bytes at a
time while none is special, and copies the text in runs between PostgreSQL's spaces: it must
take and refuse exactly what the pure twin ``direct.jsonb_compact`` does, with the same bytes,
for any text (``test_direct.test_jsonb_written_from_its_text`` has PostgreSQL's own texts)."""

from __future__ import annotations

import pytest

from walex.destinations import direct

_direct = pytest.importorskip("walex.destinations._direct")

SPECIALS = ['"', "\\", "\\\\", '\\"', "\\n", "\\u0001", "\\u001f", "\\u0020", "\\u000a",
            "\\x", "\x01", "\x1f", "\x7f", "é", "😀", "\u2028", " ", ":", ",", "{", "]"]


def texts() -> list[bytes]:
    out = []
    for special in SPECIALS:
        for at in range(20):
            inner = "a" * at + special + "b" * (19 - at)
            out.append(f'{{"k": "{inner}", "n": 1}}'.encode())
            out.append(f'["{inner}"]'.encode())
            out.append(f'"{inner}'.encode())  # never closed
    for n in range(30):
        out.append(b'"' + b"x" * n + b'"')
        out.append(b'"' + b"x" * n)
    out += [b'{"a": 1, "b": [1, 2, {"c": null}], "d": true, "e": false}',
            b'{"a":  1}', b'{"a": 1,  "b": 2}', b' {"a": 1}', b'{"a" : 1}', b'[1 ,2]',
            b'{"a": 1} ', b'[]', b'{}', b'', b' ', b'1', b'-0', b'01', b'1.5', b'1e3',
            b'1234567890123456', b'-123456789012345', b'[1, 2', b'[1, 2]]', b'tru', b'nul',
            b'[true, false, null]', b'[' * 64 + b']' * 64, b'[' * 65 + b']' * 65,
            b'{"k": 1, "tag": "x", "even": true}']
    return out


def test_the_twins_take_and_refuse_the_same_texts_with_the_same_bytes() -> None:
    cases = texts()
    pure = [direct.jsonb_compact(text) for text in cases]
    assert [_direct.jsonb_compact(text) for text in cases] == pure
    assert sum(piece is not None for piece in pure) > len(cases) // 4  # many taken
    assert sum(piece is None for piece in pure) > len(cases) // 4  # many refused
