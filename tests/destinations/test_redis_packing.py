"""walex packs its XADD commands itself: byte for byte what redis-py packs."""

from __future__ import annotations

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from walex.destinations.redis import xadd_command, xadd_head


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


@given(key=st.text(min_size=1), event_id=st.text(min_size=1),
       body=st.binary(max_size=20_000),
       maxlen=st.none() | st.integers(min_value=1, max_value=2**63 - 1))
def test_xadd_bytes_are_redis_pys(key: str, event_id: str, body: bytes,
                                  maxlen: int | None) -> None:
    ours = xadd_command(xadd_head(key, maxlen), event_id, body)
    trim = ("MAXLEN", "~", str(maxlen)) if maxlen is not None else ()
    for pack in _packers():
        theirs = b"".join(pack("XADD", key, *trim, "*", "id", event_id, "event", body))
        assert ours == theirs, pack
