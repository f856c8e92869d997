"""The compiled direct twin keeps the JSON forms of the last LSN, time and type in module
state shared by every caller: an event encoded while another one's encoding runs Python
code (its partition's hash, an attribute read by getattr) must still get its own.

On main the header's ``walexlsn`` was read from the module's cache after those calls, so
it could be the LSN of the event another thread (or a re-entrant call) encoded meanwhile,
while the body's ``lsn`` was the event's own.
"""

from __future__ import annotations

import sys
import threading

import psycopg

from destinations.test_direct import TWINS, raw_events, slot

from walex.destinations.encoding import encode_event_reference
from walex.event import Event
from walex.rawevent import RawEvent


def _events(admin: psycopg.Connection, dsn: str) -> list[RawEvent]:
    admin.execute("CREATE TABLE r (id int PRIMARY KEY, t text); CREATE PUBLICATION pub FOR TABLE r")
    slot(admin)
    admin.execute("INSERT INTO r VALUES (1, 'a')")
    admin.execute("INSERT INTO r VALUES (2, 'b')")
    admin.execute("UPDATE r SET t = 'c'")
    events = raw_events(admin, dsn)
    assert len(events) == 4 and len({event.lsn for event in events}) == 4
    return events


_ID = Event.__dict__["id"]


class _Reentrant(RawEvent):
    """A RawEvent whose id is read through a property that encodes another event first (as
    a handler in another thread may do at that moment)."""

    __slots__ = ()
    other: RawEvent | None = None
    twin = None

    @property  # type: ignore[override]
    def id(self) -> str:
        type(self).twin(type(self).other, 3)
        return _ID.__get__(self)


def _reentrant(event: RawEvent) -> _Reentrant:
    out = object.__new__(_Reentrant)
    for name in ("name", "type", "source", "timestamp", "lsn", "id"):
        Event.__dict__[name].__set__(out, Event.__dict__[name].__get__(event))
    RawEvent.__dict__["raw"].__set__(out, event.raw)
    return out


def test_an_event_encoded_while_another_is_encoding(admin: psycopg.Connection, dsn: str) -> None:
    events = _events(admin, dsn)
    for twin in TWINS:
        for event, other in zip(events, events[1:] + events[:1]):
            _Reentrant.other, _Reentrant.twin = other, twin
            reentrant = _reentrant(event)
            for parts in (1, 3):
                expected = encode_event_reference(event.typed(), parts)
                out = twin(reentrant, parts)
                assert out is not None
                assert tuple(out) == tuple(expected), (twin, out.body, expected.body)


def test_events_encoded_in_two_threads_at_once(admin: psycopg.Connection, dsn: str) -> None:
    """Two threads each encode their own event over and over (thread switches as often as
    the interpreter allows): every Outgoing is the reference's of its event."""
    events = _events(admin, dsn)[:2]
    expected = [tuple(encode_event_reference(event.typed(), 3)) for event in events]
    wrong: list[tuple[bytes, bytes]] = []

    def encode(twin: object, i: int) -> None:
        for _ in range(30_000):
            out = twin(events[i], 3)  # type: ignore[operator]
            if tuple(out) != expected[i]:
                wrong.append((out.body, expected[i][5]))
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for twin in TWINS:
            threads = [threading.Thread(target=encode, args=(twin, i)) for i in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, wrong[0]
