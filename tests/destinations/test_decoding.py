"""Events decoded from the CloudEvents equal the in-process events, field by field.

Changes are streamed from a real server with an in-process app; each event
is encoded as a destination publishes it and decoded as a worker does; the
two must be equal field by field, values of equal Python types (the type
matrix of ``tests/test_types.py``, the types outside it, unchanged TOAST).
The documented exceptions are checked for what they are: a composite is a
named tuple of its fields' JSON forms, unless ``types`` types it.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from support import collecting, run
from test_toast import BIG, setup_table
from test_types import DATA_COLUMNS, ROW_IDS, ROW_VALUES, SCHEMA, same

from walex import UNCHANGED_TOAST, Event
from walex.destinations.decoding import Decoder, decode
from walex.destinations.encoding import encode_event
from walex.errors import DecodeError


def round_trip(event: Event, decoder: Decoder | None = None) -> Event:
    body = encode_event(event, partitions=4).body
    return (decoder or Decoder()).decode(body)


def assert_same_event(got: Event, expected: Event, skip: tuple[str, ...] = ()) -> None:
    """Equal field by field, values of the same types; ``skip``: columns compared elsewhere."""
    for name in ("name", "type", "lsn", "id", "timestamp"):
        assert getattr(got, name) == getattr(expected, name), name
    assert got.timestamp.utcoffset() == dt.timedelta(0)
    assert got.source == expected.source, (got.source, expected.source)
    for part in ("new_record", "old_record"):
        mine, theirs = getattr(got, part), getattr(expected, part)
        if theirs is None:
            assert mine is None, part
            continue
        assert list(mine) == list(theirs), part
        wrong = {c: (mine[c], theirs[c]) for c in theirs
                 if c not in skip and not same(mine[c], theirs[c])}
        assert not wrong, f"{expected.id} {part}: decoded != in-process for {wrong}"
    if expected.changes is None:
        assert got.changes is None
    else:
        assert got.changes is not None and list(got.changes) == list(expected.changes)
        for column, change in expected.changes.items():
            assert same(got.changes[column], change), column


def stream(admin: psycopg.Connection, dsn: str, statements: list[str], n: int,
           subscriptions: list[str]) -> list[Event]:
    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=subscriptions) as rec:
            for statement in statements:
                admin.execute(statement)
            return await rec.wait_for(n)

    return run(main())


def test_type_matrix_round_trips(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    assignments = ", ".join(DATA_COLUMNS)
    events = stream(admin, dsn, [
        f"INSERT INTO typed VALUES {ROW_VALUES}",
        f"UPDATE typed t SET ({assignments}) = "
        f"(SELECT {assignments} FROM typed s WHERE s.id = 3 - t.id) WHERE t.id IN (1, 2)",
        "UPDATE typed SET c_int4 = 5 WHERE id = 3",
        "DELETE FROM typed WHERE id = 4",
        "TRUNCATE typed",
    ], len(ROW_IDS) + 5, ["typed"])
    decoder = Decoder()
    decoded = [round_trip(e, decoder) for e in events]
    for got, expected in zip(decoded, events):
        assert_same_event(got, expected)
    # the composite is a named tuple of the type's name, not psycopg's class
    one = decoded[0].new_record
    assert one is not None and type(one["c_composite"]).__name__ == "pair"
    assert one["c_composite"]._fields == ("a", "b", "m")
    assert type(one["c_composite"]) is not type(events[0].new_record["c_composite"])  # type: ignore[index]
    # one Source per table, shared as in-process
    assert len({id(e.source) for e in decoded}) == 1
    assert decoded[0].source.primary_key == ("id",)


EXTRA = r"""
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TYPE inner_t AS (n int, label text);
CREATE TYPE outer_t AS (i inner_t, flag bool, amount numeric, day date);
CREATE TABLE extra (
    id bigint PRIMARY KEY, k2 text,
    c_int8range int8range, c_numrange numrange, c_daterange daterange, c_tstzrange tstzrange,
    c_int4multi int4multirange, c_nummulti nummultirange, c_tstzmulti tstzmultirange,
    c_num_arr numeric[], c_bytea_arr bytea[], c_uuid_arr uuid[], c_tstz_arr timestamptz[],
    c_interval_arr interval[], c_date_arr date[], c_inet_arr inet[], c_cidr_arr cidr[],
    c_range_arr int4range[], c_jsonb_arr jsonb[], c_json_arr json[], c_float_arr float8[],
    c_bool_arr bool[], c_int8_arr int8[], c_hstore_arr hstore[],
    c_char "char", c_name name, c_oid oid, c_lsn pg_lsn, c_mac8 macaddr8, c_bit bit(3),
    c_varbit varbit, c_point point, c_tsvector tsvector, c_inet_host inet, c_time_arr time[],
    c_outer outer_t, c_outer_arr outer_t[], c_big_jsonb jsonb
);
ALTER TABLE extra ADD UNIQUE (id, k2);
CREATE PUBLICATION pub FOR TABLE extra;
"""

EXTRA_ROW = r"""
(9007199254740993, 'k',
 '[-9223372036854775808,9223372036854775807)', '(1.5,2.25]', '[2024-01-01,2024-02-01)',
 '[2024-01-01 00:00+00,)', '{[1,3),[5,7)}', '{}', '{[2024-01-01 00:00+02,2024-01-02 00:00+02)}',
 '{1.10,NaN,-Infinity,NULL}', ARRAY['\x00'::bytea, NULL, '\xdeadbeef'::bytea],
 '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '{"2024-02-29 12:00:00.5+05:30",NULL}',
 '{"1 day 2 hours","-3 mons",00:00:00.000001}', '{2024-02-29,0001-01-01}', '{10.0.0.1,::1/128,192.168.1.0/24}',
 '{10.0.0.0/8,2001:db8::/32}', '{"[1,2)",empty,"(,)"}', ARRAY['[1,[2]]'::jsonb, '{"a":null}', NULL],
 ARRAY['[1, 2]'::json, '3', 'null'], '{1.5,NaN,Infinity,-0}', '{t,f,NULL}',
 '{9223372036854775807,-1}', ARRAY['a=>1'::hstore, NULL, ''],
 'x', 'a name', 4294967295, '16/B374D848', '08:00:2b:01:02:03:04:05', B'101',
 B'1', '(1.5,-2)', 'a fat cat', '10.1.2.3', '{12:00,23:59:59.999999}',
 ROW(ROW(1, 'in'), true, 12.50, '2024-02-29'), ARRAY[ROW(ROW(2, NULL), NULL, NULL, NULL)::outer_t, NULL],
 '{"n": 123456789012345678901234567890, "f": 1.5e300, "s": "\u00e9"}')
