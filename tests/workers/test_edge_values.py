"""Values Python cannot hold, and domains, from PostgreSQL through a relay to a worker.

PostgreSQL stores dates and timestamps of ``infinity``, ``-infinity``, years
BC and years after 9999, times of ``24:00:00``, intervals beyond
``timedelta`` (and ``infinity`` from PG 17), and ranges and arrays of all
these. Python's ``date``, ``datetime``, ``time`` and ``timedelta`` cannot:
walex delivers such a value as its PostgreSQL text form, a ``str`` (the
documented fallback), and every other value typed. These tests stream such
rows from a real server:

- in-process, each value is the documented one, and the stream goes on (a
  later row arrives, the slot is acknowledged past the edge rows);
- through a relay to a real NATS JetStream and a :class:`~walex.workers.Worker`,
  the worker's events equal the in-process ones, each message validates
  against the published JSON Schema, and the relay does not stall;
- domains over date, numeric and timestamptz, and arrays of domains, reach a
  worker typed as in-process (the message names each domain's base type).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pickle
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from destinations.brokers import nats_delete
from destinations.conftest import require
from destinations.test_encoding import VALIDATOR, form_validator
from psycopg.types.range import Range
from support import collecting, run, until
from test_types import same

from walex import Event, Events
from walex.destinations.encoding import encode_event
from walex.workers import Worker

SCHEMA = """
CREATE DOMAIN d_date AS date;
CREATE DOMAIN d_num AS numeric(12, 2) CHECK (VALUE >= 0);
CREATE DOMAIN d_tstz AS timestamptz;
CREATE DOMAIN d_d_date AS d_date;  -- a domain over a domain
CREATE DOMAIN d_ints AS int[];     -- a domain over an array
CREATE TYPE span AS (since date, until timestamptz);
CREATE TABLE edge (
    id int PRIMARY KEY,
    c_date date, c_ts timestamp, c_tstz timestamptz, c_time time, c_timetz timetz,
    c_interval interval, c_daterange daterange, c_tsrange tsrange, c_tstzrange tstzrange,
    c_datemulti datemultirange, c_date_arr date[], c_tstz_arr timestamptz[],
    c_d_date d_date, c_d_num d_num, c_d_tstz d_tstz, c_d_d_date d_d_date, c_d_ints d_ints,
    c_d_date_arr d_date[], c_d_num_arr d_num[], c_d_tstz_arr d_tstz[], c_span span
);
ALTER TABLE edge REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR TABLE edge;
"""

COLUMNS = {
    "id": "int4", "c_date": "date", "c_ts": "timestamp", "c_tstz": "timestamptz",
    "c_time": "time", "c_timetz": "timetz", "c_interval": "interval",
    "c_daterange": "daterange", "c_tsrange": "tsrange", "c_tstzrange": "tstzrange",
    "c_datemulti": "datemultirange", "c_date_arr": "date[]", "c_tstz_arr": "timestamptz[]",
    "c_d_date": "d_date", "c_d_num": "d_num", "c_d_tstz": "d_tstz", "c_d_d_date": "d_d_date",
    "c_d_ints": "d_ints", "c_d_date_arr": "d_date[]", "c_d_num_arr": "d_num[]",
    "c_d_tstz_arr": "d_tstz[]", "c_span": "span",
}
BASE_TYPES = {
    "d_date": "date", "d_num": "numeric", "d_tstz": "timestamptz", "d_d_date": "date",
    "d_ints": "int4[]", "d_date[]": "date[]", "d_num[]": "numeric[]", "d_tstz[]": "timestamptz[]",
}

# (id, date, timestamp, timestamptz, time, timetz, interval); the rest of the row below
EDGES = [
    (1, "infinity", "infinity", "infinity", "24:00:00", "24:00:00+00", "178000000 years"),
    (2, "-infinity", "-infinity", "-infinity", "00:00:00", "00:00:00+15:59", "-178000000 years"),
    (3, "0044-03-15 BC", "0044-03-15 12:00:00.5 BC", "0044-03-15 12:00:00+00 BC", "23:59:59.999999",
     "24:00:00-15:59", "1 day"),
    (4, "10000-01-01", "10000-01-01 00:00:00", "10000-01-01 00:00:00+00", "12:00", "12:00+01",
     "-1 day"),
    (5, "4713-01-01 BC", "294276-12-31 23:59:59.999999", "0001-01-01 00:30:00+01", "24:00",
     "24:00+14", "0"),
    (6, "5874897-12-31", "4713-01-01 00:00:00 BC", "294276-12-31 23:59:59.999999+00", "00:00",
     "00:00+00", "1 year"),
    (7, "2024-02-29", "2024-02-29 12:00:00", "2024-02-29 12:00:00+05", "12:34:56.789",
     "12:34:56.789+02:30", "3 days 04:05:06"),
]
REST = """
    '[2024-01-01,infinity)', '[-infinity,"2024-01-01 00:00")', '(-infinity,infinity)',
    '{[-infinity,2024-01-01),[2025-01-01,infinity)}', '{infinity,2024-02-29,-infinity,"0044-03-15 BC",NULL}',
    '{infinity,"2024-02-29 12:00+00","10000-01-01 00:00+00"}',
    '{date}', 12.50, '2024-02-29 12:00+05', '{date}', '{1,NULL,3}',
    '{2024-02-29,infinity,NULL}', '{1.10,0,NULL}', '{"2024-02-29 12:00+05",-infinity}',
    ROW('{date}', 'infinity')
