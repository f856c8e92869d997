"""The C tuple parser and the pure-Python one agree on every input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walex.pgoutput import decoder
from walex.pgoutput.messages import UNCHANGED_TOAST, BinaryValue


def test_the_chosen_parser_is_used(tuple_parser: str) -> None:
    assert decoder.Decoder().accelerated is (tuple_parser == "c")


def _column(kind: str, payload: bytes, declared: int | None) -> bytes:
    if kind in "nu":
        return kind.encode()
    length = len(payload) if declared is None else declared
    return kind.encode() + struct.pack("!i", length) + payload


columns = st.tuples(
    st.sampled_from("ntub?"), st.binary(max_size=12),
    st.one_of(st.none(), st.integers(-3, 20), st.just(2**31 - 1), st.just(-(2**31))),
)


def _run(parser, data: bytes, pos: int):  # type: ignore[no-untyped-def]
    try:
        row, end = parser(data, pos)
        return ("ok", row.values, row.plain, end)
    except (ValueError, IndexError, struct.error, decoder._Malformed):
        return ("error", None, None, None)


@settings(max_examples=400, deadline=None)
@given(st.lists(columns, max_size=6), st.integers(0, 6), st.binary(max_size=4),
       st.integers(-2, 3), st.integers(0, 3))
def test_c_and_python_agree(cols, extra_count, tail, cut, offset) -> None:  # type: ignore[no-untyped-def]
    if decoder._c_parse_tuple is None:
        pytest.skip("the C accelerator is not built")
    body = b"".join(_column(k, p, d) for k, p, d in cols)
    data = b"x" * offset + struct.pack("!H", len(cols) + (extra_count if cut < 0 else 0)) + body + tail
    if cut > 0:
        data = data[:-cut]
    python = _run(decoder.Decoder._py_tuple, data, offset)
    c = _run(decoder._c_tuple, data, offset)
    assert c[0] == python[0], (python, c)  # both accept, or both reject
    if c[0] == "ok":
        assert c == python
        for value in c[1]:
            assert value is None or value is UNCHANGED_TOAST or type(value) in (bytes, BinaryValue)