"""


def test_types_outside_the_matrix_round_trip(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EXTRA)
    events = stream(admin, dsn, [
        f"INSERT INTO extra VALUES {EXTRA_ROW}",
        "UPDATE extra SET k2 = 'l', c_oid = 1",
        "DELETE FROM extra",
    ], 3, ["extra"])
    decoder = Decoder()
    decoded = [round_trip(e, decoder) for e in events]
    for got, expected in zip(decoded, events):
        # composites with numeric and date fields keep those fields' JSON forms: see below
        assert_same_event(got, expected, skip=("c_outer", "c_outer_arr"))
    insert = decoded[0].new_record
    assert insert is not None
    assert insert["c_big_jsonb"]["n"] == 123456789012345678901234567890
    assert insert["id"] == 9007199254740993
    assert decoded[0].source.primary_key == ("id",)
    # outer_t(i=inner_t(1, 'in'), flag=True, amount=Decimal('12.50'), day=date(2024, 2, 29))
    outer = insert["c_outer"]
    assert type(outer).__name__ == "outer_t" and outer._fields == ("i", "flag", "amount", "day")
    assert outer == events[0].new_record["c_outer"]._replace(  # type: ignore[index]
        amount="12.50", day="2024-02-29")
    assert outer.i == (1, "in") and outer.i._fields == ("n", "label")
    assert insert["c_outer_arr"][1] is None and insert["c_outer_arr"][0].i == (2, None)


def test_types_option_types_composite_fields(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(EXTRA)
    [event] = stream(admin, dsn, [f"INSERT INTO extra VALUES {EXTRA_ROW}"], 1, ["extra"])
    typed: dict[str, Any] = {}

    def outer_t(form: dict[str, Any]) -> Any:
        typed[str(len(typed))] = form
        original = type(event.new_record["c_outer"])  # type: ignore[index]
        inner = type(event.new_record["c_outer"].i)  # type: ignore[index]
        amount, day = form["amount"], form["day"]
        return original(inner(**form["i"]), form["flag"], amount and Decimal(amount),
                        day and dt.date.fromisoformat(day))

    got = round_trip(event, Decoder(types={"outer_t": outer_t}))
    assert_same_event(got, event)
    assert same(got.new_record["c_outer"], event.new_record["c_outer"])  # type: ignore[index]
    # for an array of the type, the callable receives each element's form
    assert len(typed) == 2

    def broken(form: Any) -> Any:
        raise ValueError("no")

    with pytest.raises(DecodeError, match=r"message .*: cannot type the value of column "
                       r"'c_outer' \(outer_t\) back: ValueError\('no'\)"):
        round_trip(event, Decoder(types={"outer_t": broken}))


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_unchanged_toast_round_trips(admin: psycopg.Connection, dsn: str, identity: str) -> None:
    setup_table(admin, identity)
    events = stream(admin, dsn, [
        f"INSERT INTO doc VALUES (1, {BIG}, 0)",
        "UPDATE doc SET n = 1",
        "UPDATE doc SET id = 2",  # a key change: the old key only, the body unchanged
        "DELETE FROM doc",
    ], 4, ["doc"])
    for event in events:
        got = round_trip(event)
        assert_same_event(got, event)
        assert got == event
    if identity == "DEFAULT":
        assert events[1].new_record["body"] is UNCHANGED_TOAST  # type: ignore[index]
        assert round_trip(events[2]).new_record["body"] is UNCHANGED_TOAST  # type: ignore[index]
        assert round_trip(events[2]).old_record == {"id": 1}


def test_not_a_walex_event_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="is not a walex CloudEvent"):
        decode(b"not json")
    with pytest.raises(DecodeError, match=r"message x .*'walex.other'"):
        decode(orjson.dumps({"id": "x", "type": "walex.other"}))
    with pytest.raises(DecodeError, match="message 00000000016B3748-00000000 .*KeyError"):
        decode({"id": "00000000016B3748-00000000", "type": "walex.insert", "source": "/d/s/t"})


def test_a_backfill_read_event_round_trips() -> None:
    """``walex.read`` (an existing row from a backfill) is in the schema and decodes back."""
    import json
    from importlib import resources

    import jsonschema

    from walex import EventType, Source

    source = Source(db="db", schema="public", table="t", columns={"id": "int8", "at": "date"},
                    primary_key=("id",))
    event = Event("t", EventType.READ, source, {"id": 7, "at": dt.date(2024, 2, 29)}, None, None,
                  dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc), "0/16B3748",
                  "00000000016B3748-00000000")
    body = encode_event(event).body
    schema = json.loads(resources.files("walex.destinations").joinpath("cloudevent.schema.json")
                        .read_text())
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(orjson.loads(body)))
    assert decode(body) == event


def test_long_digit_runs_in_strings_keep_orjson_big_numbers_stay_exact(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A body whose runs of 19 digits are all inside strings (zero-padded codes, ids, an
    escaped quote before one) is parsed by orjson; one whose JSON numbers hold an integer
    beyond 64 bits by the json module, so the integer stays exact."""
    from walex import EventType, Source
    from walex.destinations import decoding

    source = Source(db="db", schema="public", table="t",
                    columns={"id": "int8", "code": "text", "doc": "jsonb"}, primary_key=("id",))

    def event(code: str, doc: Any) -> Event:
        return Event("t", EventType.INSERT, source, {"id": 7, "code": code, "doc": doc}, None,
                     None, dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc), "0/16B3748",
                     "00000000016B3748-00000000")

    calls: list[bytes] = []
    slow = decoding.json.loads
    monkeypatch.setattr(decoding.json, "loads",
                        lambda raw, **kw: calls.append(raw) or slow(raw, **kw))
    in_strings = [
        event(f"row {7:032x}", {"k": "1234567890123456789012", "n": 123456789012345678}),
        event('say "00000000000000000000001"', {"a\\": "12345678901234567890"}),
    ]
    for expected in in_strings:
        assert decode(encode_event(expected).body) == expected
    assert calls == []  # orjson took them all
    big = 123456789012345678901234567890
    for expected in (event(f"row {7:032x}", {"n": big, "s": "00000000000000000000001"}),
                     event('x "\\', [1, -big, "12345678901234567890123"])):
        got = decode(encode_event(expected).body)
        assert got == expected and got.new_record is not None
        assert isinstance(got.new_record["doc"]["n" if isinstance(got.new_record["doc"], dict)
                                                else 1], int)
    assert len(calls) == 2  # the json module took these: exact


