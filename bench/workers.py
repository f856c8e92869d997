"""Events/s handled by ``walex worker`` processes with a handler that does nothing.

    .venv/bin/python bench/workers.py                          # NATS, RabbitMQ, Kafka; 1 and 3 workers
    .venv/bin/python bench/workers.py --brokers nats --events 20000 --workers 1,2,3
    .venv/bin/python bench/workers.py --brokers nats --events 20000 --nats-prefetch 256

For each broker and each worker count: a fresh target (a JetStream stream;
an exchange and its partition queues, declared as the workers declare them;
a Kafka topic of ``--partitions`` partitions on the tansu broker that
``destinations.py`` starts, the same as ``run.py --destination kafka``) is filled, untimed, with ``--events`` CloudEvents of W1-like rows (the
bytes walex's relay publishes: ``walex.destinations.encoding``, published
by walex's own destination, ``--partitions`` partitions, transactions of
``--txn`` events); then N ``walex worker URL noop_handler:events``
processes start (``consumers/noop_handler.py``: it counts, nothing else)
and the bench waits until they handled every event, then stops them.

Reported per run: **events/s** over the handling window (first handler call
of any worker to the last), which is what the workers take once running,
and **from spawn** (interpreter start, imports, connecting included), and
**worker CPU µs/event**: the workers' CPU time (user and system) over their
handling windows per event, the figure to compare on a shared machine (the
event rates are wall-clock: compare within one run). Uses the machine's
brokers (``--nats``, ``--amqp``) and a tansu of its own (an in-memory
Kafka-protocol broker, not Apache Kafka; killed at exit); every target is
removed afterwards. Kafka's workers are one group per run, with
``session.timeout.ms`` of ``--kafka-session-ms`` (6000): tansu answers every
JoinGroup only after half the session timeout (it polls the forming group
once a second until ``session.timeout.ms / 2`` has passed), which with
librdkafka's default of 45 s holds the first record back ~23 s. Apache Kafka
waits ``group.initial.rebalance.delay.ms`` (3 s by default) for the first join
of an empty group and otherwise answers once the known members rejoined, so 6 s
(a 3 s hold on tansu) keeps "from spawn" comparable to it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

import destinations  # noqa: E402
import harness  # noqa: E402
from encode import w1_events  # noqa: E402

from walex.destinations import from_url  # noqa: E402
from walex.destinations.encoding import encode  # noqa: E402
from walex.workers.base import partition_filter  # noqa: E402


def urls(broker: str, run: str, args: argparse.Namespace) -> str:
    """The relay's destination URL (the workers add &partitions=)."""
    if broker == "nats":
        return f"{args.nats}?stream={run}&subject={run}.{{schema}}.{{table}}.{{partition}}"
    if broker == "kafka":  # tansu, started at the first Kafka run (bench/destinations.py)
        return destinations.SHORTCUTS["kafka"].replace("KPORT", str(destinations._kafka_port())) \
            .replace("RUN", run)
    return f"{args.amqp}?exchange={run}&routing_key={{schema}}.{{table}}.{{type}}.{{partition}}"


NAMES = {"nats": "NATS", "amqp": "RabbitMQ", "kafka": "Kafka (tansu)"}


def events_of(n: int, txn: int) -> list:
    events = w1_events(n)
    for i, event in enumerate(events):  # transactions of txn events: commit LSN, position
        event.id = f"{0x16B3748 + i // txn:016X}-{i % txn:08X}"
    return events


async def prefill(broker: str, url: str, run: str, args: argparse.Namespace) -> None:
    if broker == "amqp":  # the queues first, as the workers declare them, or nothing is routed
        import aio_pika

        connection = await aio_pika.connect(args.amqp, timeout=10)
        try:
            channel = await connection.channel()
            await channel.declare_exchange(run, aio_pika.ExchangeType.TOPIC, durable=True)
            for p in range(args.partitions):
                queue = await channel.declare_queue(f"{run}.walex.{p}", durable=True,
                                                    arguments={"x-single-active-consumer": True})
                key = partition_filter("{schema}.{table}.{type}.{partition}", p, args.partitions,
                                       url, "routing_key")
                await queue.bind(run, routing_key=key)
        finally:
            await connection.close()
    elif broker == "kafka":  # the topic with --partitions partitions, before the relay's records
        await asyncio.to_thread(destinations._kafka_topic, url, True, args.partitions)
    destination = from_url(url, args.partitions)
    await asyncio.wait_for(destination.open(), timeout=30)
    try:
        events = events_of(args.events, args.txn)
        for at in range(0, len(events), 1000):
            await asyncio.wait_for(destination.publish(encode(events[at:at + 1000], args.partitions)),
                                   timeout=120)
    finally:
        await destination.close()


async def remove(broker: str, run: str, args: argparse.Namespace) -> None:
    if broker == "nats":
        import nats

        nc = await nats.connect(args.nats, allow_reconnect=False, connect_timeout=5)
        try:
            await nc.jetstream(timeout=10).delete_stream(run)
            if args.nats_prefetch > 1:  # the run's lease bucket (walex.workers.natslease)
                await nc.jetstream(timeout=10).delete_key_value(f"walex_leases_{run}")
        finally:
            await nc.close()
    elif broker == "kafka":
        await asyncio.to_thread(destinations._kafka_topic, urls(broker, run, args), False)
    else:
        import aio_pika

        connection = await aio_pika.connect(args.amqp, timeout=10)
        try:
            channel = await connection.channel()
            for p in range(args.partitions):
                await channel.queue_delete(f"{run}.walex.{p}")
            await channel.exchange_delete(run)
        finally:
            await connection.close()


