"""The CloudEvents ``time`` the compiled encoders write is ``_rfc3339``'s text.

``walex._encode`` and ``walex.destinations._direct`` each include
``destinations/_rfc3339.pxi``: the commit time written in C from the datetime's
fields when it is a ``datetime`` itself, naive or in ``timezone.utc`` (what the
decoder makes), ``_rfc3339`` (``walex.destinations.values``) for anything else.
Both modules' copies are compared with ``_rfc3339`` over edge moments and a few
thousand random ones, and RawEvents of a real PostgreSQL with such moments go
through both twins of the direct encoder and every encoding path.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import orjson
import psycopg
import pytest
from destinations.test_direct import check, raw_events, slot
from destinations.test_encoding_paths import PLAIN_ROWS, PLAIN_SCHEMA

from walex.destinations import direct, encoding  # (they bind the compiled modules)
from walex.destinations.values import _rfc3339
from walex.rawevent import RawEvent

MODULES = [name for name, compiled in (("walex._encode", encoding.compiled_fast_event),
                                       ("walex.destinations._direct", direct.compiled_direct_event))
           if compiled is not None]
UTC = timezone.utc


class Moment(datetime):
    """A datetime subclass formatting itself otherwise: left to ``_rfc3339``."""

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return "moment " + super().isoformat(sep, timespec)


def edge_moments() -> list[datetime]:
    offsets = [timezone(timedelta(hours=h, minutes=mm)) for h, mm in
               ((2, 0), (-5, 0), (5, 30), (-9, -30), (23, 59), (-23, -59))]
    out = []
    for fields in ((1, 1, 1), (1, 1, 1, 0, 0, 0, 1), (9, 2, 3, 4, 5, 6), (99, 12, 31, 23, 59, 59),
                   (999, 12, 31, 23, 59, 59, 999999), (1000, 1, 1), (1970, 1, 1),
                   (2000, 2, 29, 12, 0, 0, 500000), (2026, 12, 7, 8, 30, 0, 10),
                   (2026, 12, 7, 8, 30, 0, 100000), (9999, 12, 31, 23, 59, 59, 999999),
                   (9999, 12, 31)):
        out += [datetime(*fields, tzinfo=UTC), datetime(*fields),  # type: ignore[misc]
                datetime(*fields, tzinfo=UTC, fold=1), datetime(*fields, fold=1),  # type: ignore[misc]
                Moment(*fields, tzinfo=UTC), Moment(*fields)]  # type: ignore[misc]
    middle = datetime(2024, 3, 31, 1, 30, 0, 123)
    out += [middle.replace(tzinfo=tz) for tz in offsets]
    out += [middle.replace(tzinfo=timezone(timedelta(0), "UTC")),  # not the singleton
            middle.replace(tzinfo=ZoneInfo("UTC")), middle.replace(tzinfo=ZoneInfo("Europe/Paris")),
            middle.replace(tzinfo=timezone(timedelta(0))),  # the singleton again
            datetime(1, 1, 1, 23, tzinfo=timezone(timedelta(hours=-2))),  # into year 2
            datetime(9999, 12, 31, 1, tzinfo=timezone(timedelta(hours=1)))]  # from 9999 back
    return out


def random_moments(count: int, seed: int) -> list[datetime]:
    rng = random.Random(seed)
    span = (datetime.max - datetime.min) // timedelta(microseconds=1)
    out = []
    for _ in range(count):
        moment = datetime.min + timedelta(microseconds=rng.randrange(span + 1))
        roll = rng.random()
        if roll < 0.3:
            moment = moment.replace(microsecond=0)
        elif roll < 0.4:
            moment = moment.replace(microsecond=rng.choice((1, 10, 999999, 100000)))
        kind = rng.random()
        if kind < 0.5:
            moment = moment.replace(tzinfo=UTC)
        elif kind < 0.65:
            pass  # naive: taken as UTC
        elif kind < 0.9 and datetime(2, 1, 1) < moment < datetime(9999, 12, 30):
            offset = timedelta(minutes=rng.randrange(-1439, 1440))
            moment = moment.replace(tzinfo=timezone(offset))
        else:
            moment = Moment.combine(moment.date(), moment.time(), UTC)
        out.append(moment)
    return out


def expected_of(moment: datetime) -> str | type[Exception]:
    try:
        return _rfc3339(moment)
    except (OverflowError, ValueError) as exc:
        return type(exc)


def c_takes(moment: datetime) -> bool:
    return type(moment) is datetime and (moment.tzinfo is None or moment.tzinfo is UTC)


def test_a_subclass_text_is_kept_to_itself() -> None:
    """``_rfc3339`` keeps the text of moments not in UTC by value; a subclass formatting
    itself otherwise does not give its text to an equal datetime, nor takes theirs."""
    plus2 = timezone(timedelta(hours=2))
    for tz, text in ((None, "2031-05-06T07:08:09Z"), (plus2, "2031-05-06T05:08:09Z")):
        mine, plain = Moment(2031, 5, 6, 7, 8, 9, tzinfo=tz), datetime(2031, 5, 6, 7, 8, 9, tzinfo=tz)
        assert mine == plain
        assert _rfc3339(mine) == "moment " + text
        assert _rfc3339(plain) == text
        assert _rfc3339(Moment(2031, 5, 6, 7, 8, 9, tzinfo=tz)) == "moment " + text
        assert _rfc3339(datetime(2031, 5, 6, 7, 8, 9, tzinfo=tz)) == text


@pytest.mark.skipif(not MODULES, reason="the compiled encoders were not built")
@pytest.mark.parametrize("name", MODULES)
def test_compiled_time_text_is_rfc3339s(name: str) -> None:
    """Byte for byte ``_rfc3339``'s text, written in C for every datetime naive or in
    UTC (any microseconds, years 1 to 9999, fold), left to ``_rfc3339`` otherwise (other
    zones and offsets, their overflow past the years 1 and 9999, subclasses); the same
    text for the moment given again."""
    texts = __import__(name, fromlist=["_time_texts"])._time_texts
    moments = edge_moments() + random_moments(5000, 20261207)
    taken = 0
    for moment in moments + moments[::-1]:
        expected = expected_of(moment)
        if isinstance(expected, type):  # _rfc3339 raised: the compiled path raises the same
            with pytest.raises(expected):
                texts(moment)
            continue
        c_text, text, pair = texts(moment)
        assert text == expected, (moment, text)
        assert texts(moment)[1] == expected  # kept: the same moment again
        if c_takes(moment):
            assert c_text == expected, (moment, c_text)
            assert pair == (expected, orjson.dumps(expected)), (moment, pair)
            assert type(pair[0]) is str and pair[0].isascii()
            taken += 1
        else:
            assert c_text is None and pair is None, (moment, c_text)
    assert taken > len(moments)  # the common ones are written in C


def test_the_direct_encoder_writes_any_commit_time(admin: psycopg.Connection, dsn: str) -> None:
    """RawEvents of a real PostgreSQL with edge commit times, each moment shared by two
    events (a transaction's) then alternating: every path writes the reference's bytes."""
    admin.execute(PLAIN_SCHEMA)
    slot(admin)
    admin.execute(f"INSERT INTO plain VALUES {PLAIN_ROWS}")
    events = [event for event in raw_events(admin, dsn) if direct.py_direct_event(event, 1)]
    assert events
    moments = [moment for moment in edge_moments() + random_moments(40, 7)
               if not isinstance(expected_of(moment), type)]
    again = []
    for n, moment in enumerate(moments):
        for event in events[n % len(events):][:2]:
            again.append(RawEvent.of(event.name, event.type, event.source, event.raw, moment,
                                     event.lsn, event.id))
    again += again[::3] + again[1::3]
    assert check(again, (1, 3)) == len(again)
