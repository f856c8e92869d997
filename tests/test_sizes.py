"""A batch's size in memory (walex.sizes), checked against what tracemalloc sees freed.

Concern: ``max_pending_bytes`` bounds what walex holds in real bytes, so the
estimate the pipeline gives each batch (a few events walked, times the batch's
length) must be close to what the events take: rows of the W1 bench (bigint,
int, text, timestamptz, numeric, jsonb), wide text, nested json and arrays,
updates with the whole old row. Measured: the events of real transactions
are received and kept, then released, under tracemalloc; the memory freed is
what they held. The wire bytes, what was counted before, are far below it.
"""

from __future__ import annotations

import gc
import tracemalloc
from types import SimpleNamespace

import psycopg
import pytest
from support import collecting, run

from walex import Event, Events
from walex.rawevent import RawEvent
from walex.rawrow import pack_row
from walex.sizes import Sizer, event_bytes

TABLES = {
    "w1": ("(id bigserial PRIMARY KEY, a int, b text, c timestamptz, d numeric, e jsonb)",
           "INSERT INTO w1 (a, b, c, d, e) SELECT i, 'row ' || md5(i::text), "
           "timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second', round(i * 1.2345, 4), "
           "jsonb_build_object('k', i, 'tag', 'x', 'even', i % 2 = 0) FROM generate_series(1, 3000) i"),
    "wide": ("(id int PRIMARY KEY, payload text)",
             "INSERT INTO wide SELECT i, repeat(md5(i::text), 100) FROM generate_series(1, 300) i"),
    "docs": ("(id int PRIMARY KEY, doc jsonb, tags text[], ids int[], u uuid, raw bytea)",
             "INSERT INTO docs SELECT i, jsonb_build_object('n', i, 'items', "
             "(SELECT jsonb_agg(jsonb_build_object('sku', 'p' || j, 'qty', j)) "
             "FROM generate_series(1, 20) j), 'note', repeat('z', 50)), "
             "ARRAY['a' || i, 'b', 'c'], ARRAY[i, i + 1, i + 2, i + 3], md5(i::text)::uuid, "
             "decode(md5(i::text), 'hex') FROM generate_series(1, 1000) i"),
    "full": ("(id int PRIMARY KEY, a int, b text, c numeric)",
             "UPDATE full_ SET a = a + 1"),
}


def _held_and_estimates(dsn: str, admin: psycopg.Connection, table: str,
                        raw_rows: bool = False) -> tuple[int, int, int]:
    """(bytes tracemalloc saw freed when the received events were dropped, the sampled
    estimate of the batches, the exact walk of every event)."""
    ddl, dml = TABLES[table]
    name = "full_" if table == "full" else table
    admin.execute(f"CREATE TABLE {name} {ddl}")
    if table == "full":
        admin.execute("ALTER TABLE full_ REPLICA IDENTITY FULL")
        admin.execute("INSERT INTO full_ SELECT i, i, 'text ' || i, i * 1.5 FROM generate_series(1, 3000) i")
    admin.execute(f"CREATE PUBLICATION pub FOR TABLE {name}")
    kept: list[list[Event]] = []
    events = Events()

    @events.on_event(name)
    def keep(batch: list[Event]) -> None:
        kept.append(list(batch))

    async def main() -> None:
        async with collecting(dsn, subscriptions=[name], modules=[events], raw_rows=raw_rows) as rec:
            admin.execute(dml)
            rows = admin.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            await rec.wait_for(rows, timeout=60)

    gc.collect()
    tracemalloc.start()
    try:
        run(main())
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        untyped = sum(type(e) is RawEvent and e.raw is not None for b in kept for e in b)
        assert untyped == (sum(map(len, kept)) if raw_rows else 0)
        sizer = Sizer()
        estimate = sum(sizer.measure(SimpleNamespace(size=0, events=b)) for b in kept)
        exact = sum(event_bytes(e) + 8 for b in kept for e in b)
        kept.clear()
        gc.collect()
        freed = before - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return freed, estimate, exact


