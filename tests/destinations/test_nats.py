"""NATS JetStream destination, against the machine's nats-server (127.0.0.1:4222)."""

from __future__ import annotations

import psycopg
import pytest
from support import collecting, run

from walex import ConfigError, WalEx
from walex.destinations import from_url
from walex.destinations.encoding import encode

from .brokers import check_stream, nats_delete, nats_stored, nats_stream_config, wait_count
from .conftest import require

TABLES = """
CREATE TABLE a (id int PRIMARY KEY, v int);
CREATE TABLE "b.c" (id int PRIMARY KEY, v text);
CREATE PUBLICATION pub FOR ALL TABLES;
"""


def workload(admin: psycopg.Connection) -> int:
    """Inserts, updates, deletes and a truncate over two tables; returns the event count."""
    with admin.transaction():
        for i in range(20):
            admin.execute("INSERT INTO a VALUES (%s, 0)", (i,))
    admin.execute("""INSERT INTO "b.c" VALUES (1, 'x'), (2, 'y')""")
    with admin.transaction():
        admin.execute("UPDATE a SET v = v + 1 WHERE id < 5")
        admin.execute("""UPDATE "b.c" SET v = 'z'""")
    admin.execute("DELETE FROM a WHERE id >= 15")
    admin.execute("""TRUNCATE "b.c" """)
    return 20 + 2 + 5 + 2 + 5 + 1


def test_rows_arrive_once_in_order_with_the_envelope(admin: psycopg.Connection, dsn: str,
                                                     unique: str) -> None:
    port = require("nats")
    admin.execute(TABLES)
    stream = f"WT_{unique}"
    url = f"nats://127.0.0.1:{port}?stream={stream}&subject=wt{unique}.{{schema}}.{{table}}.{{type}}"

    async def main() -> None:
        try:
            async with collecting(dsn, destinations=[url], batch_size=7) as rec:
                n = workload(admin)
                events = await rec.wait_for(n)
                stored = await wait_count(lambda: nats_stored(stream, port), n)
            check_stream(stored, [e.id for e in events])
            subjects = [subject for _id, _doc, subject in stored]
            assert subjects[0] == f"wt{unique}.public.a.insert"
            assert f"wt{unique}.public.b_c.update" in subjects  # '.' in a name becomes '_'
            assert subjects[-1] == f"wt{unique}.public.b_c.truncate"
            docs = [doc for _id, doc, _subject in stored]
            assert [d["type"] for d in docs] == [f"walex.{e.type.value}" for e in events]
            assert docs[0]["data"]["new_record"] == {"id": 0, "v": 0}
            config = await nats_stream_config(stream, port)
            assert config.subjects == [f"wt{unique}.>"]  # created from the template's prefix
            assert config.duplicate_window == 120
            assert (await nats_stored(stream, port)) == stored  # nothing more came
        finally:
            await nats_delete(stream, port)

    run(main())


def test_a_replayed_batch_is_stored_once(admin: psycopg.Connection, dsn: str, unique: str) -> None:
    """Publishing the same events again (a replay) stores nothing new: Nats-Msg-Id dedupes."""
    port = require("nats")
    admin.execute(TABLES)
    stream = f"WT_{unique}"
    url = (f"nats://127.0.0.1:{port}?stream={stream}&subject=wt{unique}.{{table}}"
           "&duplicate_window=30")

    async def main() -> None:
        try:
            async with collecting(dsn) as rec:
                admin.execute("INSERT INTO a SELECT g, g FROM generate_series(1, 10) g")
                events = await rec.wait_for(10)
            destination = from_url(url)
            await destination.open()
            try:
                batch = encode(events)
                await destination.publish(batch)
                await destination.publish(batch[3:])
                assert destination.duplicates == 7  # type: ignore[attr-defined]
            finally:
                await destination.close()
            stored = await nats_stored(stream, port)
            check_stream(stored, [e.id for e in events])
            assert (await nats_stream_config(stream, port)).duplicate_window == 30
        finally:
            await nats_delete(stream, port)

    run(main())


@pytest.mark.parametrize("url, problem", [
    ("nats://127.0.0.1:4222?subject=x.{table}", "needs the parameter stream"),
    ("nats://127.0.0.1:4222?stream=S&subject={table}.x", "must start with fixed tokens"),
    ("nats://127.0.0.1:4222?stream=S&subject=x.{tabel}", "uses {tabel}"),
    ("nats://127.0.0.1:4222?stream=a.b", "may not contain"),
    ("nats://127.0.0.1:4222?stream=S&dup_window=3", "unknown parameter dup_window"),
    ("nats://127.0.0.1:4222?stream=S&duplicate_window=-1", "duplicate_window must be a number"),
])
def test_bad_urls_are_config_errors(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        WalEx("postgresql://u@h/db", publication="p", destinations=[url])


def test_token_and_password_never_shown() -> None:
    token = from_url("nats://s3cr3tT0ken@127.0.0.1:4222?stream=S")
    assert "s3cr3tT0ken" not in repr(token) and "***@127.0.0.1:4222" in token.display
    userpass = from_url("nats://walex:pa55word@127.0.0.1:4222?stream=S")
    assert userpass.display == "nats://***@127.0.0.1:4222?stream=S"  # the whole userinfo
    with pytest.raises(ConfigError) as info:
        WalEx("postgresql://u@h/db", publication="p",
              destinations=["nats://walex:pa55word@127.0.0.1:4222?stream=S&subject={x}"])
    assert "pa55word" not in str(info.value) and "nats://***@" in str(info.value)
