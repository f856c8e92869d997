"""The fast encoder writes the reference's bytes, for every value.

``encode``/``encode_event`` take most events through a fast path (plain
columns checked by the types of their values and handed to orjson as they
are, per-table parts encoded once) and send the rest to
``encode_event_reference`` (every value through ``json_value``). These tests
compare the two byte for byte over the type matrix and the values Python
cannot hold, streamed from a real PostgreSQL, over a table of the bench's
column types with their edge values, and over generated events; and check
the fast path does take the ordinary events itself.
"""

from __future__ import annotations

import os
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import collecting, run
from test_types import ROW_IDS, ROW_VALUES
from test_types import SCHEMA as MATRIX_SCHEMA
from workers.test_edge_values import SCHEMA as EDGE_SCHEMA
from workers.test_edge_values import rows as edge_rows

from walex import UNCHANGED_TOAST, Change, Event, EventType, Source
from walex.destinations import encoding
from walex.destinations.encoding import encode, encode_event, encode_reference


# the fast path's two twins: pure Python, and walex._encode when it was built
PATHS = [encoding._fast_event] + ([encoding.compiled_fast_event]
                                  if encoding.compiled_fast_event is not None else [])
# and of encode: an event at a time with the reference for what the fast path leaves
BATCH_PATHS = [encoding._encode_events] + ([encoding.compiled_fast_events]
                                           if encoding.compiled_fast_events is not None else [])
# and of encode_sized: the same messages, and the bytes of their bodies added up
SIZED_PATHS = [encoding._encode_events_sized] + (
    [encoding.compiled_fast_events_sized] if encoding.compiled_fast_events_sized is not None
    else [])


@pytest.mark.skipif(encoding.compiled_fast_event is None,
                    reason="walex._encode not built (no Cython or C compiler at install)")
def test_the_compiled_twin_serves_unless_pure_python_is_asked_for() -> None:
    expected = encoding._fast_event if os.environ.get("WALEX_PURE_PYTHON") \
        else encoding.compiled_fast_event
    assert encoding._fast is expected
    assert encoding._events is (encoding._encode_events if os.environ.get("WALEX_PURE_PYTHON")
                                else encoding.compiled_fast_events)
    assert encoding._events_sized is (encoding._encode_events_sized
                                      if os.environ.get("WALEX_PURE_PYTHON")
                                      else encoding.compiled_fast_events_sized)


def fast_count(events: list[Event], partitions: int) -> int:
    """How many events the fast path encoded itself, the same in both twins (each checked
    against the reference, and both twins taking on the same events)."""
    counts = []
    for fast in PATHS:
        taken = 0
        for event in events:
            try:
                out = fast(event, partitions)
            except (encoding._Unfit, encoding.orjson.JSONEncodeError):
                continue
            assert out == encoding.encode_event_reference(event, partitions), (fast, event)
            taken += 1
        counts.append(taken)
    assert len(set(counts)) == 1, counts
    return counts[0]


def assert_same(events: list[Event]) -> None:
    for partitions in (1, 5):
        reference = encode_reference(events, partitions)
        outputs = [encode(events, partitions)] + [each(events, partitions) for each in BATCH_PATHS]
        for fast in PATHS:
            outputs.append([_through(fast, event, partitions) for event in events])
        for sized in [encoding.encode_sized] + SIZED_PATHS:
            out, size = sized(events, partitions)
            assert size == sum(len(o.body) for o in reference), sized
            outputs.append(out)
        for out in outputs:
            for event, a, b in zip(events, out, reference, strict=True):
                assert a == b, f"{event.type} {event.id}:\n{a.body!r}\n{b.body!r}"
        fast_count(events, partitions)


def _through(fast: Any, event: Event, partitions: int) -> Any:
    """``encode_event`` with one twin of the fast path."""
    try:
        return fast(event, partitions)
    except (encoding._Unfit, encoding.orjson.JSONEncodeError):
        return encoding.encode_event_reference(event, partitions)


def test_type_matrix_fast_equals_reference(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(MATRIX_SCHEMA)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["typed"]) as rec:
            admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
            admin.execute("UPDATE typed SET c_int4 = 5, c_bytea = '\\x01', c_float8 = 'NaN'")
            admin.execute("DELETE FROM typed WHERE id = 2")
            admin.execute("TRUNCATE typed")
            return await rec.wait_for(2 * len(ROW_IDS) + 2)

    events = run(main())
    assert_same(events)
    fast_count(events, 3)


