"""walex packs its XADD commands itself: byte for byte what redis-py packs."""

from __future__ import annotations

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from walex.destinations.encoding import Outgoing
from walex.destinations.redis import xadd_commands, xadd_head


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


@given(messages=st.lists(st.tuples(st.sampled_from(["a", "b.c", "ü"]), st.text(min_size=1),
                                    st.binary(max_size=20_000)), min_size=1, max_size=5),
       key=st.text(min_size=1),
       maxlen=st.none() | st.integers(min_value=1, max_value=2**63 - 1))
def test_xadd_bytes_are_redis_pys(messages: list[tuple[str, str, bytes]], key: str,
                                  maxlen: int | None) -> None:
    """Each message's XADD to the stream ``key`` + its table, as every redis-py packer has it."""
    batch = [Outgoing(event_id, "public", table, "insert", 0, body, "/db/public/" + table,
                      "2026-12-06T00:00:00Z", "public." + table, None)
             for table, event_id, body in messages]
    heads: dict[tuple[object, ...], bytes] = {}

    def head_of(item: Outgoing) -> bytes:
        head = heads[item[1:5]] = xadd_head(key + item.table, maxlen)
        return head

    ours = xadd_commands(batch, heads, head_of)
    assert len(ours) == len(batch)
    trim = ("MAXLEN", "~", str(maxlen)) if maxlen is not None else ()
    for pack in _packers():
        for command, item in zip(ours, batch, strict=True):
            theirs = b"".join(pack("XADD", key + item.table, *trim, "*", "id", item.id,
                                   "event", item.body))
            assert command == theirs, pack