"""


def rows(admin: psycopg.Connection) -> list[str]:
    """One INSERT per edge row; ``{date}`` is the row's date, for the domains over date."""
    statements = []
    for row in EDGES:
        ident, day, *others = row
        values = ", ".join(psycopg.sql.quote(v) for v in (day, *others))
        rest = REST.replace("{date}", day)
        statements.append(f"INSERT INTO edge VALUES ({ident}, {values}, {rest})")
    if admin.info.server_version >= 170000:  # infinite intervals, from PostgreSQL 17
        statements.append("UPDATE edge SET c_interval = 'infinity' WHERE id = 1")
        statements.append("UPDATE edge SET c_interval = '-infinity' WHERE id = 2")
    return statements


SCALARS = ["c_date", "c_ts", "c_tstz", "c_time", "c_timetz", "c_interval", "c_d_date", "c_d_num",
           "c_d_tstz", "c_d_d_date"]


def selected(admin: psycopg.Connection, ident: int, column: str) -> Any:
    """What walex must deliver for a scalar: a SELECT's value where psycopg can type it,
    else the value's PostgreSQL text form (DateStyle ISO, as walex's stream has it)."""
    admin.execute("SET DateStyle = ISO")
    query = f"SELECT {column} FROM edge WHERE id = %s"
    admin.execute("SET TimeZone = 'UTC'")  # walex types a timestamptz in UTC
    try:
        return admin.execute(query, [ident]).fetchone()[0]  # type: ignore[index]
    except psycopg.DataError:
        admin.execute("RESET TimeZone")  # the server's, as the stream writes the text
        return admin.execute(query.replace(column, f"{column}::text", 1), [ident]).fetchone()[0]  # type: ignore[index]
    finally:
        admin.execute("RESET TimeZone")


URL = "nats://127.0.0.1:{port}?stream=EDGE_{unique}&subject=edge{unique}.{{schema}}.{{table}}.{{partition}}"


def check_message(event: Event) -> None:
    """The message the relay sends for ``event`` validates against the JSON Schema."""
    doc = orjson.loads(encode_event(event).body)
    errors = list(VALIDATOR.iter_errors(doc))
    assert not errors, errors[0].message
    data = doc["data"]
    assert data["base_types"] == BASE_TYPES
    for record in (data["new_record"], data["old_record"]):
        for name, form in (record or {}).items():
            if form is None:
                continue
            type_name = data["columns"][name]
            type_name = data["base_types"].get(type_name, type_name)
            if type_name == "span":  # a composite: an object of its fields' forms
                assert isinstance(form, dict) and set(form) == {"since", "until"}
                continue
            found = list(form_validator(type_name).iter_errors(form))
            assert not found, f"{name} ({type_name}): {form!r}: {found[0].message}"