@pytest.mark.parametrize("raw_rows", [False, True], ids=["typed", "raw"])
@pytest.mark.parametrize("table", sorted(TABLES))
def test_a_batch_is_sized_by_what_its_events_hold(
    dsn: str, admin: psycopg.Connection, table: str, raw_rows: bool
) -> None:
    """Typed events, and RawEvents (walex.rawevent) whose rows nothing read: their rows
    as sent."""
    freed, estimate, exact = _held_and_estimates(dsn, admin, table, raw_rows)
    assert freed > 0
    # within a tenth of what was freed (measured: within 1%)
    assert 0.9 * freed <= estimate <= 1.15 * freed, (freed, estimate, exact)
    assert 0.9 * freed <= exact <= 1.15 * freed, (freed, estimate, exact)


def test_the_inlined_common_values_count_as_value_bytes_does() -> None:
    """event_bytes sizes the common values of a new record inline (no value_bytes call):
    the same total as value_bytes for every kind, subclasses and containers included."""
    import datetime as dt
    from collections import namedtuple
    from decimal import Decimal
    from sys import getsizeof
    from uuid import UUID

    from walex.sizes import value_bytes

    class Stamp(dt.datetime):  # a subclass: through value_bytes, as before
        pass

    class Holder:  # a value class with attributes
        def __init__(self) -> None:
            self.a = "x" * 40

    pair = namedtuple("pair", "a b")
    values = [None, True, False, 0, 7, 256, 257, -5, -6, 2**70, 1.5, "", "text" * 9, b"\x00" * 33,
              Decimal("12.3400"), dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
              dt.date(2025, 1, 1), dt.time(1, 2, 3), dt.timedelta(days=2),
              UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), Stamp(2025, 1, 1), Holder(),
              {"k": 1000, "tag": "x", "nested": [1, 2.5, {"deep": "y" * 70}]}, [300, "a"],
              (1, 2), pair(1000, "b")]
    new = {f"c{i}": v for i, v in enumerate(values)}
    event = SimpleNamespace(id="0/1:0", new_record=new, old_record=None, changes=None)
    expected = (getsizeof(event) + getsizeof(event.id) + getsizeof(new)
                + sum(value_bytes(v) for v in values))
    assert event_bytes(event) == expected
    for value in values[10:20]:  # the flat kinds: the object alone
        assert value_bytes(value) == getsizeof(value)


