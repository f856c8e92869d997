"""The direct encoder's key forms and key strings (branch relayperf): the compiled twin keeps
a row's key forms in a C array of its own references and makes ASCII key strings without
decoding; the subjects, partition keys and bodies stay the reference's, and nothing is kept
per event.

Real PostgreSQL: the rows come from a pgoutput slot (``test_direct.raw_events``) and go
through both twins and every encoding path (``test_direct.check``).
"""

from __future__ import annotations

import gc
import tracemalloc

import psycopg
import pytest
from destinations.test_direct import KEYS, TWINS, check, raw_events, slot

from walex.destinations import direct
from walex.destinations.encoding import encode_event

NAMES = """
CREATE SCHEMA "sché";
CREATE TABLE "sché"."tâble" (k text PRIMARY KEY, v text);
CREATE TABLE ascii_t (k text PRIMARY KEY, v text);
CREATE TABLE big_t (k bigint PRIMARY KEY, v text);
CREATE TABLE two_t (a text, b bigint, v text, PRIMARY KEY (a, b));
CREATE PUBLICATION pub FOR ALL TABLES;
"""
TEXT_KEYS = ["", "a", "é", "😀", "x" * 40, "123", "a/b", "\x7f", "\u2028"]


def test_key_strings_of_ascii_and_wider_names_and_keys(admin: psycopg.Connection, dsn: str) -> None:
    """A text key empty, ASCII, or wider (2- and 4-byte characters, U+2028), in a table of
    an ASCII name and in one whose schema and table names are not ASCII; bigint keys of 1
    to 19 digits; a composite key; updates and deletes: both twins give the reference's
    Outgoing (subject and partition key included) at several partition counts."""
    admin.execute(NAMES)
    slot(admin)
    for n, k in enumerate(TEXT_KEYS):
        admin.execute('INSERT INTO "sché"."tâble" VALUES (%s, %s)', (k, str(n)))
        admin.execute("INSERT INTO ascii_t VALUES (%s, %s)", (k, str(n)))
        admin.execute("INSERT INTO two_t VALUES (%s, %s, %s)", (k, -(10 ** (n + 5)), str(n)))
    for k in [int("9" * digits) - 1 for digits in range(1, 19)] + [2**63 - 1, -2**63]:
        admin.execute("INSERT INTO big_t VALUES (%s, 'v')", (k,))
    admin.execute('UPDATE "sché"."tâble" SET v = \'w\'; UPDATE ascii_t SET k = k || \'/é\'; '
                  'DELETE FROM two_t; DELETE FROM big_t')
    events = raw_events(admin, dsn)
    keys = {encode_event(e).key for e in events}
    assert {"sché.tâble/", "sché.tâble/é", "public.ascii_t/a", "public.ascii_t/é/é",
            "public.big_t/8", "public.big_t/9223372036854775807"} <= keys
    assert check(events, (1, 4)) == len(events)


@pytest.mark.skipif(direct.compiled_direct_event is None, reason="_direct not built")
def test_the_compiled_twin_keeps_nothing_per_event(admin: psycopg.Connection, dsn: str) -> None:
    """The key forms held while an event is written (text keys, numbers beyond 2**53, a
    jsonb key through its loader, a date key written again with the tolerant loaders) are
    all let go: encoding the events again and again leaves Python's traced memory as it was
    (a form kept per event would be tens of bytes each time)."""
    admin.execute(KEYS)
    slot(admin)
    admin.execute("""
        INSERT INTO keyed VALUES (1, 'x"y', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-01-01', 1.50, 'v');
        INSERT INTO by_date VALUES ('2024-01-01', 'v'), ('infinity', 'w');
        INSERT INTO by_num VALUES (1.50, 'v'), ('NaN', 'w');
        INSERT INTO by_big VALUES (9007199254740993, 'v'), (-9007199254740991, 'w');
        INSERT INTO by_jsonb VALUES ('{"n": 1}', 'v'), ('"s"', 'w');
        INSERT INTO idx VALUES (1, 'b', 'v');
        UPDATE keyed SET a = 2; UPDATE idx SET a = 2; UPDATE by_date SET v = 'x';
        DELETE FROM keyed; DELETE FROM by_date; DELETE FROM by_jsonb; DELETE FROM idx;
    """)
    events = raw_events(admin, dsn)
    twin = TWINS[-1]
    assert twin is direct.compiled_direct_event
    taken = [e for e in events if twin(e, 3) is not None]
    assert len(taken) >= len(events) - 1
    for _ in range(50):  # warm: caches filled, free lists settled
        for event in taken:
            twin(event, 3)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            for event in taken:
                twin(event, 3)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 300 * 8, grown  # ~nothing (a kept str would be 300 x len(taken) x 40+ B)
