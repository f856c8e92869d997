"""The compiled hot path and the compiled direct twin keep no memory per row.

The edge rows of ``test_hotpath_edges`` (every type typed in C, values sent back to the
loaders, infinity/BC/10000 through the tolerant path, FULL and key-less updates, deletes)
replayed through the compiled hot path, typed and as raw rows, and the RawEvents (and
broken raw rows: unfit) through the compiled direct twin, tens of thousands of rows each:
the allocated blocks after a second run equal those after a first, within a margin far
below one block per row (a leak of one object per row would add ~15,000). Measured at
branch cattack over 100k+ rows of each shape (bench/PROFILE.md, "Attacking the compiled
code"); here fewer rows keep the test short.
"""

from __future__ import annotations

import asyncio
import gc
import sys

import psycopg
import pytest
from destinations.test_direct import raw_events, slot
from destinations.test_direct_edges import EDGES, _rows
from test_hotpath import replay
from test_hotpath_edges import _stream

from walex import hotpath
from walex.destinations import direct
from walex.rawevent import RawEvent

pytestmark = pytest.mark.skipif(
    not hotpath.compiled_available() or direct.compiled_direct_event is None,
    reason="the compiled hot path or direct twin is not built")

REPLAYS = 100  # x ~150 rows


def _blocks() -> int:
    gc.collect()
    return sys.getallocatedblocks()


def test_no_memory_kept_per_row(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EDGES)
    slot(admin)
    admin.execute("SELECT pg_create_logical_replication_slot('hot', 'pgoutput')")
    for statement in _rows():
        admin.execute(statement)
    admin.execute("UPDATE e SET b = NOT coalesce(b, false) WHERE id % 3 = 0")
    admin.execute("ALTER TABLE e REPLICA IDENTITY DEFAULT")
    admin.execute("UPDATE e SET b = coalesce(b, false) WHERE id % 2 = 0")
    admin.execute("DELETE FROM e WHERE id % 5 = 0")
    stream = _stream(admin)
    rows = sum(payload[:1] in (b"I", b"U", b"D") for _, payload in stream)
    for raw in (False, True):
        async def replays(n: int, raw: bool = raw) -> None:
            for _ in range(n):
                out, handled = await replay(stream, compiled=True, batch_size=7, raw=raw)
                assert handled > rows and not any(isinstance(item, tuple) for item in out)

        asyncio.run(replays(20))  # caches filled
        before = _blocks()
        asyncio.run(replays(REPLAYS))
        grown = _blocks() - before
        assert grown < 1000, (raw, grown, REPLAYS * rows)

    events = raw_events(admin, dsn)
    broken = []
    for event in events[:40]:
        table, new, old, old_kind, lsn = event.raw
        if new is not None:  # cut short, lengthened, unchanged TOAST: unfit
            for row in (new[:-1], new + b"n", new[:2] + b"u" + new[3:]):
                broken.append(RawEvent.of(event.name, event.type, event.source,
                                          (table, row, old, old_kind, lsn), event.timestamp,
                                          event.lsn, event.id))
    events += broken
    twin = direct.compiled_direct_event

    def encode(n: int) -> int:
        taken = 0
        for _ in range(n):
            for event in events:
                for parts in (1, 3):
                    taken += twin(event, parts) is not None
        return taken

    encode(10)
    before = _blocks()
    taken = encode(REPLAYS)
    grown = _blocks() - before
    assert taken >= REPLAYS * (len(events) - len(broken)) * 2
    assert grown < 1000, (grown, taken)
