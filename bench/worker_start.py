"""What starting a worker costs: instructions (valgrind) and CPU time of new processes.

    .venv/bin/python bench/worker_start.py                  # 3 runs of each probe
    .venv/bin/python bench/worker_start.py --src /tmp/main/src --runs 3

Each probe is a new interpreter (``python -c``), ended by ``os._exit`` at its mark,
with ``PYTHONHASHSEED=0`` (the instruction count is then the same from run to run)
and bytecode caching on (a warm-up process writes the ``.pyc`` files, as an
installed package has them):

- ``import walex.workers``;
- ``worker + decode``: a :class:`~walex.workers.Worker` of one ``Events`` handler for a
  NATS source URL (its consumer class and the NATS client imported, nothing
  connected) types one relay-encoded event back (``worker.decoder.decode``);
- ``walex worker --help``: the CLI up to the worker command's help;
- ``relay imports``: ``walex.app`` and the encoders, what a relay imports on top
  of an app.

``--src`` puts another checkout's ``src`` first on ``sys.path`` (the editable
install's path entry comes after it), to compare versions: e.g. ``git archive
main src | tar -x -C /tmp/main`` and the built ``.so`` files copied next to
their sources. Prints, per probe, the instructions of each run, the CPU
milliseconds (user + system, ``/usr/bin/time``), the modules loaded and whether
psycopg is among them. Needs no PostgreSQL and no broker.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def relay_encoded_body() -> bytes:
    """One event's CloudEvent as the relay's encoder writes it."""
    sys.path.insert(0, str(ROOT / "src"))
    import datetime as dt
    import uuid
    from decimal import Decimal

    from walex.destinations.encoding import encode
    from walex.event import Event, EventType, Source

    columns = {"id": "int4", "note": "text", "price": "numeric", "at": "timestamptz",
               "ref": "uuid", "doc": "jsonb", "tags": "text[]", "raw": "bytea"}
    record = {"id": 1, "note": "x", "price": Decimal("12.50"),
              "at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
              "ref": uuid.UUID(int=7), "doc": {"a": [1, 2]}, "tags": ["a", "b"], "raw": b"\x00\x01"}
    source = Source(db="app", schema="public", table="orders", columns=columns, primary_key=("id",))
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    event = Event("orders", EventType.INSERT, source, record, None, None, moment, "0/16B3748",
                  "00000000016B3748-00000000")
    return encode([event], 1)[0].body


def probes(body: bytes) -> dict[str, str]:
    return {
        "import walex.workers": "import walex.workers\n",
        "worker + decode": (
            "import walex.workers\nfrom walex import Events\nevents = Events()\n"
            "@events.on_event('all')\nasync def handle(batch): pass\n"
            "worker = walex.workers.Worker('nats://127.0.0.1:4222?stream=S&partitions=1', [events])\n"
            f"event = worker.decoder.decode({body!r})\n"
        ),
        "walex worker --help": (
            "import sys\nsys.argv = ['walex', 'worker', '--help']\nimport walex.cli\n"
            "try:\n    walex.cli.app()\nexcept SystemExit:\n    pass\n"
        ),
        "relay imports": "import walex.app, walex.destinations.encoding\n",
    }


def instructions(code: str, env: dict[str, str]) -> int:
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def cpu_ms(code: str, env: dict[str, str]) -> int:
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S", sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, check=True)
    user, system = proc.stderr.strip().splitlines()[-1].split()
    return round((float(user) + float(system)) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=str(ROOT / "src"), help="the walex sources to measure")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    src = str(Path(args.src).resolve())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=src, PYTHONHASHSEED="0")
    for name, code in probes(relay_encoded_body()).items():
        check = (f"{code}import sys, walex\nassert walex.__file__.startswith({src!r}), walex.__file__\n"
                 "print(len(sys.modules), 'psycopg' in sys.modules)\n")
        warm = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                              text=True, check=True)  # and writes the .pyc files
        modules, psycopg = warm.stdout.split()[-2:]
        timed = code + "import os\nos._exit(0)\n"
        counts = [instructions(timed, env) for _ in range(args.runs)]
        cpu = [cpu_ms(timed, env) for _ in range(args.runs)]
        print(f"{name:22s} {' '.join(f'{c / 1e6:.1f}M' for c in counts)} instructions, "
              f"CPU ms {cpu}, {modules} modules, psycopg loaded: {psycopg}", flush=True)


if __name__ == "__main__":
    main()
