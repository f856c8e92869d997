"""The compiled direct twin copies an update's changed values from its own buffer: the
copy must not read the buffer a growth during that copy just freed.

A REPLICA IDENTITY FULL update writes ``"changes"`` by copying each changed column's
pieces from the new and old records already written in the buffer. On main the copy's
source was a pointer into the buffer taken before ``walex_put`` grew it (``realloc``):
when the buffer moved, the bytes were read from freed memory (valgrind: "Invalid read ...
inside a block of size 16,384 free'd"). With CPython's debug allocator
(``PYTHONMALLOC=debug``) a moved block's first and last 64 bytes are overwritten (0xDD)
when it is freed, and the first column's piece of the new record lies in them: the
document then holds those bytes. Rows of a padding column sized to put that copy at each
growth of the buffer (4 KiB to 64 KiB) are streamed by a real PostgreSQL; a subprocess
with the debug allocator runs them through the compiled hot path (raw rows) and the
compiled direct twin, and compares each with the reference.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from walex.destinations import direct

pytestmark = pytest.mark.skipif(direct.compiled_direct_event is None,
                                reason="walex.destinations._direct not built")

SCRIPT = r"""
import asyncio, pickle, struct, sys
import psycopg
from walex import hotpath
from walex.lookups import LookupConnection
from walex.assembler import TransactionAssembler
from walex.pgoutput import Decoder, Relation
from walex.pgtypes import TypeCatalog
from walex.relations import RelationCache
from walex.replication.frames import XLOGDATA_HEADER
from walex.destinations import direct
from walex.destinations.encoding import encode_event_reference

stream = pickle.load(open(sys.argv[1], "rb"))

events = []


async def raw_events():  # returns nothing: asyncio's debug mode would repr (type) them
    conn = await psycopg.AsyncConnection.connect(sys.argv[2], autocommit=True)
    lookups = LookupConnection()
    lookups.use(conn, None, None)  # the table's primary key (REPLICA IDENTITY FULL flags all)
    relations = RelationCache(TypeCatalog(lookups), "db", lambda s, t: True, lambda s, t: True)
    assembler = TransactionAssembler(relations, batch_size=10)
    decoder = Decoder()
    hot = hotpath.HotPath(assembler, decoder)
    for lsn, payload in stream:
        frame = b"w" + struct.pack(">QQQ", lsn, lsn + len(payload), 0) + payload
        batches = hot.feed(frame)
        if batches is hotpath.NOT_HANDLED:
            msg = decoder.decode(payload, lsn)
            if type(msg) is Relation:
                await relations.update(msg)
                batches = None
            else:
                batches = assembler.feed(msg, lsn, len(payload) + XLOGDATA_HEADER.size)
        for txn in batches or ():
            events.extend(txn.events)
    await conn.close()


asyncio.run(raw_events())
updates = wrong = 0
for event in events:
    out = direct.compiled_direct_event(event, 1)
    if out is None:  # unfit: raise why
        from walex.destinations import _direct
        _direct.direct_event_or_raise(event, 1)
    updates += out.body.count(b'"changes":{"a"')
    if tuple(out) != tuple(encode_event_reference(event.typed(), 1)):
        wrong += 1
print(len(events), updates, wrong)
"""


def test_changes_copied_while_the_buffer_grows(admin: psycopg.Connection, dsn: str,
                                               tmp_path: Path) -> None:
    admin.execute("CREATE TABLE u (a text, id int PRIMARY KEY, pad text); "
                  "ALTER TABLE u REPLICA IDENTITY FULL; CREATE PUBLICATION pub FOR TABLE u")
    admin.execute("SELECT pg_create_logical_replication_slot('growth', 'pgoutput')")
    # the document is ~2 x pad + 200 bytes when the new value is copied: pads around each
    # doubling of the buffer, two bytes of document apart
    pads = [p for cap in (4096, 8192, 16384, 32768, 65536) for p in range(cap // 2 - 140, cap // 2 - 60)]
    admin.execute("INSERT INTO u SELECT 'old', g, repeat('p', pad) FROM unnest(%s::int[]) "
                  "WITH ORDINALITY AS t(pad, g)", [pads])
    admin.execute("UPDATE u SET a = repeat('n', 30)")
    found = admin.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('growth', NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'pub')").fetchall()
    stream = [(int(lsn.split("/")[0], 16) << 32 | int(lsn.split("/")[1], 16), bytes(data))
              for lsn, data in found]
    (tmp_path / "stream.pkl").write_bytes(pickle.dumps(stream))
    (tmp_path / "check.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path / "stream.pkl"), dsn],
                          env={**os.environ, "PYTHONMALLOC": "debug"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events, updates, wrong = map(int, proc.stdout.split())
    assert (events, updates) == (2 * len(pads), len(pads))
    assert wrong == 0
