"""The compiled hot path (``walex._hotpath``) gives exactly what the pure-Python path gives.

Both paths are fed the same replication frames, in order, each with its own
relation cache and assembler, exactly as the reader does (``Pipeline._read_session``):
the compiled one first, the pure one (``Decoder.decode`` then
``TransactionAssembler.feed``) for the frames it hands back. What comes out is
compared: every Transaction batch (its events by ``repr``, so NaN compares and
value types count), whether the assembler is idle after each frame, and the
error that ends the stream (class, text, tag and LSN).

Streams: the messages real servers sent (``tests/pgoutput/fixtures``, PG 15 and
18), the type matrix of ``test_types.py`` captured live in text and binary
format, and hypothesis mutations of the real streams (messages dropped,
repeated, moved in from other scenarios, bytes flipped, payloads cut or
extended), with batch sizes and subscriptions varied. Last, two WalEx apps on
one database, one forced to the pure path, hand their handlers identical events.
"""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgoutput.capture import load_fixtures
from support import collecting, run, until
from test_types import DATA_COLUMNS, ROW_VALUES, SCHEMA

from walex import hotpath
from walex.pgoutput import Decoder, Relation, Type
from walex.pgtypes import TypeCatalog
from walex.lookups import LookupConnection
from walex.rawevent import RawEvent
from walex.relations import RelationCache
from walex.replication.frames import XLOGDATA_HEADER
from walex.assembler import TransactionAssembler

needs_compiled = pytest.mark.skipif(
    not hotpath.compiled_available(), reason="walex._hotpath (the compiled hot path) is not built"
)

FIXTURES = load_fixtures()
Stream = list[tuple[int, bytes]]  # (WAL start, pgoutput payload)


def frame(lsn: int, payload: bytes) -> bytes:
    return XLOGDATA_HEADER.pack(b"w", lsn, lsn + len(payload), 0) + payload


def pure_catalog(lookups: LookupConnection | None) -> TypeCatalog:
    """A TypeCatalog of the pure path (json/jsonb by walex.pgtypes.py_json_loads)."""
    saved = os.environ.get("WALEX_PURE_PYTHON")
    os.environ["WALEX_PURE_PYTHON"] = "1"
    try:
        return TypeCatalog(lookups)
    finally:
        if saved is None:
            del os.environ["WALEX_PURE_PYTHON"]
        else:
            os.environ["WALEX_PURE_PYTHON"] = saved


def _outcome(txn: Any) -> str:
    """A batch as an outcome: the raw rows its RawEvents keep (walex.rawrow), read before
    ``repr`` types them, then its repr."""
    rows = [e.raw[1:] if type(e) is RawEvent and e.raw is not None else None for e in txn.events]
    return repr(rows) + repr(txn)


async def replay(
    stream: Stream, *, compiled: bool, batch_size: int = 1000,
    subscribed: Callable[[str, str], bool] = lambda schema, table: True,
    conn: psycopg.AsyncConnection | None = None, raw: bool = False,
) -> tuple[list[Any], int]:
    """What one path makes of ``stream``: the outcome list, and how many frames it compiled."""
    lookups = None  # no connection: the types Type messages name stay text
    if conn is not None:
        lookups = LookupConnection()
        lookups.use(conn, None, None)
    catalog = pure_catalog(lookups) if not compiled else TypeCatalog(lookups)
    relations = RelationCache(catalog, "db", subscribed, (lambda schema, table: True) if raw else None)
    assembler = TransactionAssembler(relations, batch_size=batch_size)
    decoder = Decoder()
    hot = hotpath.HotPath(assembler, decoder) if compiled else None  # type: ignore[misc]
    out: list[Any] = []
    handled = 0
    try:
        for lsn, payload in stream:
            batches = hotpath.NOT_HANDLED
            if hot is not None:
                batches = hot.feed(frame(lsn, payload))
                if batches is not hotpath.NOT_HANDLED:
                    handled += 1
                    assert hot.end == lsn + len(payload)
            if batches is hotpath.NOT_HANDLED:
                msg = decoder.decode(payload, lsn)
                if type(msg) is Relation:
                    await relations.update(msg)
                    batches = None
                elif type(msg) is Type:
                    await catalog.resolve([msg.type_oid])
                    batches = None
                else:  # the frame's size, as the pipeline passes it (the byte bound's unit)
                    batches = assembler.feed(msg, lsn, len(payload) + XLOGDATA_HEADER.size)
            for txn in batches or ():
                out.append(_outcome(txn))
            out.append(assembler.idle)
    except Exception as exc:  # noqa: BLE001 - the error is part of the outcome
        out.append((type(exc).__name__, str(exc), getattr(exc, "tag", None), getattr(exc, "lsn", None)))
    return out, handled


