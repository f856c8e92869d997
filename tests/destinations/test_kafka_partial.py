"""A Kafka publish whose delivery reports fail for one record in the middle of a batch.

One transaction writes rows of table ``a`` (topic ``wk.a`` exists), then one of
``b`` (topic ``wk.b`` does not, and the producer may not create it:
``allow.auto.create.topics=false``, the way test_kafka sets up an unknown
topic), then ``a`` again: the broker stores the ``a`` records and refuses the
``b`` one. The transaction is not acknowledged to PostgreSQL until the error
policy settled it; under ``"stop"`` the app stops and, once the topic exists,
a restart publishes the whole transaction again with the same ids, so
nothing is lost; under a dead-letter policy the refused transaction goes
there and the relay goes on. Both ways a publish waits for its reports see the
refusal: served from the event loop (a large group's, while many records are
unconfirmed) and flushed on the destination's thread (a small group's, the
last ones of a large group). The refused transaction may also have gone as a group
handed over ahead (``send_ahead``, once the transaction before it was confirmed): its
failure makes the lane publish it again alone, where the refusal is settled; a lane
counts that fallback as a retry, which is no outage (``_outages``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex import Event
from walex.destinations import kafka
from walex.destinations.window import Lane
from walex.errors import DestinationError
from walex.lsn import parse_lsn

from .kafka_support import create_topic, stored
from .servers import OwnTansu
from .test_kafka import confirmed

TABLES = ("CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY, v text); "
          "CREATE PUBLICATION pub FOR ALL TABLES")
FIX = ("Fix: create topic 'wk.b' on the broker (kafka-topics.sh --create --topic wk.b), "
       "or turn the broker's auto.create.topics.enable on")


def _mixed(admin: psycopg.Connection) -> None:
    """The transaction of five rows whose fourth goes to the missing topic."""
    with admin.transaction():
        admin.execute("INSERT INTO a VALUES (1, 'x'), (2, 'x'), (3, 'x')")
        admin.execute("INSERT INTO b VALUES (1, 'y')")
        admin.execute("INSERT INTO a VALUES (4, 'x')")


def _check_refusal(exc: BaseException) -> None:
    assert isinstance(exc, DestinationError), repr(exc)
    message = str(exc)
    assert "topic 'wk.b' refused a record for good" in message, message
    assert "UNKNOWN_TOPIC" in message, message
    assert FIX in message, message


def _lanes(monkeypatch: pytest.MonkeyPatch) -> list[Lane]:
    """The lanes the apps make, kept past the app's stop."""
    lanes: list[Lane] = []
    init = Lane.__init__

    def keep(self: Lane, *args: Any) -> None:
        init(self, *args)
        lanes.append(self)

    monkeypatch.setattr(Lane, "__init__", keep)
    return lanes


def _outages(app: Any, lanes: list[Lane]) -> int:
    """Publishes made again for an outage: the retries but the lanes' fallbacks from
    groups ahead (a group ahead that failed goes again one at a time)."""
    return app.destinations.retries - sum(lane.fallbacks for lane in lanes)


async def _until_confirmed(admin: psycopg.Connection, slot: str, lsn: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while confirmed(admin, slot) < lsn:
        assert loop.time() < deadline, "never acknowledged to PostgreSQL"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("served", ["loop", "thread"])
@pytest.mark.parametrize("policy", ["stop", "dead_letter"])
def test_a_record_refused_in_the_middle_of_a_batch(admin: psycopg.Connection, dsn: str,
                                                   tmp_path: Path, unique: str,
                                                   policy: str, served: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # every report served from the event loop, or every one by the flush on the thread
    monkeypatch.setattr(kafka, "_FLUSH_AT", 0 if served == "loop" else 1 << 30)
    lanes = _lanes(monkeypatch)
    admin.execute(TABLES)
    slot = f"kpart_{unique}"
    dead: list[tuple[list[str], BaseException]] = []
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wk.a", 1)
        url = (f"kafka://127.0.0.1:{broker.port}?topic=wk.{{table}}"
               "&allow.auto.create.topics=false&topic.metadata.propagation.max.ms=1000")
        options: dict[str, Any] = {"destinations": [url], "durable_slot": True,
                                   "slot_name": slot, "status_interval": 0.5}

        async def stop() -> list[Event]:
            with pytest.raises(DestinationError) as info:
                async with collecting(dsn, **options) as rec:
                    admin.execute("INSERT INTO a VALUES (0, 'before')")
                    _mixed(admin)
                    events = await rec.wait_for(6)
                    await rec._until(lambda: False, 60, "the app to stop")
            _check_refusal(info.value)
            mixed = events[1:]
            app = rec.app
            assert app is not None and _outages(app, lanes) == 0
            assert app.ack.flushed < parse_lsn(mixed[0].lsn)  # the refused one is not acknowledged
            await asyncio.sleep(1.5)  # three status intervals: nothing more is acknowledged
            assert confirmed(admin, slot) < parse_lsn(mixed[0].lsn), "acknowledged a refusal"
            # the broker kept the records it confirmed: the a rows of the refused transaction
            assert {i for i, _d, _m in stored(broker.port, "wk.a")} == \
                {e.id for e in events if e.table == "public.a"}
            # the fix applied, a restart publishes the transaction again, with the same ids
            create_topic(broker.port, "wk.b", 1)
            async with collecting(dsn, **options) as again:
                await again._until(lambda: any(e.table == "public.b" for e in again.events), 60,
                                   "the refused transaction again")
                resent = [e for e in again.events if parse_lsn(e.lsn) >= parse_lsn(mixed[0].lsn)]
                assert [e.id for e in resent] == [e.id for e in mixed]
                await _until_confirmed(admin, slot, parse_lsn(mixed[-1].lsn))
            return events

        async def dead_letter() -> list[Event]:
            def park(events: list[Event], exc: BaseException) -> None:
                dead.append(([e.id for e in events], exc))

            async with collecting(dsn, on_error=park, **options) as rec:
                app = rec.app
                admin.execute("INSERT INTO a VALUES (0, 'before')")
                _mixed(admin)
                admin.execute("INSERT INTO a VALUES (10, 'after')")
                events = await rec.wait_for(7, timeout=30)
                await rec._until(lambda: app.transactions_handled == 3, 60, "all three")
                assert app.destinations.refusals >= 1 and _outages(app, lanes) == 0
                # settled by the policy, then acknowledged with the transaction after it
                await _until_confirmed(admin, slot, parse_lsn(events[-1].lsn))
            return events

        events = run(stop() if policy == "stop" else dead_letter(), timeout=240)
        in_a = {i for i, _d, _m in stored(broker.port, "wk.a")}
        in_b = [i for i, _d, _m in stored(broker.port, "wk.b")] if policy == "stop" else []
    mixed = events[1:6]
    assert [e.table for e in mixed] == ["public.a"] * 3 + ["public.b", "public.a"]
    # nothing delivered is lost: every a record (the refused transaction's too) is there
    assert in_a == {e.id for e in events if e.table == "public.a"}
    if policy == "stop":
        assert in_b == [mixed[3].id]  # stored once the topic existed, with its first id
    else:
        [(ids, exc)] = dead
        assert ids == [e.id for e in mixed]
        _check_refusal(exc)