def test_values_python_cannot_hold_fast_equals_reference(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EDGE_SCHEMA)
    statements = edge_rows(admin)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["edge"]) as rec:
            for statement in statements:
                admin.execute(statement)
            admin.execute("UPDATE edge SET c_date = c_date")
            return await rec.wait_for(len(statements) + 7)

    events = run(main())
    assert_same(events)
    fast_count(events, 1)


PLAIN_SCHEMA = """
CREATE TABLE plain (
    id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric, e jsonb, f float8,
    g uuid, h date, i boolean, j varchar(32), k timestamp, big text
);
ALTER TABLE plain ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE PUBLICATION pub FOR TABLE plain;
"""
PLAIN_ROWS = """
(1, 1, 'row 1', '2025-01-01 00:00:01+00', 1.2345, '{"k": 1, "tag": "x"}', 0.5,
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2025-01-01', true, 'v', '2025-01-01 00:00', 'x'),
(2, NULL, 'é "quoted" \\ ✓', '2024-02-29 23:59:59.999999+05:30', 'NaN', '[1, 2.5, null]', 'NaN',
 NULL, 'infinity', false, '', '0044-03-15 12:00:00 BC', NULL),
(3, -2147483648, '', '-infinity', 'Infinity', '{"n": 1180591620717411303425}', '-Infinity',
 NULL, '0044-03-15 BC', NULL, NULL, 'infinity', NULL),
(9007199254740993, 4, 'big key', '10000-01-01 00:00:00+00', '-0.000000000000000000001',
 '{"n": 9007199254740993}', 1e300, NULL, '10000-01-01', true, NULL, NULL, NULL),
(5, 5, 'five', '2025-06-01 12:00:00+00', 100, 'null', 3.0, NULL, '2025-06-01', true, NULL, NULL,
 repeat('toast', 5000))
"""


def test_bench_columns_fast_path_and_its_fallbacks(admin: psycopg.Connection, dsn: str) -> None:
    """The bench's column types with their edge values: ordinary rows go the fast way, the
    rest (a key beyond 2**53, a huge jsonb number, an unchanged TOAST value) the reference's,
    with the same bytes either way."""
    admin.execute(PLAIN_SCHEMA)

    async def main() -> list[Event]:
        async with collecting(dsn) as rec:
            admin.execute(f"INSERT INTO plain VALUES {PLAIN_ROWS}")
            admin.execute("UPDATE plain SET a = 7 WHERE id = 5")  # big is not resent
            admin.execute("UPDATE plain SET f = 'Infinity', d = 2 WHERE id = 1")
            admin.execute("DELETE FROM plain WHERE id = 3")
            return await rec.wait_for(8)

    events = run(main())
    assert any(v is UNCHANGED_TOAST for e in events if e.new_record for v in e.new_record.values())
    assert_same(events)
    taken = fast_count(events, 4)
    assert taken >= 5  # rows 1, 2, 5, the update of row 1, the delete


# -- generated events ----------------------------------------------------------

_UTC = st.sampled_from(
    [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=3, seconds=7))])
_INTS = st.one_of(st.integers(-(2**31), 2**31), st.integers(-(2**70), 2**70),
                  st.sampled_from([2**53 - 1, 2**53, -(2**53 - 1), -(2**53)]))
_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_DECIMALS = st.one_of(st.decimals(allow_nan=False, allow_infinity=True, places=None),
                      st.sampled_from([Decimal("NaN"), Decimal("1E+3"), Decimal("-0.000001")]))
_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.text(), _INTS,
                               st.floats(allow_nan=False, allow_infinity=False)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=8)
_TEXT_FALLBACK = st.sampled_from(["infinity", "-infinity", "0044-03-15 BC", "24:00:00",
                                  "10000-01-01 00:00:00", "178000000 years"])