def test_edge_values_reach_the_handler_and_the_stream_goes_on(
    admin: psycopg.Connection, dsn: str,
) -> None:
    """In-process: each value typed, or its text form where Python cannot hold it."""
    admin.execute(SCHEMA)
    statements = rows(admin)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["edge"]) as rec:
            for statement in statements:
                admin.execute(statement)
            admin.execute("UPDATE edge SET c_time = '24:00' WHERE id = 7")
            admin.execute("INSERT INTO edge (id) VALUES (8)")  # after the edge rows
            return await rec.wait_for(len(statements) + 2, timeout=60)

    events = run(main(), timeout=120)
    assert events[-1].new_record == {"id": 8, **{c: None for c in COLUMNS if c != "id"}}
    final = {e.new_record["id"]: e.new_record for e in events}  # type: ignore[index]
    for ident, *_ in EDGES:
        expected = {c: selected(admin, ident, c) for c in SCALARS}
        wrong = {c: (final[ident][c], expected[c]) for c in SCALARS
                 if not same(final[ident][c], expected[c])}
        assert not wrong, f"row {ident}: walex value != expected for {wrong}"
    # the documented forms, spelled out
    one, three, seven = final[1], final[3], final[7]
    assert (one["c_date"], one["c_ts"], one["c_tstz"], one["c_time"], one["c_timetz"]) == \
        ("infinity", "infinity", "infinity", "24:00:00", "24:00:00+00")
    assert three["c_date"] == "0044-03-15 BC" and three["c_ts"] == "0044-03-15 12:00:00.5 BC"
    assert final[4]["c_date"] == "10000-01-01" and final[4]["c_ts"] == "10000-01-01 00:00:00"
    assert one["c_daterange"] == Range(dt.date(2024, 1, 1), "infinity", "[)")
    assert one["c_tstzrange"] == Range("-infinity", "infinity", "()")
    assert one["c_date_arr"] == ["infinity", dt.date(2024, 2, 29), "-infinity", "0044-03-15 BC", None]
    assert one["c_d_date"] == "infinity" and seven["c_d_date"] == dt.date(2024, 2, 29)
    assert seven["c_d_num"] == Decimal("12.50") and seven["c_d_num_arr"] == [
        Decimal("1.10"), Decimal("0.00"), None]
    assert seven["c_d_tstz"] == dt.datetime(2024, 2, 29, 7, tzinfo=dt.timezone.utc)
    assert seven["c_d_date_arr"] == [dt.date(2024, 2, 29), "infinity", None]
    assert seven["c_d_ints"] == [1, None, 3]
    assert seven["c_time"] == "24:00:00"  # the update of row 7
    assert events[0].source.base_types == BASE_TYPES
    assert one["c_span"] == ("infinity", "infinity") and one["c_span"]._fields == ("since", "until")
    assert seven["c_span"] == (dt.date(2024, 2, 29), "infinity")


