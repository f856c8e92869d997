"""walex packs its XADD commands itself: byte for byte what redis-py packs, in Python and
in the compiled twin."""

from __future__ import annotations

import os

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from walex.destinations.encoding import Outgoing
from walex.destinations import redis as redis_destination
from walex.destinations.redis import py_xadd_commands, xadd_head

# the packer's two twins: pure Python, and walex.destinations._resp when it was built
PACKERS = [py_xadd_commands] + ([redis_destination.compiled_xadd_commands]
                                if redis_destination.compiled_xadd_commands is not None
                                else [])


def _packers() -> list[object]:
    encode = Encoder("utf-8", "strict", False).encode
    packers: list[object] = [PythonRespSerializer(6000, encode).pack]
    try:
        import hiredis  # noqa: F401
    except ImportError:  # pragma: no cover - the redis extra installs it
        pass
    else:
        packers.append(HiredisRespSerializer(encode=encode).pack)
    packers.append(aioredis.Connection().pack_command)  # what the client itself uses
    return packers


@given(messages=st.lists(st.tuples(st.sampled_from(["a", "b.c", "ü"]),
                                    st.sampled_from(["insert", "delete"]), st.integers(0, 1),
                                    st.text(min_size=1), st.binary(max_size=20_000)),
                          min_size=1, max_size=6),
       key=st.text(min_size=1),
       maxlen=st.none() | st.integers(min_value=1, max_value=2**63 - 1))
def test_xadd_bytes_are_redis_pys(messages: list[tuple[str, str, int, str, bytes]], key: str,
                                  maxlen: int | None) -> None:
    """Each message's XADD to its stream (named by all four of table, type, partition), as
    every redis-py packer has it, whichever of them changes from a message to the next."""
    batch = [Outgoing(event_id, "public", table, kind, partition, body, "/db/public/" + table,
                      "2026-12-06T00:00:00Z", "public." + table, None)
             for table, kind, partition, event_id, body in messages]

    def stream(item: Outgoing) -> str:
        return f"{key}{item.table}:{item.type}:{item.partition}"

    trim = ("MAXLEN", "~", str(maxlen)) if maxlen is not None else ()
    for ours_of in PACKERS:
        heads: dict[tuple[object, ...], bytes] = {}

        def head_of(item: Outgoing) -> bytes:
            head = heads[item[1:5]] = xadd_head(stream(item), maxlen)
            return head

        ours = ours_of(batch, heads, head_of)
        for pack in _packers():
            theirs = b"".join(b"".join(pack("XADD", stream(item), *trim, "*", "id", item.id,
                                            "event", item.body)) for item in batch)
            assert ours == theirs, (ours_of, pack)


def test_the_compiled_packer_is_built() -> None:
    """setup.py builds walex.destinations._resp wherever it builds walex._encode."""
    from walex.destinations import encoding

    if encoding.compiled_fast_event is None:
        pytest.skip("no compiled parts were built (no Cython or C compiler at install)")
    assert redis_destination.compiled_xadd_commands is not None
    # and it serves, unless WALEX_PURE_PYTHON asks for the pure twins
    assert redis_destination.xadd_commands is (
        py_xadd_commands if os.environ.get("WALEX_PURE_PYTHON")
        else redis_destination.compiled_xadd_commands)


def test_a_message_that_is_not_bytes_is_refused_by_both() -> None:
    """The compiled twin checks its types as Python does (no crash on a wrong body)."""
    item = Outgoing("id", "public", "a", "insert", 0, "text, not bytes",  # type: ignore[arg-type]
                    "/db/public/a", "t", "public.a", None)
    heads = {("public", "a", "insert", 0): xadd_head("s", None)}
    for ours_of in PACKERS:
        with pytest.raises(TypeError):
            ours_of([item], heads, heads.__getitem__)
