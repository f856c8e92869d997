"""The benchmark's machinery: cluster, workloads, levels, and measuring one consumer run.

Used by ``run.py`` (throughput and lag) and ``profile.py``. Nothing here
prints tables; it returns plain dicts that go into the JSON results.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from consumers._common import vmhwm_kb
from workloads import (  # noqa: F401 - WORKLOADS, ROWS_DDL, rows_insert_sql: for run.py and the rest
    PGBENCH_INSERT, ROWS_DDL, WORKLOADS, Workload, prepare_rows, reset_tables, rows_insert_sql,
    workload_sql,
)
from walex.embedded import Cluster, embedded_bindir

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the bench extra
    psutil = None

BENCH = Path(__file__).resolve().parent
CONSUMERS = BENCH / "consumers"
PEERS_VENV = BENCH / ".venv-peers"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PUBLICATION = "bench_pub"
MARKER = "bench_marker"

# -- levels ------------------------------------------------------------------

LIMIT = "pg_recvlogical"
LEVELS = ["pg_recvlogical", "walex", "psycopg2", "pypgoutput", "pgoutput-decoder"]
OPTIONAL_LEVELS = ["walex_sync", "walex_uvloop", "walex_batch"]
PEER_LEVELS = {"pypgoutput": "pypgoutput", "pgoutput-decoder": "pgoutput_decoder"}
CONSUMER_SCRIPTS = {
    "walex": "walex_consumer.py", "walex_sync": "walex_consumer.py", "walex_uvloop": "walex_consumer.py",
    "walex_batch": "walex_consumer.py",
    "psycopg2": "psycopg2_consumer.py", "pypgoutput": "pypgoutput_consumer.py",
    "pgoutput-decoder": "pgoutput_decoder_consumer.py", "ceiling": "ceiling_consumer.py",
}
LEVEL_NOTES = {
    "pg_recvlogical": "C client, output to /dev/null: the ceiling (server decoding + transport)",
    "walex": "WalEx app on asyncio's loop, durable slot, async on_event('all') handler touching every field",
    "walex_sync": "as walex, with a plain (threaded) handler",
    "walex_uvloop": "as walex, on uvloop (walex[fast]; WalEx.run() takes it when installed)",
    "walex_batch": "as walex, the handler registered with max_batch=5000",
    "psycopg2": "psycopg2 LogicalReplicationConnection + plain pgoutput decoder (bench/consumers/pgoutput_plain.py)",
    "pypgoutput": "PyPI pypgoutput (psycopg2 + pydantic 1), in bench/.venv-peers",
    "pgoutput-decoder": "PyPI pgoutput-decoder (Rust/pyo3), in bench/.venv-peers",
}


# -- the cluster -------------------------------------------------------------


class Bench:
    """A throwaway PostgreSQL 18 cluster and an admin connection to it."""

    def __init__(self, max_slots: int = 20, settings: dict[str, str] | None = None,
                 unix_socket: bool = False) -> None:
        conf = {
            "max_replication_slots": str(max(20, max_slots + 4)),
            "max_wal_senders": str(max(20, max_slots + 4)),
            "max_wal_size": "8GB", "checkpoint_timeout": "1h",
            "shared_buffers": "256MB",
            "autovacuum": "off",  # no background WAL while consumers are timed
            **(settings or {}),
        }
        self.bindir = embedded_bindir()
        self.cluster = Cluster(settings=conf)
        self.conf = conf
        self.unix_socket = unix_socket  # consumers connect through the Unix socket, not TCP
        self.conn: psycopg.Connection | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="walex-bench-"))

    def __enter__(self) -> Bench:
        self.cluster.start()
        self.conn = psycopg.connect(self.dsn_url, autocommit=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()
        self.cluster.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def dsn_url(self) -> str:
        return self.cluster.dsn()

    @property
    def dsn(self) -> str:
        """Key/value form: every client here (libpq, psycopg2, the Rust peer) reads it.

        With ``unix_socket`` the host is the server's socket directory (the
        cluster's base directory).
        """
        host = self.cluster.datadir.parent if self.unix_socket else self.cluster.host
        return f"host={host} port={self.cluster.port} user=postgres dbname=postgres"

    def q(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        assert self.conn is not None
        cur = self.conn.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def one(self, sql: str, params: Any = None) -> Any:
        return self.q(sql, params)[0][0]

    def env_info(self) -> dict[str, Any]:
        settings = {}
        for key in ["server_version", "fsync", "synchronous_commit", "wal_level",
                    "shared_buffers", "logical_decoding_work_mem", "max_wal_size",
                    "max_replication_slots", "autovacuum"]:
            settings[key] = self.one(f"SHOW {key}")
        cpu = ""
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return {"postgres": settings, "cpu": cpu, "nproc": os.cpu_count(), "walex": walex_version(),
                "kernel": platform.release(), "python": sys.version.split()[0],
                "loadavg_at_start": os.getloadavg(),
                "transport": "Unix socket" if self.unix_socket else "TCP 127.0.0.1",
                "python_loop_s": python_loop_seconds()}

    # -- workloads -----------------------------------------------------------

    def reset(self, table: str) -> None:
        """Drop slots, publication and tables; create ``table``, the marker and the publication."""
        assert self.conn is not None
        reset_tables(self.conn, table, PUBLICATION, MARKER)

    def prepare(self, w: Workload, rows: int) -> None:
        """Everything before the slots are created (not part of the replicated WAL)."""
        assert self.conn is not None
        self.reset(w.table)
        prepare_rows(self.conn, w.name, rows)
        self.q("CHECKPOINT")

    def create_slots(self, names: list[str]) -> None:
        for name in names:
            self.q("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))

    def drop_slots(self, names: list[str]) -> None:
        for name in names:
            self.q("SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots "
                   "WHERE slot_name = %s", (name, name))

    def run_workload(self, w: Workload, rows: int) -> dict[str, Any]:
        """Run the workload; returns its facts, including ``endpos`` (then commits the marker)."""
        info: dict[str, Any] = {"start_lsn": self.one("SELECT pg_current_wal_lsn()::text")}
        t0 = time.perf_counter()
        if w.name == "W2":
            info["pgbench"] = self.pgbench(["-t", str(rows)])
        else:
            self.q(workload_sql(w.name, rows))
        info["load_s"] = time.perf_counter() - t0
        info["endpos"] = self.one("SELECT pg_current_wal_lsn()::text")
        self.commit_marker()
        info["wal_bytes"] = lsn_int(info["endpos"]) - lsn_int(info["start_lsn"])
        self.q("CHECKPOINT")
        return info

    def commit_marker(self) -> None:
        self.q(f"INSERT INTO {MARKER} (note) VALUES ('end of workload')")

    def pgbench(self, extra: list[str]) -> dict[str, Any]:
        script = self.tmp / "insert.sql"
        script.write_text(PGBENCH_INSERT)
        c = self.cluster
        cmd = [str(self.bindir / "pgbench"), "-n", "-M", "prepared", "-c", "1", "-j", "1",
               "-h", c.host, "-p", str(c.port), "-U", "postgres", "-f", str(script), *extra,
               "postgres"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
        if r.returncode != 0:
            raise RuntimeError(f"pgbench failed: {r.stderr}")
        out: dict[str, Any] = {"cmd": cmd[1:], "tail": r.stdout[-800:]}
        for line in r.stdout.splitlines():
            if line.startswith("tps = "):
                out["tps"] = float(line.split()[2])
            if line.startswith("number of transactions actually processed"):
                out["transactions"] = int(line.split(":")[1].split("/")[0])
        return out

    # -- consumers -----------------------------------------------------------

    def consumer_cmd(self, level: str, slot: str, endpos: str, result: Path,
                     peers: dict[str, str], lag: bool = False) -> list[str]:
        if level == LIMIT:
            return [str(self.bindir / "pg_recvlogical"), "-d", self.dsn, "--slot", slot,
                    "--start", "--endpos", endpos, "--no-loop",
                    "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
                    "-f", "/dev/null"]
        python = peers[level] if level in PEER_LEVELS else sys.executable
        script = CONSUMER_SCRIPTS["walex" if level.startswith("walex+") else
                                  "ceiling" if level.endswith("_ceiling") else level]
        cmd = [python, str(CONSUMERS / script), "--dsn", self.dsn,
               "--slot", slot, "--publication", PUBLICATION, "--endpos", endpos,
               "--marker-table", MARKER, "--result", str(result)]
        if level == "walex_sync":
            cmd.append("--sync-handler")
        if level == "walex_uvloop":
            cmd.append("--uvloop")
        if level == "walex_batch":
            cmd.append("--max-batch")
        if level.startswith("walex+") or level.endswith("_ceiling"):  # bench/destinations.py
            import destinations

            cmd += ["--destination", destinations.url_for(level, slot)]
        if lag:
            cmd.append("--lag")
        return cmd

    def run_consumer(self, level: str, slot: str, endpos: str, peers: dict[str, str],
                     timeout: float, lag: bool = False,
                     wrap: list[str] | None = None) -> dict[str, Any]:
        """Start one consumer process and measure it until it exits."""
        result = self.tmp / f"{slot}.json"
        result.unlink(missing_ok=True)
        cmd = self.consumer_cmd(level, slot, endpos, result, peers, lag)
        if wrap:
            cmd = [*wrap, *cmd]
        servers: list[int] = []
        if "+" in level or level.endswith("_ceiling"):
            import destinations

            if level in destinations.URLS:
                servers = destinations.server_pids(level)
        return measure(cmd, level, slot, self.cluster.dsn(), result, timeout, self.tmp, servers)


def walex_version() -> dict[str, Any]:
    """The commit of the walex being measured, and whether src/ had uncommitted changes."""
    root = BENCH.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return {}
    return {"commit": head, "src_dirty": bool(dirty)}


def lsn_int(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def clean_env() -> dict[str, str]:
    """The environment for child processes, without PG* variables that could redirect them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# -- measuring one process ---------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class WalsenderWatch(threading.Thread):
    """Finds the walsender serving ``slot`` and samples its CPU time until it exits."""

    def __init__(self, dsn: str, slot: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.slot = dsn, slot
        self.pid: int | None = None
        self.cpu_s: float | None = None
        self.stop_evt = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop_evt.is_set():
                    row = conn.execute("SELECT active_pid FROM pg_replication_slots "
                                       "WHERE slot_name = %s", (self.slot,)).fetchone()
                    if row and row[0]:
                        self.pid = row[0]
                        break
                    time.sleep(0.005)
        except psycopg.Error:
            return
        if self.pid is None:
            return
        while True:
            cpu = proc_cpu_s(self.pid)
            if cpu is None:
                return
            self.cpu_s = cpu
            if self.stop_evt.wait(0.05):
                break
        for _ in range(100):  # the consumer is gone: the walsender follows shortly
            cpu = proc_cpu_s(self.pid)
            if cpu is None:
                return
            self.cpu_s = cpu
            time.sleep(0.01)


class RssWatch(threading.Thread):
    """Samples a process's own peak RSS (VmHWM) and the summed RSS of it and its descendants.

    ``ru_maxrss`` from wait4 is useless here: it keeps the high-water mark of the
    image before exec, i.e. of this (large) Python process that forked the child.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.hwm_kb = 0
        self.tree_peak_kb = 0
        self.stop_evt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop_evt.is_set():
            hwm = vmhwm_kb(str(self.pid))
            if hwm is None:
                return
            self.hwm_kb = max(self.hwm_kb, hwm)
            if psutil is not None:
                try:
                    proc = psutil.Process(self.pid)
                    total = proc.memory_info().rss
                    for child in proc.children(recursive=True):
                        try:
                            total += child.memory_info().rss
                        except psutil.Error:
                            pass
                    self.tree_peak_kb = max(self.tree_peak_kb, total // 1024)
                except psutil.Error:
                    return
            # fast at first: a short-lived pg_recvlogical would otherwise go unseen
            self.stop_evt.wait(0.005 if time.monotonic() - t0 < 1.0 else 0.05)




def python_loop_seconds() -> float:
    """This machine's Python speed: CPU seconds of a fixed loop (10**7 multiply-adds), best of 3.

    Printed with every run, with the walsender's CPU per row, so runs on
    different machines (or a busy one) can be compared.
    """
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        s = 0
        for i in range(10**7):
            s += i * i
        best = min(best, time.process_time() - t0)
    return best


def servers_cpu_s(pids: list[int]) -> float | None:
    """The summed CPU time of ``pids`` (a destination's server processes), None if one is gone."""
    total = 0.0
    for pid in pids:
        cpu = proc_cpu_s(pid)
        if cpu is None:
            return None
        total += cpu
    return total


def measure(cmd: list[str], level: str, slot: str, admin_dsn: str, result: Path,
            timeout: float, tmp: Path, servers: list[int] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall time from just before spawn, CPU and max RSS from wait4; the CPU the
    ``servers`` (a destination's broker processes) spent meanwhile."""
    servers = servers or []
    ws = WalsenderWatch(admin_dsn, slot)
    ws.start()
    out_path = tmp / f"{slot}.out"
    with open(out_path, "wb") as out:
        load1 = os.getloadavg()[0]
        server_cpu0 = servers_cpu_s(servers)
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=clean_env(), start_new_session=True)
        rss = RssWatch(proc.pid)
        rss.start()
        timer = threading.Timer(timeout, _kill_group, (proc.pid,))
        timer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        t_exit = time.time()
        server_cpu1 = servers_cpu_s(servers)
        timer.cancel()
    rss.stop_evt.set()
    ws.stop_evt.set()
    ws.join(3)
    rss.join(1)
    rc = os.waitstatus_to_exitcode(status)
    run: dict[str, Any] = {
        "level": level, "slot": slot, "rc": rc, "timed_out": rc == -signal.SIGKILL,
        "t_spawn": t_spawn, "exit_s": t_exit - t_spawn,
        "cpu_s": ru.ru_utime + ru.ru_stime, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
        "ru_maxrss_kb": ru.ru_maxrss, "vmhwm_sampled_kb": rss.hwm_kb,
        "tree_rss_peak_kb": rss.tree_peak_kb,
        "walsender_pid": ws.pid, "walsender_cpu_s": ws.cpu_s, "loadavg1_before": load1,
        "server_pids": servers,
        "server_cpu_s": (server_cpu1 - server_cpu0 if servers and server_cpu0 is not None
                         and server_cpu1 is not None else None),
    }
    if result.exists():
        child = json.loads(result.read_text())
        run["consumer"] = child
        for key in ("t_ready", "t_first_row", "t_end"):
            if child.get(key):
                run[key[2:] + "_s"] = child[key] - t_spawn
        run["rows"] = child.get("rows")
    # the consumer's own VmHWM at its end is exact; sampling may miss the last 50 ms
    own = run.get("consumer", {}).get("vmhwm_kb") or 0
    run["peak_rss_kb"] = max(own, rss.hwm_kb, rss.tree_peak_kb)
    run["wall_s"] = run.get("end_s", run["exit_s"]) if level != LIMIT else run["exit_s"]
    if rc != 0:
        run["output_tail"] = out_path.read_bytes()[-3000:].decode(errors="replace")
    return run


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the peers' virtual environment ------------------------------------------

PEER_PACKAGES = {  # level -> pip requirements, installed one level at a time
    "pypgoutput": ["pypgoutput", "pydantic<2", "psycopg2-binary"],
    "pgoutput-decoder": ["pgoutput-decoder"],
}


def find_peer_python() -> str | None:
    """A Python 3.12+ interpreter: $BENCH_PEERS_PYTHON, python3.12/3.13 on PATH, or pyenv's."""
    candidates = [os.environ.get("BENCH_PEERS_PYTHON", "")]
    candidates += [shutil.which(n) or "" for n in ("python3.12", "python3.13")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for pattern in ("3.12*", "3.13*"):
        candidates += [str(p / "bin" / "python3") for p in sorted(pyenv.glob(pattern))]
    if sys.version_info >= (3, 12):
        candidates.append(sys.executable)
    for cand in candidates:
        if not cand:
            continue
        try:
            r = subprocess.run([cand, "-c", "import sys; print(sys.version_info[:2] >= (3, 12))"],
                               capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if r.returncode == 0 and r.stdout.strip() == "True":
            return cand
    return None


def ensure_peers(levels: list[str], log: Any = print) -> tuple[dict[str, str], dict[str, str]]:
    """Create/extend ``bench/.venv-peers``; returns ({level: python}, {level: why skipped})."""
    wanted = [lv for lv in levels if lv in PEER_LEVELS]
    ok: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if not wanted:
        return ok, skipped
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        base = find_peer_python()
        if base is None:
            for lv in wanted:
                skipped[lv] = ("no Python 3.12+ found (pgoutput-decoder ships only cp312-abi3 "
                               "wheels); set BENCH_PEERS_PYTHON")
            return ok, skipped
        log(f"creating {PEERS_VENV} with {base}")
        r = subprocess.run([base, "-m", "venv", str(PEERS_VENV)], capture_output=True, text=True)
        if r.returncode != 0:
            for lv in wanted:
                skipped[lv] = f"cannot create the venv: {r.stderr.strip()[-300:]}"
            return ok, skipped
    for lv in wanted:
        module = PEER_LEVELS[lv]
        if _imports(python, module):
            ok[lv] = str(python)
            continue
        log(f"installing {' '.join(PEER_PACKAGES[lv])} into {PEERS_VENV}")
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[lv]],
                           capture_output=True, text=True)
        if r.returncode == 0 and _imports(python, module):
            ok[lv] = str(python)
        else:
            err = (r.stderr or r.stdout).strip().splitlines()
            skipped[lv] = "pip install failed: " + (" | ".join(err[-3:]) if err else "import failed")
    return ok, skipped


def peer_versions(peers: dict[str, str]) -> dict[str, str]:
    """The installed version of each peer package, and the peers' Python."""
    out = {}
    for level, python in peers.items():
        code = ("import importlib.metadata as m, sys; "
                f"print(m.version({level!r}), sys.version.split()[0])")
        r = subprocess.run([python, "-c", code], capture_output=True, text=True)
        out[level] = r.stdout.strip() if r.returncode == 0 else "?"
    return out


def _imports(python: Path, module: str) -> bool:
    r = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
    return r.returncode == 0