def test_edge_values_and_domains_through_a_relay_to_a_worker(
    admin: psycopg.Connection, dsn: str, unique: str,
) -> None:
    """Relay -> NATS JetStream -> worker: the worker's events equal the in-process ones."""
    port = require("nats")
    url = URL.format(port=port, unique=unique)
    admin.execute(SCHEMA)
    statements = rows(admin)
    got: list[Event] = []
    events = Events()

    @events.on_event("edge")
    async def record(batch: list[Event]) -> None:
        got.extend(batch)

    n = len(statements) + len(EDGES) + 2  # the update touches every row

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["edge"], destinations=[url]) as rec:
            worker = Worker(url + "&partitions=1", [events])
            await worker.start()
            try:
                for statement in statements:
                    admin.execute(statement)
                admin.execute("UPDATE edge SET c_ts = '-infinity', c_d_date = '0001-01-01 BC'")
                admin.execute("DELETE FROM edge WHERE id = 1")
                admin.execute("INSERT INTO edge (id) VALUES (8)")  # after the edge rows
                expected = await rec.wait_for(n, timeout=60)
                await until(lambda: len(got) >= n, f"{n} events at the worker", 60)
                # the relay acknowledged past every edge row: it did not stall on one
                await until(lambda: _flushed(admin) >= _lsn(expected[-1].lsn),
                            "the slot acknowledged past the last row", 60)
            finally:
                await asyncio.wait_for(worker.stop(), 30)
        return expected

    try:
        expected = run(main(), timeout=180)
    finally:
        asyncio.run(nats_delete(f"EDGE_{unique}", port))
    assert [e.id for e in got] == [e.id for e in expected]
    for mine, theirs in zip(got, expected):
        assert mine.source == theirs.source
        for part in ("new_record", "old_record"):
            a, b = getattr(mine, part), getattr(theirs, part)
            assert (a is None) == (b is None), part
            if b is not None:
                # a composite's fields keep their JSON forms at a worker (documented)
                wrong = {c: (a[c], b[c]) for c in b if c != "c_span" and not same(a[c], b[c])}
                assert not wrong and list(a) == list(b), f"{theirs.id} {part}: {wrong}"
                if b["c_span"] is not None:
                    assert a["c_span"] == tuple(str(v) if isinstance(v, dt.date) else v
                                                for v in b["c_span"])
        assert (mine.changes is None) == (theirs.changes is None)
        for column, change in (theirs.changes or {}).items():
            assert column == "c_span" or same(mine.changes[column], change), column  # type: ignore[index]
        check_message(theirs)
    inserted = {e.new_record["id"]: e.new_record for e in got if e.type == "insert"}  # type: ignore[index]
    assert inserted[1]["c_tstz"] == "infinity" and inserted[7]["c_d_date"] == dt.date(2024, 2, 29)
    assert inserted[7]["c_d_num"] == Decimal("12.50")
    assert inserted[7]["c_d_tstz_arr"][1] == "-infinity"
    assert isinstance(inserted[7]["c_d_tstz_arr"][0], dt.datetime)


DOMAINS = """
CREATE TABLE doms (id int PRIMARY KEY, c_d_date d_date, c_d_num d_num, c_d_tstz d_tstz,
                   c_d_d_date d_d_date, c_d_ints d_ints, c_d_date_arr d_date[],
                   c_d_num_arr d_num[], c_d_tstz_arr d_tstz[]);
ALTER PUBLICATION pub ADD TABLE doms;
"""


