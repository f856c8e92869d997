"""Every query of a backfill has a deadline (``backfill_query_timeout``): a connection
that goes silent mid-job (a network partition that something on the way still answers
TCP keepalives for) costs one deadline; the backfill reconnects and completes."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from support import collecting, run, until
from walex import EventType

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402

ROWS = 3000

# the backfill's own connection: the only one that reads the table by chunks, writes its
# watermarks (transactional messages) or its progress store
_BACKFILL_BACKEND = (
    "SELECT client_port FROM pg_stat_activity WHERE application_name = %s "
    "AND backend_type = 'client backend' AND client_port IS NOT NULL "
    "AND (query LIKE 'FETCH FORWARD%%' OR query LIKE '%%walex_backfill%%' "
    "OR query LIKE '%%pg_logical_emit_message(true%%' OR query LIKE '%%pg_current_snapshot%%')"
)


def test_a_backfill_whose_connection_goes_silent_reconnects_and_completes(
    dsn: str, admin: psycopg.Connection,
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute(f"INSERT INTO t SELECT g, 'v' FROM generate_series(1, {ROWS}) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params["host"]), int(params["port"])).start()
    via_proxy = make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
    name = "walex_bf_silent"

    async def main() -> tuple[object, list[int], int]:
        async def slow(events: list) -> None:  # chunks take a while: the job is caught mid-way
            await asyncio.sleep(0.02)

        from walex import Events

        pace = Events()
        pace.on_event("t")(slow)
        async with collecting(via_proxy, name=name, modules=[pace], backfill_chunk_size=50,
                              backfill_query_timeout=3) as rec:
            job = asyncio.ensure_future(rec.app.backfill("t"))

            def progressed() -> bool:
                row = admin.execute("SELECT to_regclass('walex_backfill') IS NOT NULL").fetchone()
                if not row[0]:
                    return False
                done = admin.execute("SELECT rows_done FROM walex_backfill").fetchone()
                return done is not None and done[0] >= 300

            await until(progressed, "the backfill to be under way", timeout=60)
            silenced = 0
            deadline = time.monotonic() + 30
            while not silenced and time.monotonic() < deadline:  # between two queries, maybe
                for (port,) in admin.execute(_BACKFILL_BACKEND, (name,)).fetchall():
                    if proxy.silence(port):
                        silenced = port
                await asyncio.sleep(0.01)
            assert silenced, "the backfill's connection was not found"
            assert not job.done()
            # before the deadline existed, the backfill waited for ever on the silent connection
            done, _ = await asyncio.wait([job], timeout=120)
            assert done, "the backfill did not complete after its connection went silent"
            reads = [e.new_record["id"] for e in rec.events if e.type == EventType.READ]
            return job.result(), reads, proxy.dropped_bytes

    try:
        job, reads, dropped = run(main(), timeout=240)
    finally:
        proxy.stop()
    assert job.state == "done"
    assert set(reads) == set(range(1, ROWS + 1))  # every row, none lost
    assert dropped > 0  # the backfill did send a query into the silence
    # its connection was given up and a new one opened: the silent one no longer runs a job
    assert admin.execute("SELECT state FROM walex_backfill").fetchone()[0] == "done"