def test_the_compiled_sizer_gives_the_pure_totals() -> None:
    """walex._sizes (the compiled event_bytes/value_bytes) against the pure twins: every kind
    of value (ASCII and non-ASCII text, ints of every width, the flat kinds, subclasses,
    value classes, nested and huge documents past the node bound), typed events with old
    records and changes, RawEvents with their rows as sent, and duck-typed events."""
    import datetime as dt
    from collections import namedtuple
    from decimal import Decimal
    from uuid import UUID

    from walex import sizes
    from walex.event import Change, EventType, Source

    compiled = pytest.importorskip("walex._sizes")
    if sizes.event_bytes is sizes.py_event_bytes:
        pytest.skip("WALEX_PURE_PYTHON is set: the pure twins serve")
    assert sizes.event_bytes is compiled.event_bytes and sizes.value_bytes is compiled.value_bytes

    class Stamp(dt.datetime):
        pass

    class Text(str):
        pass

    class Holder:
        def __init__(self) -> None:
            self.a = "x" * 40

    class Slotted:
        __slots__ = ("a",)

    pair = namedtuple("pair", "a b")
    text = "row " + "ab" * 20
    unicode_text = "héllo wörld"
    unicode_text.encode()  # a str whose UTF-8 copy is kept (counted by str.__sizeof__)
    values = [None, True, False, 0, 7, 256, 257, -5, -6, -257, 2**29, 2**30, 2**31, 2**60,
              -(2**62), 2**63, 2**70, 10**40, 1.5, float("nan"), "", "x", text, unicode_text,
              "日本語", "😀" * 3, Text("sub"), b"", b"\x00" * 33, bytearray(b"ab"),
              Decimal("12.3400"), Decimal("1e-30"), Decimal("123456789012345678901234567890.5"),
              dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2025, 1, 1),
              dt.date(2025, 1, 1), dt.time(1, 2, 3), dt.timedelta(days=2),
              UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), Stamp(2025, 1, 1), Holder(), Slotted(),
              {"k": 1000, "tag": "x", "even": True},
              {"k": 1000, "tag": "x", "nested": [1, 2.5, {"deep": "y" * 70, "k" * 70: None}]},
              {1: "int key", ("t",): 2}, {"k" * 64: 2**40, "f": 1.5, "d": Decimal("2.5"), "h": Holder(),
                                          "s": Slotted(), "n": None, "b": False, "u": "ü", "i": 9},
              {"k" * 65: 1}, {"t": (1, 2)}, {}, {str(i): i for i in range(4998)},
              {str(i): 1000 + i for i in range(5000)}, {str(i): [i] for i in range(5000)}, [300, "a", None, [1, [2, [3]]]], (1, 2), pair(1000, "b"),
              {"big": [{"n": i, "s": f"v{i}"} for i in range(3000)]}, list(range(200, 12000)),
              [[i] for i in range(6000)]]
    class Blob(bytes):
        pass

    # exact bytes and tuples are sized from their length (a RawEvent's rows as sent)
    values += [(), ("a", None, 3), tuple(range(50)), (None,) * 300, bytes(1), b"x" * 1000,
               bytes(100_000), Blob(b"sub")]
    for value in values:
        assert compiled.value_bytes(value) == sizes.py_value_bytes(value), value

    source = Source(db="d", schema="s", table="t", columns={}, primary_key=("id",))
    new = {f"c{i}": v for i, v in enumerate(values)}
    old = {f"c{i}": (v if i % 2 else f"old {i}") for i, v in enumerate(values)}
    changes = {"c0": Change(1, 2), "c2": Change("a", "b")}
    events = [
        Event("t", EventType.INSERT, source, new, None, None, dt.datetime(2025, 1, 1), "0/1", "A" * 25),
        Event("t", EventType.UPDATE, source, new, old, changes, dt.datetime(2025, 1, 1), "0/1", "id"),
        Event("t", EventType.DELETE, source, None, old, None, dt.datetime(2025, 1, 1), "0/1", "é"),
        Event("t", EventType.UPDATE, source, new, old, {}, dt.datetime(2025, 1, 1), "0/1", ""),
        SimpleNamespace(id="0/1:0", new_record=new, old_record=None, changes=None),
        RawEvent.of("t", EventType.UPDATE, source,
                    (None, pack_row((b"1", None, b"x" * 50)), pack_row((b"1", b"y")), "O", 5),
                    None, "0/1", "raw id"),
        RawEvent.of("t", EventType.INSERT, source, (None, pack_row((b"2",)), None, "", 2**40),
                    None, "0/1", "r2"),
        RawEvent.of("t", EventType.INSERT, source,
                    (None, pack_row(tuple(b"v" * i for i in range(40))), None, "", 3),
                    None, "0/1", "r3"),
    ]
    for event in events:
        assert compiled.event_bytes(event) == sizes.py_event_bytes(event), event
    assert Sizer.measure is compiled.measure
    pure, fast = Sizer(), Sizer()
    for batch in ([events[0]], [events[5]], events, events * 3, [events[1]] * 9):
        for wire in (0, 100, 4096, 4097, 10**6, 10**9):
            a, b = SimpleNamespace(size=wire, events=batch), SimpleNamespace(size=wire, events=batch)
            assert fast.measure(b) == pure.py_measure(a) and b.size == a.size
            assert fast.scale == pure.scale