def read_counts(paths: list[Path]) -> list[tuple[int, float, float, float, float]]:
    """Per worker: events handled, first and last call (epoch s), CPU s between them, the
    system CPU's share of it."""
    out = []
    for path in paths:
        try:
            n, first, last, cpu, share = path.read_text().split()
            out.append((int(n), float(first), float(last), float(cpu), float(share)))
        except (OSError, ValueError):
            out.append((0, 0.0, 0.0, 0.0, 0.0))
    return out


def measure(broker: str, workers: int, args: argparse.Namespace) -> dict:
    run = f"benchw_{uuid.uuid4().hex[:8]}"
    url = urls(broker, run, args)
    tmp = Path(tempfile.mkdtemp(prefix="walex-bench-workers-"))
    paths = [tmp / f"count{k}" for k in range(workers)]
    walex = Path(sys.executable).with_name("walex")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(prefill(broker, url, run, args))
        source = f"{url}&partitions={args.partitions}"
        if broker == "nats" and args.nats_prefetch > 1:  # batches under partition leases
            source += f"&prefetch={args.nats_prefetch}&group={run}"  # its leases' own bucket
        if broker == "kafka":
            source += f"&group={run}"  # a group of the run's own: it starts at the earliest record
            if args.kafka_session_ms:  # tansu holds each join for half of it (see the docstring)
                source += (f"&session.timeout.ms={args.kafka_session_ms}"
                           f"&heartbeat.interval.ms={max(100, args.kafka_session_ms // 6)}")
        t_spawn = time.time()
        for k, path in enumerate(paths):
            env = {**os.environ, "BENCH_WORKER_COUNT": str(path)}
            spy = [] if not args.profile else [
                str(Path(sys.executable).with_name("py-spy")), "record", "--native", "--format", "raw",
                "--rate", str(args.profile_rate),
                "-o", f"{args.profile}.{broker}{workers}.{k}.txt", "--"]
            if args.wrap:  # e.g. valgrind --tool=callgrind: instructions, not noisy CPU time
                spy = [*shlex.split(args.wrap.replace("{k}", str(k))), *spy]
            procs.append(subprocess.Popen(
                [*spy, str(walex), "worker", source, "noop_handler:events",
                 "--app-dir", str(BENCH / "consumers"), "--log-level", "WARNING"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(tmp / f"{path.name}.err", "wb"), start_new_session=True))
        deadline = time.time() + args.timeout
        counts = read_counts(paths)
        while sum(c[0] for c in counts) < args.events:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                errors = "".join((tmp / f"{p.name}.err").read_text()[-500:] for p in paths)
                raise RuntimeError(f"{broker} x{workers}: {sum(c[0] for c in counts)} of "
                                   f"{args.events} events handled\n{errors}")
            time.sleep(0.05)
            counts = read_counts(paths)
    finally:
        for proc in procs:
            if args.profile and proc.poll() is None:  # py-spy writes its file on SIGINT
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            try:  # the whole session: the worker under py-spy too
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        asyncio.run(remove(broker, run, args))
    busy = [c for c in counts if c[0]]
    first, last = min(c[1] for c in busy), max(c[2] for c in busy)
    return {"broker": broker, "workers": workers, "events": sum(c[0] for c in counts),
            "per_worker": [c[0] for c in counts], "window_s": last - first,
            "from_spawn_s": last - t_spawn, "cpu_s": sum(c[3] for c in counts),
            "system_s": sum(c[3] * c[4] for c in counts)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="nats,amqp,kafka",
                    help="comma list: nats, amqp (RabbitMQ), kafka (a tansu the bench starts)")
    ap.add_argument("--workers", default="1,3", help="comma list of worker process counts")
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--txn", type=int, default=100, help="events per transaction")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run at most")
    ap.add_argument("--kafka-session-ms", type=int, default=6000,
                    help="the Kafka workers' session.timeout.ms (0: librdkafka's default, 45 s, "
                    "which tansu turns into a ~23 s wait before the first record)")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="run each worker under py-spy (record --native, raw folded stacks) into "
                    "PREFIX.<broker><workers>.<k>.txt; its sampling slows the worker")
    ap.add_argument("--wrap", metavar="COMMAND",
                    help="run each worker under COMMAND ({k}: the worker's number), e.g. "
                    "'valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.{k}': two runs of "
                    "different --events give the instructions per event by their difference")
    ap.add_argument("--profile-rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--nats-prefetch", type=int, default=1,
                    help="the NATS workers' prefetch= (1: one message per partition at a time; "
                    "more: batches, each partition under a lease, walex.workers.natsbatch)")
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    args = ap.parse_args()
    rows = []
    for broker in args.brokers.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            r = measure(broker, workers, args)
            rows.append(r)
            print(f"   {broker} x{workers}: {r['events'] / r['window_s']:,.0f} events/s "
                  f"(per worker {r['per_worker']})", flush=True)
    print("\n| broker | workers | events | events/s (handling) | events/s (from spawn) "
          "| worker CPU µs/event (system) | per worker |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {NAMES[r['broker']]} | {r['workers']} | {r['events']:,} "
              f"| {r['events'] / r['window_s']:,.0f} | {r['events'] / r['from_spawn_s']:,.0f} "
              f"| {r['cpu_s'] / r['events'] * 1e6:,.0f} ({r['system_s'] / r['events'] * 1e6:,.0f}) "
              f"| {', '.join(map(str, r['per_worker']))} |")
    print(f"\n{args.partitions} partitions, transactions of {args.txn} events, W1-like rows, "
          f"load average {os.getloadavg()[0]:.2f}.")
    # the same calibration line as run.py's, to compare machines by
    print(f"calibration: Python {sys.version.split()[0]} runs `for i in range(10**7): s += i * i` "
          f"in {harness.python_loop_seconds():.3f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
