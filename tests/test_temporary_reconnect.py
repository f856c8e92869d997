"""A temporary slot after a lost connection whose walsender has not ended yet."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from support import collecting, run, until

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402


def test_a_reconnect_waits_for_the_last_sessions_temporary_slot_to_go(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection is cut while the walsender cannot notice (it is stopped here, as one
    busy decoding a large transaction of an unpublished table is: seen in the suite under
    load): walex reconnects before that walsender ended and dropped its temporary slot.
    Making the slot again then finds the old one: on main walex took it for its own (a gap
    "before 0/0"), failed to start on it while it was in use, then stopped for good when it
    vanished ('replication slot ... does not exist'). walex must wait for it to go, make a
    new one and stream what is committed next."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params.get("host") or "127.0.0.1"), int(params["port"])).start()
    url = make_conninfo(dsn, host="127.0.0.1", port=proxy.port)

    async def main() -> None:
        async with collecting(url, subscriptions=["item"], status_interval=0.5,
                              reconnect_max_attempts=2) as rec:
            app = rec.app
            assert app is not None
            admin.execute("INSERT INTO item VALUES (1)")
            await rec.wait_for(1, 30)
            pid = admin.execute("SELECT active_pid FROM pg_replication_slots WHERE "
                                "slot_name = %s", [app.slot_name]).fetchone()[0]
            os.kill(pid, signal.SIGSTOP)
            try:
                proxy.cut()
                await asyncio.sleep(2)  # walex reconnects meanwhile
            finally:
                os.kill(pid, signal.SIGCONT)
            await until(lambda: app.pipeline.sessions >= 2 and app.pipeline.repl is not None
                        and app.pipeline.repl.streaming, "streaming on a new slot", timeout=60)
            admin.execute("INSERT INTO item VALUES (2)")
            events = await rec.wait_for(2, 30)
            assert [e.new_record["id"] for e in events] == [1, 2]

    try:
        with caplog.at_level("WARNING", logger="walex"):
            run(main(), timeout=150)
    finally:
        proxy.stop()
    assert "before 0/0" not in caplog.text
    assert "still held by the previous session's walsender" in caplog.text, \
        "the reconnect did not find the old slot: nothing was tested"
