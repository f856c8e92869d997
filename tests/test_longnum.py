"""The long-number scan of a CloudEvent body: the compiled twin
(``walex.destinations._longnum.long_number``) answers as the pure one
(``walex.destinations.decoding.py_long_number``) for every body: runs of digits
inside and outside strings, escapes, quotes out of place, bodies that are not JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walex.destinations.decoding import compiled_long_number, py_long_number

pytestmark = pytest.mark.skipif(
    compiled_long_number is None, reason="walex.destinations._longnum is not built"
)

D19 = b"1234567890123456789"
BODIES = [
    b"", b"{}", b'{"a":1}', D19, b"-" + D19, b'{"n":' + D19 + b"}", b'{"n":' + D19[:-1] + b"}",
    b'{"s":"' + D19 + b'"}', b'{"s":"row ' + D19 * 2 + b'","n":' + D19 + b"}",
    b'{"s":"row ' + D19 * 2 + b'","n":5}', b'{"s":"a\\"' + D19 + b'"}',
    b'{"s":"a\\\\","n":' + D19 + b"}", b'{"s":"\\u0022' + D19 + b'"}', b'"' + D19,
    b'{"a":"x"' + D19 + b'"}', b'\\' + D19, b'{"e":1e' + D19 + b"}", b"[" + D19 * 3 + b"]",
    b'{"a":"' + b"\\" * 3 + b'"' + D19 + b'"}', "{\"s\":\"ž" .encode() + D19 + b'"}',
]


@pytest.mark.parametrize("body", BODIES)
def test_the_twins_agree_on_these_bodies(body: bytes) -> None:
    assert compiled_long_number(body, py_long_number) == py_long_number(body)


def test_a_body_that_is_not_bytes_goes_to_the_reference() -> None:
    body = bytearray(b'{"n":' + D19 + b"}")
    assert compiled_long_number(body, lambda raw: "reference") == "reference"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**40, max_value=10**40)
    | st.floats(allow_nan=False) | st.text(alphabet='0123456789"\\ab\u017e', max_size=60),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(alphabet='0123456789"\\k', max_size=25), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(JSON, st.booleans())
def test_the_twins_agree_on_generated_documents(value: object, ascii: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii).encode()
    assert compiled_long_number(body, py_long_number) == py_long_number(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120).map(lambda b: b.replace(b"x", D19)))
def test_the_twins_agree_on_any_bytes(body: bytes) -> None:
    assert compiled_long_number(body, py_long_number) == py_long_number(body)