def test_domains_are_typed_by_their_base_unless_types_names_them(
    admin: psycopg.Connection, dsn: str,
) -> None:
    """``data.base_types`` types a domain (and an array of one) as its base type; a
    ``types`` entry for the domain's own name takes precedence."""
    admin.execute("""
        CREATE DOMAIN amount AS numeric(10, 2);
        CREATE DOMAIN day AS date;
        CREATE TABLE ledger (id int PRIMARY KEY, a amount, d day, ds day[]);
        CREATE PUBLICATION pub FOR TABLE ledger;
    """)
    [event] = stream(admin, dsn, ["INSERT INTO ledger VALUES (1, 2.5, '2024-02-29', "
                                  "'{2024-02-29,infinity}')"], 1, ["ledger"])
    assert event.source.base_types == {"amount": "numeric", "day": "date", "day[]": "date[]"}
    assert event.new_record == {"id": 1, "a": Decimal("2.50"), "d": dt.date(2024, 2, 29),
                                "ds": [dt.date(2024, 2, 29), "infinity"]}
    got = round_trip(event)
    assert_same_event(got, event)
    assert got.source.base_types == event.source.base_types
    mine = round_trip(event, Decoder(types={"amount": lambda form: ("cents", form)}))
    assert mine.new_record["a"] == ("cents", "2.50")  # type: ignore[index]
    assert mine.new_record["d"] == dt.date(2024, 2, 29)  # type: ignore[index]


