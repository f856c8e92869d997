"""The entry ids of a batch's replies counted straight from the socket's bytes.

``scan_ids`` (compiled, ``walex.destinations._resp``) and its pure twin ``py_scan_ids``
agree on every prefix of replies as Redis sends them, with a refusal, a RESP3 push, a
null or bytes that are not RESP among them; and against the machine's Redis a batch is
confirmed without hiredis's reader reading the socket (``read_from_socket``), while a
refusal or a push among the replies still goes to hiredis as before.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser
from support import run

from walex.destinations import from_url
from walex.destinations.encoding import Outgoing
from walex.destinations.redis import compiled_scan_ids, py_scan_ids

from .conftest import require

IDS = [b"$15\r\n1765000000000-0\r\n", b"$3\r\n1-0\r\n", b"$0\r\n\r\n",
       b"$20\r\n18446744073709551-99\r\n"]
OTHERS = [b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
          b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n", b"$-1\r\n", b"_\r\n",
          b"$x\r\nab\r\n", b"$2\r\nabc\r\n", b"$2\rxab\r\n", b"$1234567890123456789\r\n",
          b"+OK\r\n"]


def _streams() -> list[bytes]:
    out = [b""]
    for other in OTHERS:
        out.append(b"".join(IDS) + other + IDS[0])
        out.append(other + b"".join(IDS))
    out.append(b"".join(IDS * 5))
    return out


@pytest.mark.skipif(compiled_scan_ids is None, reason="walex._resp not built")
@pytest.mark.parametrize("data", _streams())
def test_the_twins_agree_on_every_prefix(data: bytes) -> None:
    for end in range(len(data) + 1):
        prefix = data[:end]
        for most in (0, 1, 2, 3, 100):
            assert compiled_scan_ids(prefix, most) == py_scan_ids(prefix, most), (prefix, most)


def test_what_the_scan_counts() -> None:
    ids = b"".join(IDS)
    assert py_scan_ids(ids, 100) == (4, len(ids), True)  # all taken, the next not begun
    assert py_scan_ids(ids, 4) == (4, len(ids), False)  # all wanted
    assert py_scan_ids(ids, 2) == (2, len(IDS[0] + IDS[1]), False)
    assert py_scan_ids(ids[:-1], 100) == (3, len(ids) - len(IDS[3]), True)  # one not whole
    for other in OTHERS:  # left to hiredis, whole or not
        for end in range(1, len(other) + 1):
            n, used, want = py_scan_ids(IDS[0] + other[:end], 100)
            assert (n, used) == (1, len(IDS[0]))
            assert not want or other.startswith(b"$"), other  # only a bulk string awaited
    with pytest.raises(TypeError):
        compiled_scan_ids("$1\r\na\r\n", 1)  # type: ignore[arg-type]


def _outgoing(count: int) -> list[Outgoing]:
    return [Outgoing(f"id-{i}", "public", "a", "insert", 0, b'{"n":%d}' % i, "/db/public/a",
                     "2026-12-07T00:00:00Z", f"public.a/{i}", str(i)) for i in range(count)]


def test_a_batch_is_confirmed_from_the_socket_bytes(unique: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """3000 XADDs (replies over several socket reads, cut anywhere): every one counted,
    hiredis's ``read_from_socket`` never called, the entries stored in order; the
    connection stays in step for the next batch and for a PING."""
    port = require("redis")
    from walex.destinations import redis as module

    if module.scan_ids is None:
        pytest.skip("walex._resp not built, or WALEX_PURE_PYTHON: hiredis reads the replies")
    reads = 0
    original = _AsyncHiredisParser.read_from_socket

    async def counted(self: _AsyncHiredisParser) -> object:
        nonlocal reads
        reads += 1
        return await original(self)

    monkeypatch.setattr(_AsyncHiredisParser, "read_from_socket", counted)
    key = f"ws{unique}:a"

    async def main() -> None:
        destination = from_url(f"redis://127.0.0.1:{port}/0?stream=ws{unique}:{{table}}")
        await destination.open()
        client = aioredis.Redis(port=port)
        nonlocal reads
        reads = 0  # those of open(): HELLO, the login, PING
        try:
            batch = _outgoing(3000)
            await destination.publish(batch)
            await destination.publish(batch[:7])
            assert reads == 0
            entries = await client.xrange(key)
            assert [fields[b"id"] for _entry, fields in entries] == \
                [item.id.encode() for item in batch + batch[:7]]
            conn = destination.client.connection  # type: ignore[attr-defined]
            await conn.send_command("PING")
            assert await conn.read_response() == b"PONG"
        finally:
            await destination.close()
            await client.delete(key)
            await client.aclose()

    run(main())
