"""Dispatcher.plan and Dispatcher.unwanted against what each handler concerns and keeps.

Concern (:mod:`walex.dispatch`): ``plan`` keeps the handlers that concern an event of
a type, schema and table (what :meth:`Handler.concerns` looks at) until the handlers
change, and ``unwanted`` tells the transactions no handler wants from those answers.
Whatever was asked before, with handlers registered in between, the plan of a
transaction gives each handler exactly the events it concerns and its filters keep
(each filter asked once per event it concerns, never about another), in handler
order; ``unwanted`` counts the leading transactions with no such event. The answers
kept stay bounded however many tables come and go.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from typing import Any

from walex import Event, Events, EventType, Source
from walex.dispatch import _KINDS, NOTHING, Dispatcher
from walex.transactions import Transaction

NOW = datetime.now(timezone.utc)
SOURCES = [Source("db", schema, table) for schema in ("public", "other")
           for table in ("a", "b", "c")]
TYPES = [EventType.INSERT, EventType.UPDATE, EventType.DELETE]


def event(source: Source, kind: EventType, row: int) -> Event:
    return Event(source.table, kind, source, {"id": row}, None, None, NOW, "0/1",
                 f"{row:016x}-00000000")


def txn(events: list[Event]) -> Transaction:
    return Transaction(1, 1, 2, NOW, events)


async def _call(events: list[Event]) -> None:
    pass


def test_plans_match_what_each_handler_concerns_and_keeps_as_handlers_are_registered() -> None:
    rng = random.Random(7)
    module = Events()
    dispatcher = Dispatcher([module])
    asked: list[tuple[int, str]] = []  # (handler number, event id) each filter was asked about
    rows = iter(range(1, 10**6))
    for round_ in range(40):
        if round_ % 4 == 0:  # a handler registered between plans, as while streaming
            number = len(module.handlers)
            table = rng.choice(["a", "other.b", "c", "all", "zzz"])
            types = rng.sample(["insert", "update", "delete"], rng.randint(1, 3))
            options: dict[str, Any] = {}
            if rng.random() < 0.5:
                def where(e: Event, n: int = number) -> bool:
                    asked.append((n, e.id))
                    return e.new_record["id"] % 2 == 0
                options["where"] = where
            module.register(_call, table, types=types, **options)
        for _ in range(25):
            events = [event(rng.choice(SOURCES), rng.choice(TYPES), next(rows))
                      for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            expected, filtered = [], []
            for number, handler in enumerate(module.handlers):
                concerned = [e for e in events if handler.concerns(e)]
                if handler.filters:
                    filtered += [(number, e.id) for e in concerned]
                    concerned = [e for e in concerned if e.new_record["id"] % 2 == 0]
                if concerned:
                    expected.append((number, [e.id for e in concerned]))
            asked.clear()
            wanted = any(h.concerns(e) for h in module.handlers for e in events)
            assert dispatcher.unwanted([txn(events)]) == (0 if wanted else 1)
            assert asked == []  # unwanted asks no filter
            plan = dispatcher.plan(txn(events))
            got = [(next(i for i, x in enumerate(module.handlers) if x is h),
                    [e.id for e in selected]) for h, selected in plan[3]]
            assert got == expected, (events, module.handlers)
            assert asked == filtered  # each filter asked once per event its handler concerns
            assert (plan[0] == NOTHING) == (not expected)


def test_unwanted_counts_the_leading_transactions_no_handler_wants() -> None:
    module = Events()
    module.on_insert("b")(_call)
    dispatcher = Dispatcher([module])
    a, b = SOURCES[0], SOURCES[1]
    txns = [txn([event(a, EventType.INSERT, 1)]), txn([event(b, EventType.UPDATE, 2)]),
            txn([event(a, EventType.DELETE, 3), event(b, EventType.DELETE, 4)]), txn([]),
            txn([event(a, EventType.INSERT, 5), event(b, EventType.INSERT, 6)]),
            txn([event(a, EventType.INSERT, 7)])]
    assert dispatcher.unwanted(txns) == 4
    assert dispatcher.unwanted(txns[4:]) == 0 and dispatcher.unwanted(txns[5:]) == 1
    module.on_event("a")(_call)  # registered since: counts from the next look
    assert dispatcher.unwanted(txns) == 0 and dispatcher.unwanted(txns[1:]) == 1


def test_the_answers_kept_per_table_are_bounded() -> None:
    module = Events()
    module.on_event("a")(_call)
    dispatcher = Dispatcher([module])
    for i in range(3 * _KINDS):
        source = Source("db", "public", f"t{i}")
        assert dispatcher.plan(txn([event(source, EventType.INSERT, i)]))[0] == NOTHING
        assert len(dispatcher._kinds) <= _KINDS
    assert dispatcher.plan(txn([event(SOURCES[0], EventType.INSERT, 1)]))[0] != NOTHING