async def replay_frames(
    stream: Stream, *, room: tuple[int, int], batch_size: int = 1000,
    subscribed: Callable[[str, str], bool] = lambda schema, table: True,
    conn: psycopg.AsyncConnection | None = None, raw: bool = False,
) -> list[Any]:
    """What the reader makes of ``stream`` with ``HotPath.feed_frames`` (a run of frames per
    call, at most ``room`` = (batches, bytes) per call): the batches and the error."""
    lookups = None
    if conn is not None:
        lookups = LookupConnection()
        lookups.use(conn, None, None)
    catalog = TypeCatalog(lookups)
    relations = RelationCache(catalog, "db", subscribed, (lambda schema, table: True) if raw else None)
    assembler = TransactionAssembler(relations, batch_size=batch_size)
    decoder = Decoder()
    hot = hotpath.HotPath(assembler, decoder)  # type: ignore[misc]
    frames = [frame(lsn, payload) for lsn, payload in stream]
    out: list[Any] = []
    i = 0
    try:
        while i < len(frames):
            batches = hot.feed_frames(frames, i, *room)
            if hot.pos > i:
                assert batches is None or len(batches) <= max(room[0], 1) or (
                    sum(b.size for b in batches[:-1]) <= room[1])
                i = hot.pos
                lsn, payload = stream[i - 1]
                assert hot.end == lsn + len(payload)
            else:
                assert batches is None
                lsn, payload = stream[i]
                i += 1
                msg = decoder.decode(payload, lsn)
                if type(msg) is Relation:
                    await relations.update(msg)
                elif type(msg) is Type:
                    await catalog.resolve([msg.type_oid])
                else:
                    batches = assembler.feed(msg, lsn, len(payload) + XLOGDATA_HEADER.size)
            out.extend(_outcome(txn) for txn in batches or ())
    except Exception as exc:  # noqa: BLE001 - the error is part of the outcome
        out.append((type(exc).__name__, str(exc), getattr(exc, "tag", None), getattr(exc, "lsn", None)))
    return out


async def both(stream: Stream, **options: Any) -> tuple[list[Any], int]:
    pure, _ = await replay(stream, compiled=False, **options)
    compiled, handled = await replay(stream, compiled=True, **options)
    assert compiled == pure
    batches = [item for item in pure if not isinstance(item, bool)]
    for room in ((1024, 1 << 40), (2, 300), (0, 0)):  # the queue's room: ample, little, none
        assert await replay_frames(stream, room=room, **options) == batches
    return pure, handled


SUBSCRIPTIONS: dict[str, Callable[[str, str], bool]] = {
    "all": lambda schema, table: True,
    "none": lambda schema, table: False,
    "some": lambda schema, table: table in ("items", "docs", "parent", "big"),
}


