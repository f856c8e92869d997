"""CPU per record of the Kafka relay's publish alone (``KafkaDestination.publish``).

    .venv/bin/python bench/kafka_publish.py                    # 200k records, groups of 4096
    .venv/bin/python bench/kafka_publish.py --busy             # a busy event loop meanwhile
    .venv/bin/python bench/kafka_publish.py --records 50000 --group 1 --reps 3
    .venv/bin/python bench/kafka_publish.py --ceiling          # the kafka_ceiling level's way
    .venv/bin/python bench/kafka_publish.py --callgrind 20000  # instructions per record

Starts tansu (as ``run.py --destination kafka``), makes a topic of 3 partitions,
and publishes synthetic CloudEvents (the W1 row's size: ~300-byte bodies, keys,
subjects) in groups of ``--group`` records, one publish after the other, as a
lane does. ``--busy`` runs a coroutine meanwhile that burns the CPU in slices of
``--slice`` ms and yields (the reader and decoder of a relay): the publish's
threads then contend for the GIL as in the relay. Prints the process's CPU
(every thread, librdkafka's too; the busy coroutine's own work subtracted,
measured alone first) per record, best of ``--reps``.

``--ceiling`` publishes the same records as ``run.py``'s ``kafka_ceiling`` level
does (``consumers/ceiling_consumer.py``'s ``kafka_publish``: one plain
confluent-kafka producer, every record produced at once with a Python callback
per report, one flush). ``--callgrind N`` runs this script under ``valgrind
--tool=callgrind`` with N and 3N records (one repetition each) and prints the
difference in instructions per extra record (``--keep-out DIR`` keeps the two
files, for ``callgrind_annotate --inclusive=yes``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import destinations  # noqa: E402

sys.path.insert(0, str(HERE / "consumers"))

from walex.destinations.base import DestinationURL  # noqa: E402
from walex.destinations.encoding import Outgoing  # noqa: E402
from walex.destinations.kafka import KafkaDestination  # noqa: E402


def items(n: int) -> list[Outgoing]:
    out = []
    source, when = "/bench/public/bench_rows", "2026-12-06T23:31:24.123456Z"
    for i in range(n):
        subject = str(i)
        body = (b'{"specversion":"1.0","id":"0/4000000:%d","source":"/bench/public/bench_rows",'
                b'"type":"walex.insert","time":"2026-12-06T23:31:24.123456Z","subject":"%d",'
                b'"partitionkey":"public.bench_rows/%d","datacontenttype":"application/json",'
                b'"data":{"id":%d,"n":42,"t":"some text of the row","ts":"2026-12-06T23:31:24Z",'
                b'"amount":"123.45","doc":{"a":1,"b":[1,2,3]}}}' % (i, i, i, i))
        out.append(Outgoing(f"0/4000000:{i}", "public", "bench_rows", "insert", 0, body, source,
                            when, f"public.bench_rows/{subject}", subject))
    return out


switches = [0, 0]  # voluntary and involuntary context switches of the last run
loop_cpu = [0.0]  # CPU of the event loop's thread in the last run (the rest: librdkafka's, the flush)


def burn(ms: float) -> int:
    end = time.thread_time() + ms / 1000
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


async def ceiling(url: str, records: list[Outgoing]) -> tuple[float, float, int]:
    """The kafka_ceiling level's publish of the same records (its own producer), timed from
    its warm-up's end (its ``yield_start``) as run.py times it; its records (key, value,
    headers) made before, as its untimed phase does."""
    import ceiling_consumer

    made = ceiling_consumer.kafka_records(records)
    start = ceiling_consumer.yield_start
    marks: list[float] = []

    def started() -> None:
        marks[:] = [time.perf_counter(), time.process_time(), time.thread_time()]
        start()

    ceiling_consumer.yield_start, ceiling_consumer.kafka_records = started, lambda _items: made
    await ceiling_consumer.kafka_publish(url, records)
    loop_cpu[0] = time.thread_time() - marks[2]
    return time.perf_counter() - marks[0], time.process_time() - marks[1], 0


def callgrind(args: argparse.Namespace) -> float:
    """Instructions per record: this script under callgrind with N and 3N records."""
    from pertxn import callgrind_total

    argv = [__file__, "--reps", "1", "--group", str(args.group)]
    argv += ["--ceiling"] if args.ceiling else []
    argv += [a for p in args.param for a in ("--param", p)]
    argv += ["--url", args.url] if args.url else []
    n = args.callgrind
    counts = [callgrind_total(argv + ["--records", str(m)],
                              Path(args.keep_out) / f"{'ceiling' if args.ceiling else 'walex'}-{m}.out"
                              if args.keep_out else None) for m in (n, 3 * n)]
    return (counts[1] - counts[0]) / (2 * n)


async def run(url: str, records: list[Outgoing], group: int, busy: bool, slice_ms: float
              ) -> tuple[float, float, int]:
    dest = KafkaDestination(DestinationURL(url))
    await dest.open()
    await dest.publish(records[:3])  # warm-up: the producer id, the partitions' leaders
    stop = False
    slices = 0

    async def busy_loop() -> None:
        nonlocal slices
        while not stop:
            burn(slice_ms)
            slices += 1
            await asyncio.sleep(0)

    burner = asyncio.create_task(busy_loop()) if busy else None
    t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for at in range(0, len(records), group):
        await dest.publish(records[at:at + group])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    loop_cpu[0] = time.thread_time() - m0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    switches[:] = [r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw]
    stop = True
    if burner is not None:
        await burner
    await dest.close()
    return wall, cpu, slices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--group", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--slice", type=float, default=1.0)
    parser.add_argument("--url", default="", help="a kafka:// URL instead of a tansu of our own")
    parser.add_argument("--param", action="append", default=[],
                        help="NAME=VALUE added to the URL (a librdkafka setting)")
    parser.add_argument("--ceiling", action="store_true",
                        help="publish as the kafka_ceiling level does (not through walex)")
    parser.add_argument("--callgrind", type=int, default=0, metavar="N",
                        help="instructions per record under callgrind (N and 3N records)")
    parser.add_argument("--keep-out", default=None, help="with --callgrind: keep the files here")
    args = parser.parse_args()
    if args.callgrind:
        print(f"{'ceiling' if args.ceiling else 'walex'}: {callgrind(args):,.0f} instructions "
              f"per record (callgrind, {args.callgrind} vs {3 * args.callgrind} records, group "
              f"{args.group}{', ' + ' '.join(args.param) if args.param else ''})")
        return 0
    if not args.url:
        destinations.parse(["kafka"])
    url = args.url or destinations.url_for("walex+kafka", f"kpub{os.getpid()}")
    for p in args.param:
        url += "&" + p
    destinations._kafka_topic(url, create=True)
    records = items(args.records)
    best = None
    try:
        for _ in range(args.reps):
            if args.ceiling:
                wall, cpu, slices = asyncio.run(ceiling(url, records))
            else:
                wall, cpu, slices = asyncio.run(run(url, records, args.group, args.busy,
                                                    args.slice))
            spare = cpu - slices * args.slice / 1000  # the busy coroutine's own CPU out
            line = (f"wall {wall:.3f}s cpu {cpu:.3f}s cpu-minus-busy {spare:.3f}s "
                    f"= {spare / len(records) * 1e6:.2f} us/record"
                    f" (loop thread {(loop_cpu[0] - (cpu - spare)) / len(records) * 1e6:.2f})"
                    + f" switches {switches[0]}+{switches[1]}"
                    + (f" (busy slices {slices})" if args.busy else ""))
            print(line, flush=True)
            best = spare if best is None else min(best, spare)
    finally:
        destinations._kafka_topic(url, create=False)
    assert best is not None
    print(f"best: {best / len(records) * 1e6:.2f} us/record ({args.records} records, group "
          f"{args.group}{', busy' if args.busy else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
