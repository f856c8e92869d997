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

from walex import Event, EventType, Source  # noqa: E402
from walex.destinations import encoding  # noqa: E402
from walex.destinations.encoding import encode, encode_reference  # noqa: E402


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
    print("| workload | path | us/event | events/s | speed-up |\n|---|---|---|---|---|")
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
        for path, secs in paths:
            print(f"| {name} | {path} | {secs / len(events) * 1e6:.2f} | {len(events) / secs:,.0f} "
                  f"| {old / secs:.2f}x |")


if __name__ == "__main__":
    main()
