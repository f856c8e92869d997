"""Reading back what walex produced to a Kafka-protocol broker (tansu), and setting topics up."""

from __future__ import annotations

import json
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

# tansu answers a consumer group's first JoinGroup only after half the session timeout:
# 6 s (the smallest Kafka brokers accept) makes a join take ~3 s instead of ~23 s
GROUP = "session.timeout.ms=6000&heartbeat.interval.ms=1000"


def create_topic(port: int, topic: str, partitions: int = 4) -> None:
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
    for future in admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                                replication_factor=1)]).values():
        future.result(30)


def records(port: int, topic: str, timeout: float = 30) -> list[Any]:
    """Every record of every partition of ``topic``, read without a group."""
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "walex-test-reader",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=timeout)
        parts = sorted(meta.topics[topic].partitions) if topic in meta.topics else []
        out: list[Any] = []
        ends = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        got = {p: 0 for p in ends}
        deadline = time.monotonic() + timeout
        quiet = 0.0
        # tansu's high watermark can be short of the end (its last batch's first offset + 1):
        # read on until nothing came for a second
        while any(got[p] < ends[p] for p in ends) or quiet < 1.0:
            assert time.monotonic() < deadline, f"could not read {topic}: {got} of {ends}"
            msg = consumer.poll(0.25)
            if msg is None:
                quiet += 0.25
                continue
            quiet = 0.0
            assert msg.error() is None, msg.error()
            out.append(msg)
            got[msg.partition()] = msg.offset() + 1
        return out
    finally:
        consumer.close()


def stored(port: int, topic: str) -> list[tuple[str, dict[str, Any], Any]]:
    """``(id, CloudEvent, record)`` of the records with a value, per partition in order."""
    return [(json.loads(m.value())["id"], json.loads(m.value()), m)
            for m in records(port, topic) if m.value() is not None]