@needs_compiled
@pytest.mark.parametrize("cap", FIXTURES, ids=lambda c: c.name)
@pytest.mark.parametrize("batch_size", [1, 2, 1000])
@pytest.mark.parametrize("subscription", list(SUBSCRIPTIONS))
@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
def test_real_streams(cap: Any, batch_size: int, subscription: str, raw: bool) -> None:
    """Both paths, the tables' rows typed or kept as raw rows (walex.rawrow, Table.raw)."""
    out, handled = asyncio.run(both(cap.messages, batch_size=batch_size,
                                    subscribed=SUBSCRIPTIONS[subscription], raw=raw))
    assert not any(isinstance(item, tuple) for item in out), out[-1]  # no error
    if any(payload[:1] == b"B" for _, payload in cap.messages):
        assert handled > 0  # the compiled path took part


@needs_compiled
def test_compiled_objects_are_built_directly_and_freed() -> None:
    """Events, rows, batches and open transactions are built straight into their slots
    (the fast way; the classes stayed plain slots dataclasses), and nothing leaks."""
    from walex._hotpath import _direct_construction

    assert _direct_construction() == {"Event": True, "TupleData": True, "Transaction": True,
                                      "_Open": True, "Change": True}
    stream = next(c for c in FIXTURES if c.name == "pg18/dml").messages

    def live_objects() -> int:
        gc.collect()
        return sys.getallocatedblocks()

    async def replays(n: int) -> int:
        for _ in range(n):
            out, handled = await replay(stream, compiled=True, batch_size=2)
        return handled

    async def main() -> None:
        await replays(200)  # caches filled
        before = live_objects()
        assert await replays(200) > 10
        assert live_objects() - before < 100  # every Event, Change, batch... of 200 replays freed

    asyncio.run(main())


# -- hypothesis: mutations of the real streams ---------------------------------------------

POOLS: dict[int, list[tuple[int, bytes]]] = {}
for _cap in FIXTURES:
    POOLS.setdefault(_cap.server_major, []).extend(_cap.messages)


@st.composite
def mutated_streams(draw: st.DrawFn) -> Stream:
    cap = draw(st.sampled_from(FIXTURES))
    stream = list(cap.messages)
    pool = POOLS[cap.server_major]
    for _ in range(draw(st.integers(0, 4))):
        if not stream:
            break
        i = draw(st.integers(0, len(stream) - 1))
        lsn, payload = stream[i]
        op = draw(st.sampled_from(["drop", "repeat", "insert", "flip", "cut", "extend", "field"]))
        if op == "drop":
            del stream[i]
        elif op == "repeat":
            stream.insert(i, stream[i])
        elif op == "insert":  # a message of another scenario of the same server
            stream.insert(i, draw(st.sampled_from(pool)))
        elif op == "flip" and payload:
            j = draw(st.integers(0, len(payload) - 1))
            byte = draw(st.integers(0, 255))
            stream[i] = (lsn, payload[:j] + bytes([byte]) + payload[j + 1:])
        elif op == "cut":
            stream[i] = (lsn, payload[: draw(st.integers(0, max(len(payload) - 1, 0)))])
        elif op == "extend":
            stream[i] = (lsn, payload + draw(st.binary(min_size=1, max_size=3)))
        elif op == "field" and len(payload) > 9:  # overwrite 8 bytes: LSNs, times, counts
            j = draw(st.integers(1, len(payload) - 8))
            stream[i] = (lsn, payload[:j] + draw(st.binary(min_size=8, max_size=8)) + payload[j + 8:])
    return stream


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_streams(), st.integers(1, 4), st.sampled_from(list(SUBSCRIPTIONS)), st.booleans())
def test_mutated_streams(stream: Stream, batch_size: int, subscription: str, raw: bool) -> None:
    asyncio.run(both(stream, batch_size=batch_size, subscribed=SUBSCRIPTIONS[subscription],
                     raw=raw))


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(b"BCIUD"), st.binary(max_size=40)), max_size=8))
def test_random_payloads_after_the_real_relations(payloads: list[tuple[int, bytes]]) -> None:
    """Random bodies behind the hot tags, after a real stream set up relations and a Begin."""
    setup = [m for m in POOLS[18] if m[1][:1] in (b"R", b"Y")]
    begin = next(m for m in POOLS[18] if m[1][:1] == b"B")
    stream = setup + [begin] + [(0x16B3748 + n, bytes([tag]) + body)
                                for n, (tag, body) in enumerate(payloads)]
    asyncio.run(both(stream, batch_size=2))