def test_domains_reach_a_worker_typed_as_in_process(
    admin: psycopg.Connection, dsn: str, unique: str,
) -> None:
    """Domains over date, numeric and timestamptz, a domain over a domain and over an array,
    and arrays of domains: the worker types them by ``data.base_types``, as in-process."""
    port = require("nats")
    url = URL.format(port=port, unique=unique)
    admin.execute(SCHEMA)
    admin.execute(DOMAINS)
    got: list[Event] = []
    events = Events()

    @events.on_event("doms")
    async def record(batch: list[Event]) -> None:
        got.extend(batch)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["doms"], destinations=[url]) as rec:
            worker = Worker(url + "&partitions=1", [events])
            await worker.start()
            try:
                admin.execute("""INSERT INTO doms VALUES
                    (1, '2024-02-29', 12.5, '2024-02-29 12:00+05', '0001-01-01', '{1,NULL}',
                     '{2024-02-29,NULL}', '{0.1,NULL,7}', '{"2024-02-29 12:00+05"}'),
                    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""")
                admin.execute("UPDATE doms SET c_d_num = c_d_num + 1, c_d_date = '2025-01-01'")
                expected = await rec.wait_for(4, timeout=60)
                await until(lambda: len(got) >= 4, "4 events at the worker", 60)
            finally:
                await asyncio.wait_for(worker.stop(), 30)
        return expected

    try:
        expected = run(main(), timeout=180)
    finally:
        asyncio.run(nats_delete(f"EDGE_{unique}", port))
    one = expected[0].new_record
    assert one == {
        "id": 1, "c_d_date": dt.date(2024, 2, 29), "c_d_num": Decimal("12.50"),
        "c_d_tstz": dt.datetime(2024, 2, 29, 7, tzinfo=dt.timezone.utc),
        "c_d_d_date": dt.date(1, 1, 1), "c_d_ints": [1, None],
        "c_d_date_arr": [dt.date(2024, 2, 29), None],
        "c_d_num_arr": [Decimal("0.10"), None, Decimal("7.00")],
        "c_d_tstz_arr": [dt.datetime(2024, 2, 29, 7, tzinfo=dt.timezone.utc)],
    }
    assert [e.id for e in got] == [e.id for e in expected]
    for mine, theirs in zip(got, expected):
        assert mine.source == theirs.source
        for part in ("new_record", "old_record"):
            a, b = getattr(mine, part), getattr(theirs, part)
            assert (a is None) == (b is None), part
            if b is not None:
                wrong = {c: (a[c], b[c]) for c in b if not same(a[c], b[c])}
                assert not wrong and list(a) == list(b), f"{theirs.id} {part}: {wrong}"
    update = got[2]
    assert update.new_record["c_d_num"] == Decimal("13.50")  # type: ignore[index]
    assert type(update.new_record["c_d_date_arr"][0]) is dt.date  # type: ignore[index]


HANDLERS = """
import datetime as dt, os, pickle
from decimal import Decimal
from walex import Events

events = Events()
TYPES = {"pt": lambda form: (Decimal(form["x"]), dt.date.fromisoformat(form["d"]))}


@events.on_event("doms")
def record(batch):
    with open(os.environ["RECORDED"], "ab") as out:
        for event in batch:
            pickle.dump(event.new_record, out)
"""


def test_walex_worker_types_domains_edge_values_and_user_types(
    admin: psycopg.Connection, dsn: str, unique: str, tmp_path: Path,
) -> None:
    """A ``walex worker`` process: domains and values Python cannot hold typed as in-process
    with no option, a composite typed back with ``--types package.module:mapping``."""
    port = require("nats")
    url = URL.format(port=port, unique=unique)
    admin.execute(SCHEMA)
    admin.execute(DOMAINS)
    admin.execute("CREATE TYPE pt AS (x numeric, d date); ALTER TABLE doms ADD p pt")
    (tmp_path / "handlers.py").write_text(HANDLERS)
    recorded = tmp_path / "recorded.pickle"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALEX_")}
    env["RECORDED"] = str(recorded)

    def received() -> list[dict[str, Any]]:
        found = []
        if recorded.exists():
            with recorded.open("rb") as source:
                while True:
                    try:
                        found.append(pickle.load(source))
                    except EOFError:
                        return found
        return found

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["doms"], destinations=[url]) as rec:
            proc = subprocess.Popen(
                [sys.executable, "-m", "walex.cli", "worker", url + "&partitions=1",
                 "handlers:events", "--types", "handlers:TYPES"],
                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            try:
                admin.execute("""INSERT INTO doms VALUES
                    (1, 'infinity', 12.5, '2024-02-29 12:00+05', '0044-03-15 BC', '{1,NULL}',
                     '{2024-02-29,-infinity}', '{0.1,NULL}', '{"10000-01-01 00:00+00"}',
                     ROW(1.50, '2024-02-29')),
                    (2, '2024-02-29', 0, 'infinity', NULL, NULL, NULL, NULL, NULL, NULL)""")
                expected = await rec.wait_for(2, timeout=60)

                async def done() -> None:
                    while len(received()) < 2:
                        if proc.poll() is not None:
                            raise AssertionError(f"walex worker exited {proc.returncode}: "
                                                 f"{proc.communicate()[1][-2000:]}")
                        await asyncio.sleep(0.05)

                await asyncio.wait_for(done(), 60)
            finally:
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.to_thread(proc.communicate, timeout=30)
            assert proc.returncode == 0, err[-2000:]
        return expected

    try:
        expected = run(main(), timeout=180)
    finally:
        asyncio.run(nats_delete(f"EDGE_{unique}", port))
    got = received()
    assert len(got) == len(expected) == 2
    for mine, theirs in zip(got, (e.new_record for e in expected)):
        assert theirs is not None and list(mine) == list(theirs)
        p = theirs["p"]
        assert mine["p"] == (None if p is None else tuple(p))
        wrong = {c: (mine[c], theirs[c]) for c in theirs if c != "p" and not same(mine[c], theirs[c])}
        assert not wrong, wrong
    assert got[0]["c_d_date"] == "infinity" and got[0]["c_d_num"] == Decimal("12.50")
    assert got[0]["c_d_d_date"] == "0044-03-15 BC" and got[1]["c_d_tstz"] == "infinity"
    assert got[0]["p"] == (Decimal("1.50"), dt.date(2024, 2, 29))


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def _flushed(admin: psycopg.Connection) -> int:
    row = admin.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                        " WHERE database = current_database()").fetchone()
    return 0 if row is None or row[0] is None else _lsn(row[0])


