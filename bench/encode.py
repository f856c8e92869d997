"""How long walex takes to turn one event into its CloudEvent (no PostgreSQL, no broker).

    .venv/bin/python bench/encode.py                 # W1- and W4-like rows, 20000 events each
    .venv/bin/python bench/encode.py --events 100000 --partitions 8

Builds events with the values walex's loaders give for W1's row (bigint,
int, text, timestamptz, numeric, jsonb) and W4's 50-column row (int, bigint,
text, numeric, timestamptz, boolean, float8, jsonb, uuid, date, varchar),
then times ``encode`` (what the relay runs per batch: the fast path, compiled
when ``walex._encode`` was built) and its pure-Python twin against the
reference path (``encode_reference``: every value through ``json_value``)
over the same events, best of ``--reps``, in CPU time of this thread. Rough figures: the
machine's other load shows in them.

Then the same rows as RawEvents (walex.rawevent: the rows as the text PostgreSQL
sends, what the compiled hot path hands a relay), of Tables made from Relation
messages as the reader makes them: "typing" is what the typed path spends
typing the rows (``Table.load`` and the Event, through ``RawEvent.typed``),
"typed path" that plus the compiled ``encode`` of the typed events, and "direct"
``encode`` of the RawEvents (walex.destinations.direct: the JSON written from the
text; compiled when ``walex.destinations._direct`` was built) and its pure twin.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import asyncio  # noqa: E402

from walex import Event, EventType, Source  # noqa: E402
from walex.destinations import direct, encoding  # noqa: E402
from walex.destinations.encoding import encode, encode_reference  # noqa: E402
from walex.pgoutput.messages import Column, Relation  # noqa: E402
from walex.pgtypes import TypeCatalog  # noqa: E402
from walex.rawevent import RawEvent  # noqa: E402
from walex.relations import RelationCache  # noqa: E402


def encode_pure(events: list[Event], partitions: int = 1) -> list[object]:
    """``encode`` through the pure-Python twin of the fast path."""
    out = []
    for event in events:
        try:
            out.append(encoding._fast_event(event, partitions))
        except (encoding._Unfit, encoding.orjson.JSONEncodeError):
            out.append(encoding.encode_event_reference(event, partitions))
    return out

_T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
_COMMIT = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def w1_events(n: int) -> list[Event]:
    source = Source(db="bench", schema="public", table="bench_rows",
                    columns={"id": "int8", "a": "int4", "b": "text", "c": "timestamptz",
                             "d": "numeric", "e": "jsonb"}, primary_key=("id",))
    return [Event(name="bench_rows", type=EventType.INSERT, source=source,
                  new_record={"id": i, "a": i, "b": f"row {i:032x}", "c": _T0 + timedelta(seconds=i),
                              "d": Decimal(i) * Decimal("1.2345"),
                              "e": {"k": i, "tag": "x", "even": i % 2 == 0}},
                  old_record=None, changes=None, timestamp=_COMMIT, lsn="0/16B3748",
                  id=f"00000000016B3748-{i:08X}") for i in range(1, n + 1)]


_WIDE = ["int4", "int8", "text", "numeric", "timestamptz", "bool", "float8", "jsonb", "uuid",
         "date", "varchar"]


def _wide_value(kind: str, i: int, k: int) -> object:
    return {
        "int4": i + k, "int8": i * 1000 + k, "text": f"v{k}-{i}", "numeric": Decimal(i + k) / 100,
        "timestamptz": _T0 + timedelta(minutes=i + k), "bool": (i + k) % 2 == 0,
        "float8": (i + k) / 7.0, "jsonb": {"k": k, "i": i}, "uuid": uuid.UUID(int=i * 50 + k),
        "date": date(2025, 1, 1) + timedelta(days=(i + k) % 3650), "varchar": f"{i:016x}",
    }[kind]


def w4_events(n: int) -> list[Event]:
    columns = {"id": "int8"} | {f"c{k:02d}": _WIDE[k % len(_WIDE)] for k in range(1, 50)}
    source = Source(db="bench", schema="public", table="bench_wide", columns=columns,
                    primary_key=("id",))
    events = []
    for i in range(1, n + 1):
        record: dict[str, object] = {"id": i}
        for k in range(1, 50):
            record[f"c{k:02d}"] = _wide_value(_WIDE[k % len(_WIDE)], i, k)
        events.append(Event(name="bench_wide", type=EventType.INSERT, source=source,
                            new_record=record, old_record=None, changes=None, timestamp=_COMMIT,
                            lsn="0/16B3748", id=f"00000000016B3748-{i:08X}"))
    return events


_OIDS = {"int4": 23, "int8": 20, "text": 25, "numeric": 1700, "timestamptz": 1184, "bool": 16,
         "float8": 701, "jsonb": 3802, "uuid": 2950, "date": 1082, "varchar": 1043}


def _text(value: object) -> bytes:
    """PostgreSQL's text form of a W1/W4 value (the replication session's settings)."""
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S").encode() + (
            f".{value.microsecond:06d}".rstrip("0").encode() if value.microsecond else b"") + b"+00"
    if isinstance(value, dict):
        return ("{" + ", ".join(f'"{k}": {str(v).lower() if isinstance(v, bool) else v}'
                                if not isinstance(v, str) else f'"{k}": "{v}"'
                                for k, v in value.items()) + "}").encode()
    return str(value).encode()


def raw_events(events: list[Event]) -> list[RawEvent]:
    """The events as RawEvents of a Table made from a Relation message (no server: every
    column type is built in)."""
    src = events[0].source
    rel = Relation(1, src.schema, src.table, "d",
                   [Column(name, _OIDS[kind], -1, name in src.primary_key)
                    for name, kind in src.columns.items()])
    table = asyncio.run(RelationCache(TypeCatalog(None), src.db, lambda s, t: True).update(rel))
    return [RawEvent.of(e.name, e.type, table.source,
                        (table, tuple(_text(v) for v in e.new_record.values()), None, "", 1),  # type: ignore[union-attr]
                        e.timestamp, e.lsn, e.id) for e in events]


def typed_path(events: list[RawEvent], partitions: int = 1) -> list[object]:
    """What the typed path spends: the rows typed (Table.load), then ``encode``."""
    return encode([event.typed() for event in events], partitions)


def typing(events: list[RawEvent], partitions: int = 1) -> list[object]:
    return [event.typed() for event in events]


def direct_pure(events: list[RawEvent], partitions: int = 1) -> list[object]:
    out = []
    for event in events:
        got = direct.py_direct_event(event, partitions)
        out.append(got if got is not None else encoding.encode_event(event.typed(), partitions))
    return out


def best(fn: object, events: list[Event], partitions: int, reps: int, batch: int) -> float:
    times = []
    for _ in range(reps):
        start = time.thread_time()  # CPU, so other processes' load weighs less
        for at in range(0, len(events), batch):
            fn(events[at:at + batch], partitions)  # type: ignore[operator]
        times.append(time.thread_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500, help="events per encode() call")
    args = parser.parse_args()
    print("| workload | path | us/event | events/s | speed-up (raw rows: over the typed path) |\n"
          "|---|---|---|---|---|")
    for name, make in (("W1", w1_events), ("W4", w4_events)):
        events = make(args.events)
        assert [o.body for o in encode(events[:50], args.partitions)] == \
            [o.body for o in encode_reference(events[:50], args.partitions)]
        old = best(encode_reference, events, args.partitions, args.reps, args.batch)
        paths = [("reference", old),
                 ("fast path, pure Python", best(encode_pure, events, args.partitions, args.reps,
                                                 args.batch))]
        if encoding.compiled_fast_event is not None:
            paths.append(("fast path, compiled (encode)",
                          best(encode, events, args.partitions, args.reps, args.batch)))
        raws = raw_events(events)
        assert [o.body for o in encode(raws[:50], args.partitions)] == \
            [o.body for o in encode_reference([e.typed() for e in raws[:50]], args.partitions)]
        assert all(direct.py_direct_event(e, args.partitions) is not None for e in raws[:50])
        typed_secs = best(typed_path, raws, args.partitions, args.reps, args.batch)
        paths += [("raw rows: typing (Table.load, through RawEvent.typed)",
                   best(typing, raws, args.partitions, args.reps, args.batch)),
                  ("raw rows: typed path (typing + encode)", typed_secs),
                  ("raw rows: direct, pure Python", best(direct_pure, raws, args.partitions,
                                                         args.reps, args.batch))]
        if direct.compiled_direct_event is not None:
            paths.append(("raw rows: direct, compiled (encode)",
                          best(encode, raws, args.partitions, args.reps, args.batch)))
        for path, secs in paths:
            base = typed_secs if path.startswith("raw rows") else old
            print(f"| {name} | {path} | {secs / len(events) * 1e6:.2f} | {len(events) / secs:,.0f} "
                  f"| {base / secs:.2f}x |")


if __name__ == "__main__":
    main()