# -- hypothesis: synthetic changes of every tuple shape ---------------------------------------

def _tuple(values: list[bytes | str | None]) -> bytes:
    """TupleData: bytes are text ('t'), None is NULL, "u" unchanged TOAST, "b:x" binary."""
    out = struct.pack("!H", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value == "u":
            out += b"u"
        elif isinstance(value, str):
            out += b"b" + struct.pack("!i", len(value) - 2) + value[2:].encode()
        else:
            out += b"t" + struct.pack("!i", len(value)) + value
    return out


def _relation(relid: int, keys: list[bool]) -> bytes:
    columns = b"".join(struct.pack("!B", key) + f"c{i}".encode() + b"\0" + struct.pack("!Ii", 25, -1)
                       for i, key in enumerate(keys))
    return b"R" + struct.pack("!I", relid) + b"public\0t\0f" + struct.pack("!H", len(keys)) + columns


values = st.one_of(st.sampled_from([b"a", b"b", b""]), st.none(), st.just("u"), st.just("b:a"))


@st.composite
def synthetic_streams(draw: st.DrawFn) -> Stream:
    ncols = draw(st.integers(1, 4))
    keys = draw(st.lists(st.booleans(), min_size=ncols, max_size=ncols))
    row = st.lists(values, min_size=ncols, max_size=ncols)
    stream: Stream = [(0, _relation(7, keys))]
    for txn in range(draw(st.integers(1, 3))):
        stream.append((0, b"B" + struct.pack("!QqI", 0x1000 * (txn + 1), 10**15, 500 + txn)))
        for _ in range(draw(st.integers(0, 5))):
            kind = draw(st.sampled_from(["I", "U", "UK", "UO", "DK", "DO"]))
            if kind == "I":
                body = b"N" + _tuple(draw(row))
            elif kind == "U":
                body = b"N" + _tuple(draw(row))
            elif kind.startswith("U"):
                body = kind[1].encode() + _tuple(draw(row)) + b"N" + _tuple(draw(row))
            else:
                body = kind[1].encode() + _tuple(draw(row))
            stream.append((0x100, kind[0].encode() + struct.pack("!I", 7) + body))
        commit_lsn = 0x1000 * (txn + 1) + draw(st.sampled_from([0, 0, 0, 8]))
        stream.append((0, b"C" + struct.pack("!BQQq", 0, commit_lsn, commit_lsn + 0x30,
                                             10**15 + draw(st.sampled_from([0, 0, 0, 1])))))
    return stream


@needs_compiled
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(synthetic_streams(), st.integers(1, 4), st.booleans())
def test_synthetic_changes(stream: Stream, batch_size: int, raw: bool) -> None:
    """Every Update/Delete branch of walex.rows: 'K' and 'O', TOAST, NULL, binary values;
    with ``raw`` the rows sent whole as text kept as raw rows, the others typed."""
    out, _ = asyncio.run(both(stream, batch_size=batch_size, raw=raw))


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_begin_and_commit_field_values(begin_ts: int, commit_ts: int, begin_lsn: int,
                                       commit_lsn: int, xid: int) -> None:
    """Timestamps over the whole int64 range (out of datetime's range too), any LSN and xid."""
    stream = [(0, _relation(7, [True])),
              (1, b"B" + struct.pack("!QqI", begin_lsn, begin_ts, xid)),
              (2, b"I" + struct.pack("!I", 7) + b"N" + _tuple([b"x"])),
              (3, b"C" + struct.pack("!BQQq", 0, commit_lsn, commit_lsn // 2, commit_ts))]
    for ts in (begin_ts, begin_ts % 10**15):  # the second one in range
        stream[1] = (1, b"B" + struct.pack("!QqI", begin_lsn, ts, xid))
        asyncio.run(both(stream))
        asyncio.run(both(stream[:3] + [(3, stream[3][1][:18] + stream[1][1][9:17])]))  # same ts


@needs_compiled
def test_commit_times_and_lsn_texts_at_the_edges() -> None:
    """The compiled commit time (a date from the day count) and LSN text against the pure
    rules, at the ends of datetime's range, around leap days and century years, the epoch,
    negative times, and LSNs of every hex width."""
    from datetime import datetime, timedelta, timezone

    from walex._hotpath import _stamps
    from walex.lsn import format_lsn
    from walex.pgoutput.decoder import _PG_EPOCH as _EPOCH
    from walex.pgoutput.decoder import pg_timestamp

    day = 86_400_000_000
    first = int((datetime(1, 1, 1, tzinfo=timezone.utc) - _EPOCH) // timedelta(microseconds=1))
    last = int((datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc) - _EPOCH)
               // timedelta(microseconds=1))
    times = [0, 1, -1, day - 1, day, -day, -day - 1, first, first - 1, first + 1, last, last + 1,
             last - 1, -(2**63), 2**63 - 1, 2**40, -(2**40)]
    for year in (1, 4, 100, 400, 1582, 1900, 1970, 1999, 2000, 2024, 2100, 2400, 9999):
        for month, dom in ((1, 1), (2, 28), (3, 1), (12, 31)):
            base = datetime(year, month, dom, tzinfo=timezone.utc)
            times.append(int((base - _EPOCH) // timedelta(microseconds=1)))
        if year % 4 == 0 and (year % 100 or year % 400 == 0):
            base = datetime(year, 2, 29, 23, 59, 59, 999999, tzinfo=timezone.utc)
            times.append(int((base - _EPOCH) // timedelta(microseconds=1)))
    times += range(-3 * day, 3 * day, 3_599_999_999)
    times += range(first, last, 7_777_777_777_777)
    lsns = [0, 1, 15, 16, 0xFFFFFFFF, 2**32, 2**32 + 1, 0xABCDEF0123456789, 2**64 - 1]
    lsns += [1 << k for k in range(64)] + [(1 << k) - 1 for k in range(1, 65)]
    for i, micros in enumerate(times):
        try:
            expected = pg_timestamp(micros)
        except (OverflowError, ValueError):
            expected = None
        lsn = lsns[i % len(lsns)]
        stamp, text = _stamps(micros, lsn)
        assert stamp == expected and (stamp is None or stamp.tzinfo is expected.tzinfo), micros
        assert text == format_lsn(lsn)
    for lsn in lsns:
        assert _stamps(0, lsn)[1] == format_lsn(lsn)


@needs_compiled
def test_event_ids_at_the_edges() -> None:
    """The compiled event id, of a position held as an int or in C, against the pure rule
    (assembler.py's ``f"{commit_lsn:016X}-{position:08X}"``), past eight hex digits too."""
    from walex._hotpath import _ids

    for lsn in (0, 1, 0x16B374D848, 2**64 - 1):
        for position in (0, 1, 15, 16, 2**31, 0xFFFFFFFF, 2**32, 2**32 + 5, 2**40, 2**63 - 1):
            assert _ids(lsn, position) == (f"{lsn:016X}-{position:08X}",) * 2, (lsn, position)


# -- the type matrix, captured live --------------------------------------------------------

def capture_type_matrix(admin: psycopg.Connection, binary: bool) -> Stream:
    admin.execute(SCHEMA)
    admin.execute("SELECT pg_create_logical_replication_slot('hot', 'pgoutput')")
    admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
    columns = ", ".join(DATA_COLUMNS)
    admin.execute(f"UPDATE typed t SET ({columns}) = "
                  f"(SELECT {columns} FROM typed s WHERE s.id = 3 - t.id) WHERE t.id IN (1, 2)")
    admin.execute("UPDATE typed SET c_int4 = 5 WHERE id = 3")
    admin.execute("DELETE FROM typed WHERE id IN (4, 5)")
    admin.execute("ALTER TABLE typed REPLICA IDENTITY DEFAULT")
    admin.execute("UPDATE typed SET id = 10 WHERE id = 1")  # key changed: 'K'
    admin.execute("DELETE FROM typed WHERE id = 10")
    options = ["proto_version", "1", "publication_names", "pub"] + (["binary", "true"] if binary else [])
    rows = admin.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('hot', NULL, NULL, "
        "VARIADIC %s::text[])", [options]).fetchall()
    hi_lo = [lsn.split("/") for lsn, _ in rows]
    return [(int(hi, 16) << 32 | int(lo, 16), bytes(data)) for (hi, lo), (_, data) in zip(hi_lo, rows)]


@needs_compiled
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_type_matrix(admin: psycopg.Connection, dsn: str, binary: bool) -> None:
    stream = capture_type_matrix(admin, binary)

    async def main() -> list[Any]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            out, handled = await both(stream, conn=conn)
            assert handled >= 10
            return out

    out = asyncio.run(main())
    assert not any(isinstance(item, tuple) for item in out), out[-1]
    text = "".join(item for item in out if isinstance(item, str))
    for value in ("Decimal('NaN')", "inf", "'a': '1'", "'very \"happy\", {yes}', None]"):
        assert value in text, (value, text[:3000])  # the typed values went through both paths


@needs_compiled
def test_values_python_cannot_hold(admin: psycopg.Connection, dsn: str) -> None:
    """Rows of infinite, BC and year-10000 dates and timestamps, 24:00, huge intervals and
    domains over them (tests/workers/test_edge_values.py): both paths give their text forms."""
    from workers.test_edge_values import SCHEMA as EDGE_SCHEMA
    from workers.test_edge_values import rows

    admin.execute(EDGE_SCHEMA)
    admin.execute("SELECT pg_create_logical_replication_slot('hot', 'pgoutput')")
    for statement in rows(admin):
        admin.execute(statement)
    admin.execute("UPDATE edge SET c_ts = '-infinity', c_d_date = '0001-01-01 BC'")
    admin.execute("DELETE FROM edge WHERE id = 1")
    found = admin.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('hot', NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'pub')").fetchall()
    stream = [(int(lsn.split("/")[0], 16) << 32 | int(lsn.split("/")[1], 16), bytes(data))
              for lsn, data in found]

    async def main() -> list[Any]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            out, handled = await both(stream, conn=conn)
            assert handled >= 5
            return out

    out = asyncio.run(main())
    assert not any(isinstance(item, tuple) for item in out), out[-1]
    text = "".join(item for item in out if isinstance(item, str))
    for value in ("'c_date': 'infinity'", "'c_time': '24:00:00'", "'0044-03-15 BC'",
                  "Range(datetime.date(2024, 1, 1), 'infinity', '[)')", "base_types={"):
        assert value in text, (value, text[:3000])


@needs_compiled
def test_whole_row_updates_share_only_immutable_unchanged_values(
    admin: psycopg.Connection, dsn: str
) -> None:
    """REPLICA IDENTITY FULL: a column sent unchanged is typed once by the compiled path
    (the old record holds the new value) only when that value is immutable; a json
    value, a list or a user loader's object is typed for each record, as the pure path does."""
    admin.execute("CREATE TABLE w (id int PRIMARY KEY, n int, t text, d numeric, ts timestamptz, "
                  "j jsonb, a int[], u uuid, x int)")
    admin.execute("ALTER TABLE w REPLICA IDENTITY FULL")
    admin.execute("CREATE PUBLICATION pub FOR TABLE w")
    admin.execute("INSERT INTO w VALUES (1, 5, 'same', 1.5, now(), '{\"k\": [1]}', '{1,2}', "
                  "gen_random_uuid(), NULL)")
    admin.execute("SELECT pg_create_logical_replication_slot('hot', 'pgoutput')")
    admin.execute("UPDATE w SET n = 6, x = 1")  # NULL to a value: a change
    admin.execute("UPDATE w SET x = NULL")
    rows = admin.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('hot', NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'pub')").fetchall()
    stream = [(int(lsn.split("/")[0], 16) << 32 | int(lsn.split("/")[1], 16), bytes(data))
              for lsn, data in rows]

    async def events(compiled: bool) -> list[Any]:
        catalog = TypeCatalog() if compiled else pure_catalog(None)
        relations = RelationCache(catalog, "db", lambda schema, table: True)
        assembler = TransactionAssembler(relations)
        decoder = Decoder()
        hot = hotpath.HotPath(assembler, decoder) if compiled else None  # type: ignore[misc]
        out: list[Any] = []
        for lsn, payload in stream:
            batches = hot.feed(frame(lsn, payload)) if hot is not None else hotpath.NOT_HANDLED
            if batches is hotpath.NOT_HANDLED:
                msg = decoder.decode(payload, lsn)
                if type(msg) is Relation:
                    await relations.update(msg)
                    continue
                batches = assembler.feed(msg, lsn)
            for txn in batches or ():
                out.extend(txn.events)
        return out

    compiled, pure = asyncio.run(events(True)), asyncio.run(events(False))
    assert [repr(e) for e in compiled] == [repr(e) for e in pure]
    first, second = compiled
    assert set(first.changes) == {"n", "x"} and set(second.changes) == {"x"}
    old, new = first.old_record, first.new_record
    for column in ("t", "d", "ts", "u"):  # immutable, sent unchanged: typed once
        assert old[column] is new[column], column
    for column in ("j", "a"):  # mutable: each record has its own
        assert old[column] == new[column] and old[column] is not new[column], column
    new["j"]["k"].append(2)
    assert old["j"] == {"k": [1]}


# -- end to end: two apps, one pure ----------------------------------------------------------

@needs_compiled
def test_app_gives_identical_events_with_and_without_the_compiled_path(
    admin: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin.execute(SCHEMA)
    admin.execute("CREATE TABLE other (id int PRIMARY KEY, note text);"
                  "ALTER PUBLICATION pub ADD TABLE other")

    async def main() -> None:
        monkeypatch.setenv("WALEX_PURE_PYTHON", "1")
        async with collecting(dsn, subscriptions=["typed"], batch_size=3) as pure:
            # the path is chosen when the reader starts its session
            await until(lambda: getattr(pure.app.pipeline, "compiled_path", None) is False,
                        "the pure app's reader")
            monkeypatch.delenv("WALEX_PURE_PYTHON")
            async with collecting(dsn, subscriptions=["typed"], batch_size=3) as compiled:
                admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
                columns = ", ".join(DATA_COLUMNS)
                with admin.transaction():
                    admin.execute("INSERT INTO other VALUES (1, 'not subscribed')")
                    admin.execute(f"UPDATE typed t SET ({columns}) = (SELECT {columns} FROM typed s "
                                  "WHERE s.id = 3 - t.id) WHERE t.id IN (1, 2)")
                    admin.execute("UPDATE other SET note = 'still not' WHERE id = 1")
                    admin.execute("DELETE FROM typed WHERE id = 5")
                admin.execute("TRUNCATE typed")
                expected = 5 + 2 + 1 + 1
                await compiled.wait_for(expected)
                await pure.wait_for(expected)
                assert compiled.app.pipeline.compiled_path is True
        for calls in (pure.calls_of("__all__"), compiled.calls_of("__all__")):
            assert [len(c) for c in calls] == [3, 2, 2, 1, 1]  # batches of 3, per transaction
        assert [repr(e) for e in compiled.events] == [repr(e) for e in pure.events]
        assert compiled.events[7].id[-8:] == "00000004"  # positions count unsubscribed changes

    assert "WALEX_PURE_PYTHON" not in os.environ
    run(main())
