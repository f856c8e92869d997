"""The replication connection end to end: encodings and stream errors."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql


from support import collecting, run


def test_latin1_database_names_and_values_arrive_as_unicode(pg_cluster: Any) -> None:
    dbname = "walex_latin1"
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL(
            "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ).format(sql.Identifier(dbname)))
    dsn = pg_cluster.dsn(dbname)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute('CREATE TABLE "café" (id int PRIMARY KEY, "crème" text)')
            conn.execute("CREATE PUBLICATION pub FOR ALL TABLES")

        async def scenario() -> list:
            async with collecting(dsn, subscriptions=["café"]) as rec:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("""INSERT INTO "café" VALUES (1, 'brûlée à 5 €')""".replace(" €", ""))
                return await rec.wait_for(1)

        [event] = run(scenario())
        assert event.name == "café"
        assert event.new_record == {"id": 1, "crème": "brûlée à 5"}
        assert event.source.columns == {"id": "int4", "crème": "text"}
    finally:
        with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE database = %s AND NOT active", (dbname,))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