_OF_TYPE: dict[str, Any] = {
    "int4": _INTS, "int8": _INTS, "text": st.text(), "varchar": st.text(max_size=8),
    "bool": st.booleans(), "uuid": st.uuids(), "numeric": _DECIMALS, "float8": _FLOATS,
    "float4": _FLOATS, "date": st.one_of(st.dates(), _TEXT_FALLBACK),
    "timestamp": st.one_of(st.datetimes(), _TEXT_FALLBACK),
    "timestamptz": st.one_of(st.datetimes(timezones=_UTC), _TEXT_FALLBACK),
    "time": st.one_of(st.times(), _TEXT_FALLBACK), "timetz": st.times(timezones=_UTC),
    "interval": st.one_of(st.timedeltas(), _TEXT_FALLBACK), "bytea": st.binary(max_size=8),
    "jsonb": _JSON, "json": _JSON, "int4[]": st.lists(st.one_of(st.none(), _INTS), max_size=3),
    "float8[]": st.lists(_FLOATS, max_size=3), "numeric[]": st.lists(_DECIMALS, max_size=3),
}
# a value of any type in any column: a loader the user registered with psycopg, say
_ANY = st.one_of(*_OF_TYPE.values(), st.just(UNCHANGED_TOAST))


@st.composite
def events(draw: st.DrawFn) -> list[Event]:
    types = draw(st.lists(st.sampled_from(sorted(_OF_TYPE)), min_size=1, max_size=8))
    columns = {f"c{n}": kind for n, kind in enumerate(types)}
    key = draw(st.sampled_from([(), ("c0",), ("c0", f"c{len(types) - 1}")]))
    source = Source(db="d b", schema="public", table=draw(st.sampled_from(["t", "odd/name"])),
                    columns=columns, primary_key=key,
                    base_types=draw(st.sampled_from([{}, {"posint": "int4"}])))

    def record() -> dict[str, Any]:
        return {name: draw(st.one_of(st.none(), _OF_TYPE[kind]) if draw(st.integers(0, 9)) else _ANY)
                for name, kind in columns.items()}

    out = []
    for n in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(list(EventType)))
        new = record() if kind in (EventType.INSERT, EventType.UPDATE) else None
        old = record() if kind is EventType.DELETE or (kind is EventType.UPDATE and draw(st.booleans())) else None
        changes = ({name: Change(old[name], new[name]) for name in columns if old[name] != new[name]}
                   if new is not None and old is not None else None)
        out.append(Event(name=source.table, type=kind, source=source, new_record=new, old_record=old,
                         changes=changes, timestamp=draw(st.datetimes(datetime(2000, 1, 1), timezones=_UTC)),
                         lsn="0/16B3748", id=f"00000000016B3748-{n:08X}"))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_generated_events_fast_equals_reference(batch: list[Event]) -> None:
    assert_same(batch)


def test_ordinary_rows_take_the_fast_path() -> None:
    """The bench's W1 and W4 rows never need the reference (it would be no faster)."""
    columns = {"id": "int8", "a": "int4", "b": "text", "c": "timestamptz", "d": "numeric",
               "e": "jsonb", "f": "float8", "g": "uuid", "h": "date", "i": "bool", "j": "varchar",
               "k": "time"}
    source = Source(db="db", schema="public", table="t", columns=columns, primary_key=("id",))
    record = {"id": 1, "a": 2, "b": "x", "c": datetime(2025, 1, 1, tzinfo=timezone.utc),
              "d": Decimal("1.5"), "e": {"k": [1, None]}, "f": float("nan"), "g": uuid.uuid4(),
              "h": date(2025, 1, 1), "i": True, "j": "", "k": time(12, 0)}
    event = Event(name="t", type=EventType.INSERT, source=source, new_record=record,
                  old_record=None, changes=None, timestamp=datetime(2025, 1, 1, tzinfo=timezone.utc),
                  lsn="0/1", id="0000000000000001-00000000")
    assert fast_count([event], 1) == 1
    assert encode_event(event) == encoding.encode_event_reference(event)
    assert event.new_record is record and record["f"] != record["f"]  # the event is left alone


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def kept_bodies_kb(encode_all: Any, n: int = 5000) -> float:
    """KB of resident memory per encoded event a kept batch adds (events made beforehand)."""
    source = Source(db="db", schema="public", table="t",
                    columns={"id": "int8", "a": "int4", "b": "text", "d": "numeric"},
                    primary_key=("id",))
    events = [Event(name="t", type=EventType.INSERT, source=source,
                    new_record={"id": i, "a": i, "b": f"row {i}", "d": Decimal(i) / 8},
                    old_record=None, changes=None,
                    timestamp=datetime(2025, 1, 1, tzinfo=timezone.utc), lsn="0/1",
                    id=f"0000000000000001-{i:08X}") for i in range(n)]
    before = _rss_kb()
    batch = encode_all(events)
    grown = _rss_kb() - before
    assert len(batch) == n
    return grown / n