@pytest.mark.parametrize("form", [
    ("date", "infinity"), ("date", "0044-03-15 BC"), ("date", "10000-01-01"),
    ("timestamp", "-infinity"), ("timestamp", "0044-03-15 12:00:00.5 BC"),
    ("timestamptz", "10000-01-01 00:00:00+00"), ("timestamptz", "0044-03-15 12:00:00+00:53:28 BC"),
    ("time", "24:00:00"), ("timetz", "24:00:00-15:59"), ("interval", "infinity"),
    ("interval", "178000000 years"),
])
def test_the_schema_takes_the_text_forms(form: tuple[str, str]) -> None:
    type_name, value = form
    assert not list(form_validator(type_name).iter_errors(value))
    assert not list(form_validator(type_name + "[]").iter_errors([value, None]))


def test_walex_worker_types_that_are_not_a_mapping_of_callables(tmp_path: Path) -> None:
    (tmp_path / "handlers.py").write_text(HANDLERS + "\nBAD = {'pt': 'not callable'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALEX_")}
    for spec, why in (("handlers:BAD", "types must map type names to callables"),
                      ("handlers:NOPE", "module 'handlers' has no attribute 'NOPE'")):
        done = subprocess.run(
            [sys.executable, "-m", "walex.cli", "worker", "nats://127.0.0.1:1?stream=S&partitions=1",
             "handlers:events", "--types", spec],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 1, done.stderr
        assert why in done.stderr and "Traceback" not in done.stderr


def test_a_backfill_reads_them_as_the_stream_gives_them(admin: psycopg.Connection, dsn: str) -> None:
    """``read`` events of rows with such values equal the inserts the stream gave."""
    admin.execute(SCHEMA)
    statements = rows(admin)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["edge"]) as rec:
            for statement in statements:
                admin.execute(statement)
            await rec.wait_for(len(statements), timeout=60)
            job = await rec.app.backfill("edge")  # type: ignore[union-attr]
            assert (job.state, job.rows_done) == ("done", len(EDGES))
            return await rec.wait_for(len(statements) + len(EDGES), timeout=60)

    events = run(main(), timeout=120)
    streamed = {e.new_record["id"]: e for e in events[:len(statements)]}  # type: ignore[index]
    reads = events[len(statements):]
    assert [e.type.value for e in reads] == ["read"] * len(EDGES)
    for read in reads:
        insert = streamed[read.new_record["id"]]  # type: ignore[index]
        assert read.source == insert.source
        wrong = {c: (v, insert.new_record[c]) for c, v in read.new_record.items()  # type: ignore[union-attr,index]
                 if not same(v, insert.new_record[c])}  # type: ignore[index]
        assert not wrong, wrong
    assert streamed[1].new_record["c_date"] == "infinity"  # type: ignore[index]