def test_a_table_whose_columns_change_gets_a_source_of_its_own_each_time() -> None:
    """The decoder keeps the last Source of each table and takes it again while an event's
    columns, key and base types are the ones it was made from: a column's type, the
    columns' order, the key or a base type changing (an ALTER TABLE between two events of
    one stream) gives a Source of the new shape, and the values typed by it."""
    from walex import EventType, Source

    decoder = Decoder()

    def event(columns: dict[str, str], key: tuple[str, ...], record: dict[str, Any],
              bases: dict[str, str] | None = None) -> Event:
        source = Source(db="db", schema="public", table="t", columns=columns, primary_key=key,
                        base_types=bases or {})
        return Event("t", EventType.INSERT, source, record, None, None,
                     dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc), "0/16B3748",
                     "00000000016B3748-00000000")

    first = event({"id": "int8", "at": "date"}, ("id",), {"id": 7, "at": dt.date(2024, 2, 29)})
    shapes = [  # each differs from the one before in one thing
        first,
        first,  # the same shape again: the kept Source, equal
        event({"at": "date", "id": "int8"}, ("id",), {"id": 7, "at": dt.date(2024, 2, 29)}),
        first,
        event({"id": "int8", "at": "date"}, ("id", "at"), {"id": 7, "at": dt.date(2024, 2, 29)}),
        first,
        event({"id": "int8", "at": "text"}, ("id",), {"id": 7, "at": "2024-02-29"}),
        event({"id": "int8", "at": "day"}, ("id",), {"id": 7, "at": dt.date(2024, 2, 29)},
              {"day": "date"}),
        event({"id": "int8", "at": "day"}, ("id",), {"id": 7, "at": "2024-02-29"},
              {"day": "text"}),
        first,
    ]
    for expected in shapes:
        got = decoder.decode(encode_event(expected).body)
        assert got.source == expected.source
        assert list(got.source.columns) == list(expected.source.columns)  # in order
        assert got.new_record == expected.new_record
        assert [type(v) for v in got.new_record.values()] == \
            [type(v) for v in expected.new_record.values()]  # type: ignore[union-attr]
    again = decoder.decode(encode_event(first).body).source
    assert again is decoder.decode(encode_event(first).body).source  # kept, not made again