def test_a_kept_batch_holds_its_bytes_not_a_page_per_event() -> None:
    """A batch is kept until the broker confirmed it: each body must hold about its own
    size (~200 bytes here), not the page-sized buffer orjson wrote it in (~4 KB)."""
    for encode_all in (encode, encode_reference):
        assert kept_bodies_kb(encode_all) < 1.5, encode_all


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.decimals(places=None),
                 st.integers(0, 30).flatmap(lambda places: st.decimals(
                     allow_nan=False, allow_infinity=False, places=places)),
                 st.builds(lambda sign, digits, exponent: Decimal((sign, tuple(digits), exponent)),
                           st.integers(0, 1), st.lists(st.integers(0, 9), min_size=1, max_size=6),
                           st.integers(-30, 30))))
def test_numeric_text_is_the_reference_form(value: Decimal) -> None:
    """The fast path writes a Decimal's str() unless it is in exponent form: format(v, "f")."""
    columns = {"id": "int4", "n": "numeric"}
    source = Source(db="db", schema="public", table="t", columns=columns, primary_key=("id",))
    event = Event(name="t", type=EventType.INSERT, source=source, new_record={"id": 1, "n": value},
                  old_record=None, changes=None, timestamp=datetime(2025, 1, 1, tzinfo=timezone.utc),
                  lsn="0/1", id="0000000000000001-00000000")
    assert fast_count([event], 1) == 1


def _event(source: Source, record: dict[str, Any], moment: datetime, n: int = 0) -> Event:
    return Event(name=source.table, type=EventType.INSERT, source=source, new_record=record,
                 old_record=None, changes=None, timestamp=moment, lsn="0/1",
                 id=f"0000000000000001-{n:08X}")


def test_time_is_utc_rfc3339_for_every_moment_and_repeated_one() -> None:
    """"time" is the commit time in UTC with Z, whatever the moment's zone (naive: UTC), its
    microseconds or year; the same text for the same moment given again (the encoder keeps
    the last one), for moments alternating, and for a datetime subclass."""

    class Moment(datetime):
        pass

    plus2 = timezone(timedelta(hours=2))
    moments = [datetime(2024, 5, 1, 12, tzinfo=timezone.utc),
               datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=timezone.utc),
               datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc),
               datetime(44, 3, 15, tzinfo=timezone.utc), datetime(9999, 12, 31, 23, 59, 59, 999999,
                                                                  tzinfo=timezone.utc),
               datetime(2024, 5, 1, 12, 0, 0, 5), datetime(2024, 5, 1, 1, 0, 0, 5, tzinfo=plus2),
               Moment(2024, 5, 1, 12, 0, 0, 7, tzinfo=timezone.utc)]
    source = Source(db="db", schema="public", table="t", columns={"id": "int4"}, primary_key=("id",))
    for round_ in range(2):
        for n, moment in enumerate(moments * 2):
            aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
            expected = aware.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
            for fast in PATHS:
                out = _through(fast, _event(source, {"id": n}, moment, n), 1)
                assert out.time == expected, (moment, out.time)
                assert encoding.orjson.loads(out.body)["time"] == expected


def test_a_redefined_table_is_encoded_by_its_new_definition() -> None:
    """The fast path plans a table once per Source: a table redefined (a new Source of the
    same name) is encoded by its new columns at once, and tables alternating each by their
    own, in both twins."""
    moment = datetime(2025, 1, 1, tzinfo=timezone.utc)
    old = Source(db="db", schema="public", table="t", columns={"id": "int4", "v": "text"},
                 primary_key=("id",))
    new = Source(db="db", schema="public", table="t", columns={"id": "int4", "v": "jsonb"},
                 primary_key=("id",))
    other = Source(db="db", schema="public", table="u", columns={"k": "text"}, primary_key=("k",))
    sequence = [(old, {"id": 1, "v": "a"}), (old, {"id": 2, "v": "b"}), (new, {"id": 3, "v": {"x": 1}}),
                (other, {"k": "z"}), (new, {"id": 4, "v": [1]}), (old, {"id": 5, "v": "c"})]
    for fast in PATHS:
        for n, (source, record) in enumerate(sequence):
            event = _event(source, record, moment, n)
            out = _through(fast, event, 1)
            assert out == encoding.encode_event_reference(event, 1)
            assert encoding.orjson.loads(out.body)["data"]["columns"] == source.columns
