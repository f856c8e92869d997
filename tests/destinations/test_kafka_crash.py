"""``walex run`` relaying to Kafka (tansu), SIGKILLed three times mid-stream.

A writer commits numbered transactions into two tables while the relay runs
with a durable slot; the relay is killed with SIGKILL three times and started
again at once. At the end the topic holds every row: after dropping repeats
by id (a batch the broker stored but walex could not acknowledge before it
died is produced again, with the same id and content), nothing is missing,
and the first copies of a row's changes are in commit order within its
partition.
"""

from __future__ import annotations

import signal
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg

from .kafka_support import create_topic, stored
from .servers import OwnTansu
from .test_crash import TRANSACTIONS, expected_rows, relay, streaming, wait, writer


def test_sigkilled_relay_three_times_every_event_once_by_id(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    admin.execute("""
        CREATE TABLE a (id int PRIMARY KEY, txn int);
        CREATE TABLE b (id int PRIMARY KEY, txn int);
        CREATE PUBLICATION pub FOR ALL TABLES;
    """)
    slot = f"kcrash_{unique}"
    log = tmp_path / "relay.log"
    total = sum(len(v) for v in expected_rows().values())
    with OwnTansu(tmp_path) as broker:
        for table in ("a", "b"):
            create_topic(broker.port, f"wc.{table}", 3)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wc.{{table}}&linger.ms=1"
        env = {"WALEX_URL": dsn, "WALEX_PUBLICATION": "pub", "WALEX_DURABLE_SLOT": "true",
               "WALEX_SLOT_NAME": slot, "WALEX_STATUS_INTERVAL": "0.5", "WALEX_BATCH_SIZE": "4"}
        args = ["--destination", url]

        def read() -> list[Any]:
            return stored(broker.port, "wc.a") + stored(broker.port, "wc.b")

        proc = relay(args, tmp_path, env)
        try:
            wait(lambda: streaming(admin, slot), "the relay to stream", 60, log)
            done, progress = threading.Event(), []
            thread = threading.Thread(target=writer, args=(dsn, done, progress), daemon=True)
            thread.start()
            for kill_at in (TRANSACTIONS // 5, 2 * TRANSACTIONS // 5, 3 * TRANSACTIONS // 5):
                wait(lambda: len(progress) >= kill_at, f"{kill_at} transactions", 120, log)
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                proc = relay(args, tmp_path, env)
            thread.join(120)
            assert done.is_set(), "the writer did not finish"
            wait(lambda: len({i for i, _d, _m in read()}) >= total, f"{total} events in Kafka",
                 120, log)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-4000:]
            records = read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    first: dict[str, dict[str, Any]] = {}
    per_partition: dict[tuple[str, int], list[str]] = defaultdict(list)
    order: dict[str, list[int]] = {"a": [], "b": []}
    duplicates = 0
    for message_id, doc, message in records:
        if message_id in first:
            duplicates += 1
            assert first[message_id] == doc, f"{message_id}: a duplicate differs from the first copy"
            continue
        first[message_id] = doc
        per_partition[(message.topic(), message.partition())].append(message_id)
        order[doc["source"].rsplit("/", 1)[1]].append(doc["data"]["new_record"]["id"])
    assert {t: sorted(ids) for t, ids in order.items()} == expected_rows(), \
        "a row is missing or repeated under another id"
    for key, ids in per_partition.items():  # first copies in commit order per partition
        assert ids == sorted(ids), f"{key} out of order"
    print(f"kafka: {len(records)} stored, {duplicates} duplicates")


BIG, ROWS = 6, 20_000  # transactions of ROWS rows each: groups go ahead within each


def _big_writer(dsn: str, done: threading.Event, progress: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for txn in range(BIG):
            conn.execute("INSERT INTO a SELECT i, %s::int FROM generate_series(%s::int, %s::int) i",
                         (txn, txn * ROWS + 1, (txn + 1) * ROWS))
            progress.append(txn)
    done.set()


def test_sigkilled_relay_with_groups_ahead_loses_nothing(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    """Transactions of 20,000 rows, whose groups go ahead (the relay logs each group handed
    over while another is in flight): the relay SIGKILLed twice once that happened, and
    started again at once. Every row is in the topic; the first copies are in commit
    order per partition; a repeat is its first copy again."""
    admin.execute("CREATE TABLE a (id int PRIMARY KEY, txn int); "
                  "CREATE PUBLICATION pub FOR ALL TABLES")
    slot = f"kcrashb_{unique}"
    log = tmp_path / "relay.log"
    marker = "handed over ahead"
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wb.a", 3)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wb.{{table}}"
        env = {"WALEX_URL": dsn, "WALEX_PUBLICATION": "pub", "WALEX_DURABLE_SLOT": "true",
               "WALEX_SLOT_NAME": slot, "WALEX_STATUS_INTERVAL": "0.5"}
        args = ["--destination", url, "--log-level", "DEBUG"]

        def ahead() -> int:
            return log.read_text(errors="replace").count(marker) if log.exists() else 0

        proc = relay(args, tmp_path, env)
        try:
            wait(lambda: streaming(admin, slot), "the relay to stream", 60, log)
            done, progress = threading.Event(), []
            thread = threading.Thread(target=_big_writer, args=(dsn, done, progress), daemon=True)
            thread.start()
            for kills in (1, 2):
                seen = ahead()
                wait(lambda: ahead() > seen, "a group handed over ahead", 120, log)
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                proc = relay(args, tmp_path, env)
            thread.join(180)
            assert done.is_set(), "the writer did not finish"
            wait(lambda: len({i for i, _d, _m in stored(broker.port, "wb.a")}) >= BIG * ROWS,
                 f"{BIG * ROWS} events in Kafka", 180, log)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-4000:]
            records = stored(broker.port, "wb.a")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    first: dict[str, dict[str, Any]] = {}
    per_partition: dict[int, list[str]] = defaultdict(list)
    for message_id, doc, message in records:
        if message_id in first:
            assert first[message_id] == doc, f"{message_id}: a duplicate differs"
            continue
        first[message_id] = doc
        per_partition[message.partition()].append(message_id)
    rows = sorted(doc["data"]["new_record"]["id"] for doc in first.values())
    assert rows == list(range(1, BIG * ROWS + 1)), "a row is missing or repeated under another id"
    for partition, ids in per_partition.items():
        assert ids == sorted(ids), f"partition {partition}: first copies out of commit order"
    print(f"kafka: {len(records)} stored, {len(records) - len(first)} duplicates")
