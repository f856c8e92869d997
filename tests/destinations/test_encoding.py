"""The CloudEvents envelope and the JSON form of every type of the type matrix.

The type matrix of ``tests/test_types.py`` is streamed from a real server;
each event is encoded and checked against the published JSON Schema, each
value against the form its column type has there (``x-walex-forms``), and
spot values against what they must read.
"""

from __future__ import annotations

import base64
import json
import zlib
from datetime import datetime, timezone
from decimal import Decimal
from importlib import resources
from typing import Any

import jsonschema
import orjson
import psycopg
import pytest
from support import collecting, run
from test_types import COLUMNS, ROW_IDS, ROW_VALUES, SCHEMA

from walex import UNCHANGED_TOAST, Change, Event, EventType, Source
from walex.destinations.encoding import encode, encode_event, json_value, partition_of

SCHEMA_DOC = json.loads(
    resources.files("walex.destinations").joinpath("cloudevent.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA_DOC)
FORMS = {k: v for k, v in SCHEMA_DOC["x-walex-forms"].items() if k != "description"}


def form_validator(type_name: str) -> jsonschema.Draft202012Validator:
    """A validator for the JSON form of one column type (arrays: of their elements)."""
    if type_name.endswith("[]"):
        element = {"$ref": f"#/$defs/{FORMS.get(type_name[:-2], 'text')}"}
        nested: dict[str, Any] = {"oneOf": [{"type": "null"}, element]}
        for _ in range(3):  # up to three dimensions in the matrix
            nested = {"oneOf": [{"type": "null"}, element, {"type": "array", "items": nested}]}
        schema = {"$defs": SCHEMA_DOC["$defs"], "type": "array", "items": nested}
    else:
        schema = {"$defs": SCHEMA_DOC["$defs"], "$ref": f"#/$defs/{FORMS.get(type_name, 'text')}"}
    return jsonschema.Draft202012Validator(schema)


# the user types of the matrix, by what they load as
USER_FORMS = {"mood": "text", "posint": "integer", "mood_d": "text", "pair": "composite"}


def check_values(record: dict[str, Any], columns: dict[str, str]) -> None:
    for name, value in record.items():
        if value is None:
            continue
        type_name = columns[name]
        if type_name in USER_FORMS:
            type_name = {"text": "text", "integer": "int4", "composite": "pair"}[USER_FORMS[type_name]]
            if type_name == "pair":
                assert isinstance(value, dict), (name, value)
                continue
        errors = list(form_validator(type_name).iter_errors(value))
        assert not errors, f"{name} ({columns[name]}): {value!r} is not its JSON form: {errors[0].message}"


def test_type_matrix_envelope_and_forms(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["typed"]) as rec:
            admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
            admin.execute("UPDATE typed SET c_int4 = 5, c_bytea = '\\x01' WHERE id = 1")
            admin.execute("DELETE FROM typed WHERE id = 2")
            admin.execute("TRUNCATE typed")
            return await rec.wait_for(len(ROW_IDS) + 3)

    events = run(main())
    dbname = admin.info.dbname
    docs = [orjson.loads(item.body) for item in encode(events)]
    for event, doc in zip(events, docs):
        errors = sorted(VALIDATOR.iter_errors(doc), key=str)
        assert not errors, f"{event.type} {event.id}: {errors[0].message} at {list(errors[0].path)}"
        assert doc["specversion"] == "1.0" and doc["id"] == event.id
        assert doc["source"] == f"/{dbname}/public/typed"
        assert doc["type"] == f"walex.{event.type.value}"
        assert doc["datacontenttype"] == "application/json"
        assert doc["walexlsn"] == doc["data"]["lsn"] == event.lsn
        assert datetime.fromisoformat(doc["time"].replace("Z", "+00:00")) == event.timestamp
        assert doc["data"]["columns"] == COLUMNS
        for part in ("new_record", "old_record"):
            if doc["data"][part] is not None:
                check_values(doc["data"][part], COLUMNS)

    inserts = {d["data"]["new_record"]["id"]: d["data"]["new_record"] for d in docs[:5]}
    assert [d["subject"] for d in docs[:5]] == ["1", "2", "3", "4", "5"]
    assert [d["partitionkey"] for d in docs[:2]] == ["public.typed/1", "public.typed/2"]
    one, three, four, five = inserts[1], inserts[3], inserts[4], inserts[5]
    assert one["c_int8"] == "-9223372036854775808"  # beyond 2**53: a string
    assert one["c_int4"] == 2147483647 and one["c_int2"] == -32768
    assert one["c_numeric"] == "12345678901234567890.123456789012345678901234567890"
    assert one["c_money"] == "-$1,234.56"
    assert base64.b64decode(one["c_bytea"]) == b"\x00\xff\x10\xde"
    assert one["c_timestamp"] == "2024-02-29T23:59:59.999999"
    assert datetime.fromisoformat(one["c_timestamptz"]) == datetime(
        2024, 2, 29, 18, 59, 59, 999999, tzinfo=timezone.utc)
    assert one["c_time"] == "12:34:56.789000" and one["c_timetz"] == "12:34:56.789000+02:30"
    assert one["c_interval"] == "P428DT14706.789S"  # 1 year 2 mons 3 days 04:05:06.789
    assert one["c_date"] == "2024-02-29"
    assert one["c_json"] == {"a": [1, 2.5, None], "b": 'x"y', "c": {}}
    assert one["c_jsonb"] == {"k": [True, False], "n": 1000}
    assert one["c_inet"] == "192.168.0.1/24" and one["c_cidr"] == "10.0.0.0/8"
    assert one["c_macaddr"] == "08:00:2b:01:02:03"
    assert one["c_int4range"] == {"lower": 1, "upper": 10, "bounds": "[)"}
    assert one["c_tsrange"] == {"lower": "2024-01-01T00:00:00", "upper": "2024-01-02T12:30:00",
                                "bounds": "[)"}
    assert one["c_int_arr"] == [[1, None, 3], [4, 5, None]]
    assert one["c_enum_arr"] == ["sad", 'very "happy", {yes}', None]
    assert one["c_hstore"] == {"a": "1", "b c": None, 'q"uote': "x,y", "{}": ""}
    assert one["c_composite"] == {"a": 7, "b": 'x, "y" (z)', "m": "ok"}
    assert one["c_uuid"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert three["c_float8"] == "NaN" and three["c_numeric"] == "NaN"
    assert three["c_interval"] == "-P1DT1S"  # -1 days -00:00:01
    assert three["c_int4range"] == {"empty": True}
    assert three["c_tsrange"] == {"lower": None, "upper": None, "bounds": "()"}
    assert three["c_bytea"] == "" and three["c_jsonb"] == []
    assert four["c_float4"] == "Infinity" and four["c_float8"] == "-Infinity"
    assert four["c_numeric"] == "-0.000000000000000000001"  # never in exponent form
    assert four["c_json"] is None  # the JSON document null
    assert five["c_numeric"] == "Infinity"
    assert inserts[2]["c_text"] is None

    update, delete, truncate = docs[5:]
    assert update["type"] == "walex.update" and update["subject"] == "1"
    assert update["data"]["changes"] == {
        "c_int4": {"old_value": 2147483647, "new_value": 5},
        "c_bytea": {"old_value": "AP8Q3g==", "new_value": "AQ=="},
    }
    assert update["data"]["old_record"]["c_int8"] == "-9223372036854775808"
    assert delete["type"] == "walex.delete" and delete["data"]["new_record"] is None
    assert delete["subject"] == "2" and delete["data"]["old_record"]["id"] == 2
    assert truncate["type"] == "walex.truncate" and "subject" not in truncate
    assert truncate["partitionkey"] == "public.typed"
    assert truncate["data"] == {"new_record": None, "old_record": None, "changes": None,
                                "columns": COLUMNS, "key": ["id"], "lsn": truncate["walexlsn"],
                                "base_types": {"posint": "int4", "mood_d": "mood"}}


def test_primary_key_of_full_identity_and_composite_keys(admin: psycopg.Connection, dsn: str) -> None:
    """REPLICA IDENTITY FULL flags every column as key: the subject is still the primary key."""
    admin.execute("""
        CREATE TABLE full_t (a text, b int, note text, PRIMARY KEY (b, a));
        ALTER TABLE full_t REPLICA IDENTITY FULL;
        CREATE TABLE nokey (x int);
        CREATE TABLE "odd/name" (id bigint PRIMARY KEY);
        CREATE PUBLICATION pub FOR ALL TABLES;
    """)

    async def main() -> list[Event]:
        async with collecting(dsn) as rec:
            admin.execute("INSERT INTO full_t VALUES ('x', 1, 'n')")
            admin.execute("UPDATE full_t SET note = 'm'")
            admin.execute("INSERT INTO nokey VALUES (1)")
            admin.execute("""INSERT INTO "odd/name" VALUES (9007199254740993)""")
            return await rec.wait_for(4)

    events = run(main())
    assert events[0].source.primary_key == ("b", "a")
    docs = [orjson.loads(item.body) for item in encode(events, partitions=8)]
    assert docs[0]["subject"] == docs[1]["subject"] == '[1,"x"]'
    assert docs[0]["walexpartition"] == docs[1]["walexpartition"]
    assert "subject" not in docs[2] and docs[2]["partitionkey"] == "public.nokey"
    assert docs[3]["subject"] == "9007199254740993"
    assert docs[3]["source"].endswith("/public/odd%2Fname")
    for doc in docs:
        assert not list(VALIDATOR.iter_errors(doc))


def _event(**fields: Any) -> Event:
    source = Source(db="db", schema="public", table="t",
                    columns={"id": "int8", "doc": "jsonb", "big": "text"}, primary_key=("id",))
    values: dict[str, Any] = {
        "name": "t", "type": EventType.UPDATE, "source": source, "new_record": {"id": 1},
        "old_record": None, "changes": None,
        "timestamp": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc),
        "lsn": "0/16B3748", "id": "00000000016B3748-00000000",
    }
    values.update(fields)
    return Event(**values)


def test_unchanged_toast_is_left_out_and_listed() -> None:
    event = _event(new_record={"id": 1, "doc": UNCHANGED_TOAST, "big": UNCHANGED_TOAST})
    doc = orjson.loads(encode_event(event).body)
    assert doc["data"]["new_record"] == {"id": 1}
    assert doc["data"]["unchanged_toast"] == ["doc", "big"]
    assert doc["time"] == "2024-05-01T12:00:00.123456Z"
    assert not list(VALIDATOR.iter_errors(doc))


def test_json_documents_keep_exact_numbers() -> None:
    """A jsonb integer beyond 64 bits stays a JSON number, exactly (orjson cannot encode it)."""
    huge = 2**70 + 1
    event = _event(new_record={"id": 2**60, "doc": {"n": huge, "s": [1.5, None]}, "big": None},
                   changes={"doc": Change({"n": 1}, {"n": huge})})
    body = encode_event(event).body
    assert b'"n":1180591620717411303425' in body
    doc = json.loads(body)
    assert doc["data"]["new_record"] == {"id": str(2**60), "doc": {"n": huge, "s": [1.5, None]},
                                         "big": None}
    assert doc["data"]["changes"]["doc"]["new_value"] == {"n": huge}
    assert doc["subject"] == str(2**60)


def test_values_outside_the_matrix() -> None:
    assert json_value(Decimal("1E+3")) == "1000"
    assert json_value(2**53 - 1) == 2**53 - 1 and json_value(-(2**53)) == str(-(2**53))
    assert json_value((1, "a")) == [1, "a"]  # a plain tuple is an array
    assert json_value(bytearray(b"\x01")) == "AQ=="
    assert json_value({1: 2}) == {"1": 2}
    assert json_value(object.__new__(type("Thing", (), {"__str__": lambda self: "thing"}))) == "thing"


def test_partition_is_a_stable_hash() -> None:
    """crc32, so every process, machine and Python version agrees."""
    assert partition_of("public.t/1", 1) == 0
    assert partition_of("public.t/1", 8) == zlib.crc32(b"public.t/1") % 8 == 2
    spread = {partition_of(f"public.t/{i}", 4) for i in range(100)}
    assert spread == {0, 1, 2, 3}


@pytest.mark.parametrize("partitions", [1, 3])
def test_event_partition_matches_its_key(partitions: int) -> None:
    doc = orjson.loads(encode_event(_event(), partitions).body)
    assert doc["partitionkey"] == "public.t/1"
    assert doc["walexpartition"] == zlib.crc32(b"public.t/1") % partitions
    assert doc["walexpartitions"] == partitions
