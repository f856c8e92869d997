"""The pgoutput decoder against messages real PostgreSQL servers produced.

The fixtures (``fixtures/pg<major>/*.json``, written by ``capture.py``) need no
server.  ``test_live_*`` capture the same scenarios at test time from every
server of the ``pg_cluster`` fixture and run the same checks, and compare the
message sequences with the fixtures of that major version, so the fixtures
cannot go stale silently.

Each scenario is fed, in order, through ONE :class:`Decoder`: changes inside a
streamed block carry an extra xid, which only the decoder's stream state tells.
Expected values come from what the scenario wrote and from ``facts`` the
capture read from the server's catalogs, never from the decoder itself.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from walex.embedded import Cluster
from walex.errors import DecodeError
from walex.pgoutput import (
    UNCHANGED_TOAST, Begin, BeginPrepare, BinaryValue, Commit, CommitPrepared, Delete,
    Insert, LogicalMessage, Message, Origin, Prepare, Relation, RollbackPrepared,
    StreamAbort, StreamCommit, StreamPrepare, StreamStart, StreamStop, Truncate,
    TupleData, Type, Update,
)
from walex.pgoutput.decoder import TAG_NAMES, Decoder

from .capture import (
    BIG_PAD, DOC_BODY, FIXTURES, WORK_MEM, Capture, WalSender, capture_all, load_fixtures,
    parse_lsn,
)

if TYPE_CHECKING:
    from conftest import PgServer

UTC = timezone.utc
SLACK = timedelta(seconds=1)  # server timestamps vs the capture's clock_timestamp() bounds

TAG_OF: dict[type, str] = {
    Begin: "B", Commit: "C", Origin: "O", Relation: "R", Type: "Y", Insert: "I",
    Update: "U", Delete: "D", Truncate: "T", LogicalMessage: "M", StreamStart: "S",
    StreamStop: "E", StreamCommit: "c", StreamAbort: "A", BeginPrepare: "b",
    Prepare: "P", CommitPrepared: "K", RollbackPrepared: "r", StreamPrepare: "p",
}

FIXTURE_CAPTURES = load_fixtures()


@dataclass
class Item:
    lsn: int
    data: bytes
    msg: Message
    skipped: int  # similar messages trimmed from the fixture just before this one


def decode(cap: Capture) -> list[Item]:
    """Decode a capture in order through one Decoder."""
    decoder = Decoder()
    items = []
    for (lsn, data), skipped in zip(cap.messages, cap.skipped, strict=True):
        before = decoder.in_stream
        msg = decoder.decode(data, lsn)
        assert TAG_OF[type(msg)] == chr(data[0]), (cap.name, data[:1], msg)
        expected = {StreamStart: True, StreamStop: False}.get(type(msg), before)
        assert decoder.in_stream is expected, (cap.name, msg)
        items.append(Item(lsn, data, msg, skipped))
    assert not decoder.in_stream, f"{cap.name} ends inside a streamed block"
    return items


def tags(items: list[Item]) -> str:
    return "".join(TAG_OF[type(item.msg)] for item in items)


def of(items: list[Item], kind: type) -> list[Any]:
    return [item.msg for item in items if type(item.msg) is kind]


def timestamps(msg: Message) -> list[datetime]:
    names = ["commit_time", "prepare_time", "rollback_time", "abort_time"]
    return [v for n in names if isinstance(v := getattr(msg, n, None), datetime)]


def tuples(msg: Message) -> list[TupleData]:
    return [t for t in (getattr(msg, "new", None), getattr(msg, "old", None)) if t is not None]


# -- protocol rules every capture obeys -------------------------------------------------

def check_protocol(cap: Capture, items: list[Item]) -> None:
    """Message order, LSN relations, stream xids and catalog facts, for any scenario."""
    facts = cap.facts
    proto = int(cap.options["proto_version"])
    parallel = cap.options.get("streaming") == "parallel"
    binary = cap.options.get("binary") == "true"
    low = datetime.fromisoformat(facts["started_at"]) - SLACK
    high = datetime.fromisoformat(facts["finished_at"]) + SLACK
    relations: dict[int, Relation] = {}
    prepared: dict[str, Prepare | StreamPrepare] = {}
    streaming: set[int] = set()  # xids streamed and not yet committed/aborted/prepared
    seen_streams: set[int] = set()
    state: str | None = None  # None, "txn", "prepare" or "stream"
    opener: Any = None
    previous: Any = None
    for item in items:
        msg, kind, where = item.msg, type(item.msg), f"{cap.name} at {item.lsn:X}: {item.msg}"
        for ts in timestamps(msg):
            assert ts.tzinfo is not None and ts.utcoffset() == timedelta(0), where
            if cap.scenario != "origin":
                assert low <= ts <= high, where
        if kind is Begin:
            assert state is None, where
            state, opener = "txn", msg
            assert item.lsn <= msg.final_lsn, where
        elif kind is Commit:
            assert state == "txn", where
            assert msg.flags == 0
            assert msg.commit_lsn == opener.final_lsn < msg.end_lsn == item.lsn, where
            assert msg.commit_time == opener.commit_time, where
            state = None
        elif kind is BeginPrepare:
            assert proto >= 3 and state is None, where
            state, opener = "prepare", msg
            assert msg.prepare_lsn < msg.end_lsn, where
        elif kind is Prepare:
            assert state == "prepare", where
            assert msg.flags == 0
            assert ((msg.prepare_lsn, msg.end_lsn, msg.prepare_time, msg.xid, msg.gid)
                    == (opener.prepare_lsn, opener.end_lsn, opener.prepare_time, opener.xid,
                        opener.gid)), where
            assert msg.end_lsn == item.lsn, where
            prepared[msg.gid] = msg
            state = None
        elif kind is CommitPrepared:
            assert state is None, where
            done = prepared.pop(msg.gid)
            assert msg.flags == 0 and msg.xid == done.xid, where
            assert done.end_lsn <= msg.commit_lsn < msg.end_lsn == item.lsn, where
            assert msg.commit_time >= done.prepare_time, where
        elif kind is RollbackPrepared:
            assert state is None, where
            done = prepared.pop(msg.gid)
            assert msg.flags == 0 and msg.xid == done.xid, where
            assert msg.prepare_end_lsn == done.end_lsn < msg.rollback_end_lsn == item.lsn, where
            assert msg.prepare_time == done.prepare_time <= msg.rollback_time, where
        elif kind is StreamStart:
            assert proto >= 2 and state is None, where
            state, opener = "stream", msg
            assert msg.first_segment == (msg.xid not in seen_streams), where
            streaming.add(msg.xid)
            seen_streams.add(msg.xid)
        elif kind is StreamStop:
            assert state == "stream", where
            state = None
        elif kind is StreamCommit:
            assert state is None and msg.xid in streaming, where
            streaming.remove(msg.xid)
            assert msg.flags == 0
            assert msg.commit_lsn < msg.end_lsn == item.lsn, where
        elif kind is StreamAbort:
            assert state is None and msg.xid in streaming, where
            if msg.subxid == msg.xid:
                streaming.remove(msg.xid)
            if parallel:  # protocol 4 with streaming = parallel adds the abort position
                assert msg.abort_lsn == item.lsn and msg.abort_time is not None, where
                assert len(item.data) == 25
            else:
                assert msg.abort_lsn is None and msg.abort_time is None, where
                assert len(item.data) == 9
        elif kind is StreamPrepare:
            assert proto >= 3 and state is None and msg.xid in streaming, where
            streaming.remove(msg.xid)
            assert msg.flags == 0
            assert msg.prepare_lsn < msg.end_lsn == item.lsn, where
            prepared[msg.gid] = msg
        elif kind is Origin:
            assert state in ("txn", "stream") and previous is opener, where
        elif kind is LogicalMessage and not msg.transactional:
            assert state is None and msg.xid is None, where
            assert msg.lsn == item.lsn, where
        else:  # inside a transaction: Relation, Type, changes, transactional messages
            assert state in ("txn", "prepare", "stream"), where
            if state == "stream":
                assert msg.xid is not None, where
            else:
                assert msg.xid is None, where
            if kind is Relation:
                relations[msg.relation_id] = msg
                check_relation(facts, msg)
            elif kind is Type:
                mood = facts["mood"]
                assert (msg.type_oid, msg.namespace, msg.name) == (
                    mood["oid"], mood["namespace"], mood["name"]), where
            elif kind is Truncate:
                assert all(r in relations for r in msg.relation_ids), where
                assert 0 <= msg.options <= 3, where
            elif kind is LogicalMessage:
                assert msg.lsn == item.lsn, where
            else:
                check_row(msg, relations[msg.relation_id], binary, where)
        previous = msg
    assert state is None, f"{cap.name} ends inside a transaction"
    assert not prepared and not streaming, (cap.name, prepared, streaming)


def check_relation(facts: dict[str, Any], rel: Relation) -> None:
    """A Relation message matches what pg_class/pg_attribute/pg_index say."""
    expected = facts["relations"][rel.name]
    assert rel.relation_id == expected["oid"]
    assert rel.namespace == expected["namespace"] == "public"
    assert rel.replica_identity == expected["replica_identity"]
    got = [[c.name, c.type_oid, c.type_modifier, c.is_key] for c in rel.columns]
    assert got == expected["columns"]


def check_row(msg: Insert | Update | Delete, rel: Relation, binary: bool, where: str) -> None:
    for row in tuples(msg):
        assert len(row.values) == len(rel.columns), where
        assert row.plain == all(v is None or type(v) is bytes for v in row.values), where
        for value in row.values:
            if value is None or value is UNCHANGED_TOAST:
                continue
            assert type(value) is (BinaryValue if binary else bytes), where
    if type(msg) is Insert:
        return
    if msg.old is None:
        assert type(msg) is Update and msg.old_kind is None, where
    elif msg.old_kind == "O":
        assert rel.replica_identity == "f", where
    else:  # the key: key columns set, every other column NULL
        assert msg.old_kind == "K" and rel.replica_identity in "di", where
        for column, value in zip(rel.columns, msg.old.values, strict=True):
            assert (value is not None) == column.is_key, where


# -- what each scenario wrote ---------------------------------------------------------

def _micros(ts: datetime) -> int:
    return (ts - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _i4(n: int) -> tuple[bytes, bytes]:
    return str(n).encode(), struct.pack("!i", n)


def _text(s: str) -> tuple[bytes, bytes]:
    return s.encode(), s.encode()


_N, _U = None, UNCHANGED_TOAST
# numeric 1.50 in binary: ndigits 2, weight 0, sign +, dscale 2, base-10000 digits 1 and 5000
_NUMERIC = (b"1.50", struct.pack("!hhHHhh", 2, 0, 0, 2, 1, 5000))
_ARRAY = (b"{red,green}", struct.pack("!iiIii", 1, 0, 25, 2, 1)
          + struct.pack("!i", 3) + b"red" + struct.pack("!i", 5) + b"green")
_AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
_TS = (b"2024-05-06 07:08:09+00", struct.pack("!q", _micros(_AT)))


def _row(values: list[Any], binary: bool) -> list[Any]:
    return [v if v is None or v is UNCHANGED_TOAST else v[binary] for v in values]


def check_dml(cap: Capture, items: list[Item]) -> None:
    binary = cap.scenario == "dml_binary"
    facts = cap.facts
    oid = {name: rel["oid"] for name, rel in facts["relations"].items()}
    # Type before the Relation that uses it; each Relation once, before its first change.
    assert tags(items) == "BYRIIRIRIRIC" + "BUC" * 5 + "BDDC"
    assert [b.xid for b in of(items, Begin)] == facts["xids"]
    assert [r.name for r in of(items, Relation)] == ["items", "audit", "codes", "docs"]
    assert [t.name for t in of(items, Type)] == ["mood"]
    items_row = [_i4(1), _text("apple"), _NUMERIC, _text("happy"), _ARRAY]
    expected: list[tuple[type, str, list[Any], str | None, list[Any] | None]] = [
        (Insert, "items", items_row, None, None),
        (Insert, "items", [_i4(2), _text("pear"), _N, _N, _N], None, None),
        (Insert, "audit", [_i4(1), _text("created"), _TS], None, None),
        (Insert, "codes", [_i4(1), _text("A"), _text("first")], None, None),
        (Insert, "docs", [_i4(1), _text(DOC_BODY), _i4(1)], None, None),
        (Update, "items", [_i4(1), _text("green apple"), *items_row[2:]], None, None),
        (Update, "items", [_i4(20), _text("pear"), _N, _N, _N], "K", [_i4(2), _N, _N, _N, _N]),
        (Update, "audit", [_i4(1), _text("changed"), _TS], "O",
         [_i4(1), _text("created"), _TS]),
        (Update, "codes", [_i4(1), _text("B"), _text("first")], "K", [_N, _text("A"), _N]),
        (Update, "docs", [_i4(1), _U, _i4(2)], None, None),  # TOASTed body not resent
        (Delete, "items", [], "K", [_i4(20), _N, _N, _N, _N]),
        (Delete, "audit", [], "O", [_i4(1), _text("changed"), _TS]),
    ]
    changes = [i.msg for i in items if type(i.msg) in (Insert, Update, Delete)]
    assert len(changes) == len(expected)
    for msg, (kind, table, new, old_kind, old) in zip(changes, expected):
        assert type(msg) is kind and msg.relation_id == oid[table], msg
        if kind is not Delete:
            assert msg.new.values == _row(new, binary), msg
        if kind is not Insert:
            assert msg.old_kind == old_kind, msg
            assert (msg.old.values if msg.old else None) == (old and _row(old, binary)), msg
    assert changes[4].new.values[1] == DOC_BODY.encode()  # 20 kB, detoasted by the server
    assert changes[9].new.plain is False


def check_truncate(cap: Capture, items: list[Item]) -> None:
    oid = {name: rel["oid"] for name, rel in cap.facts["relations"].items()}
    assert tags(items) == "BRRTC" * 2
    assert [b.xid for b in of(items, Begin)] == cap.facts["xids"]
    cascade, plain = of(items, Truncate)
    assert cascade.relation_ids == [oid["parent"], oid["child"]]  # child by CASCADE
    assert cascade.options == 3 and cascade.cascade and cascade.restart_identity
    assert plain.relation_ids == [oid["codes"], oid["docs"]]
    assert plain.options == 0 and not plain.cascade and not plain.restart_identity


def check_messages(cap: Capture, items: list[Item]) -> None:
    assert tags(items) == "BMMCMM"
    assert [b.xid for b in of(items, Begin)] == cap.facts["xids"]
    got = [(m.transactional, m.prefix, m.content) for m in of(items, LogicalMessage)]
    assert got == [
        (True, "walex", b"in a transaction"),
        (True, "walex", b""),
        (False, "walex/ünï", b"\x00\xff\x10"),
        (False, "walex", b"survives rollback"),  # the transactional one was rolled back
    ]


def check_origin(cap: Capture, items: list[Item]) -> None:
    assert tags(items) == "BORIC"
    begin, origin, commit = items[0].msg, items[1].msg, items[4].msg
    expected = cap.facts["origin"]
    assert origin.name == expected["name"]
    assert origin.commit_lsn == parse_lsn(expected["lsn"]) == 0x1234ABCD
    # With an origin the server reports the origin's commit time (xact_setup).
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert begin.commit_time == commit.commit_time == when
    assert begin.xid == cap.facts["xids"][0]
    assert items[3].msg.new.values == [b"7", b"origin", None]


def check_twophase(cap: Capture, items: list[Item]) -> None:
    assert tags(items) == "bYRIPK" + "bIPr"
    facts = cap.facts
    assert [m.gid for m in of(items, BeginPrepare)] == facts["gids"]
    assert [m.xid for m in of(items, Prepare)] == facts["xids"]
    assert [m.gid for m in of(items, CommitPrepared)] == facts["gids"][:1]
    assert [m.gid for m in of(items, RollbackPrepared)] == facts["gids"][1:]
    rows = [m.new.values for m in of(items, Insert)]
    assert rows == [[b"30", b"prepared", None, b"ok", None], [b"31", b"prepared", None, b"ok", None]]


def _streamed_rows(items: list[Item]) -> dict[int, list[int]]:
    """Row ids inserted per xid (counting trimmed messages), checking they are consecutive."""
    rows: dict[int, list[int]] = defaultdict(list)
    for item in items:
        msg = item.msg
        if type(msg) is not Insert:
            continue
        assert msg.xid is not None
        row_id = int(msg.new.values[0])
        assert msg.new.values[1] == f"row-{row_id}-{BIG_PAD}".encode()
        ids = rows[msg.xid]
        if item.skipped:  # the trimmed ones were the same table and xid: the ids between
            assert ids and row_id - ids[-1] == item.skipped + 1, (ids[-1:], item.skipped, msg)
            ids.extend(range(ids[-1] + 1, row_id))
        ids.append(row_id)
    return rows


def check_stream_commit(cap: Capture, items: list[Item]) -> None:
    facts, oid = cap.facts, cap.facts["relations"]["big"]["oid"]
    top, aborted, kept = facts["xid"], facts["aborted_subxid"], facts["kept_subxid"]
    sequence = tags(items)
    assert re.fullmatch(r"(S[^SE]*E)+A(S[^SE]*E)+c", sequence), sequence
    assert {s.xid for s in of(items, StreamStart)} == {top}
    assert [s.first_segment for s in of(items, StreamStart)][:2] == [True, False]
    [abort] = of(items, StreamAbort)
    assert (abort.xid, abort.subxid) == (top, aborted)  # ROLLBACK TO SAVEPOINT
    rows = _streamed_rows(items)
    assert set(rows) == {top, aborted, kept}
    assert rows[top] == [*range(1, 601), *range(3001, 3006)]
    assert rows[kept] == list(range(2001, 2601))  # RELEASE SAVEPOINT: still its own xid
    # The aborted subtransaction was streamed only until the server learnt of the abort.
    assert 0 < len(rows[aborted]) <= 600 and rows[aborted] == list(range(1001, 1001 + len(
        rows[aborted])))
    position = {id(i.msg): n for n, i in enumerate(items)}
    last_aborted = max(position[id(m)] for m in of(items, Insert) if m.xid == aborted)
    first_kept = min(position[id(m)] for m in of(items, Insert) if m.xid == kept)
    assert last_aborted < position[id(abort)] < first_kept
    [message] = of(items, LogicalMessage)
    assert (message.transactional, message.prefix, message.content, message.xid) == (
        True, "walex", b"streamed", top)
    [update] = of(items, Update)
    assert (update.xid, update.relation_id, update.new.values) == (top, oid, [b"1", b"updated"])
    [delete] = of(items, Delete)
    assert (delete.xid, delete.old_kind, delete.old.values) == (top, "K", [b"2", None])
    [truncate] = of(items, Truncate)
    assert truncate.xid == top
    assert truncate.relation_ids == [facts["relations"]["codes"]["oid"]]
    [commit] = of(items, StreamCommit)
    assert commit.xid == top and items[-1].msg is commit


def check_stream_prepare(cap: Capture, items: list[Item]) -> None:
    facts = cap.facts
    sequence = tags(items)
    assert re.fullmatch(r"(S[^SE]*E)+pK", sequence), sequence
    [prepare], [commit] = of(items, StreamPrepare), of(items, CommitPrepared)
    assert (prepare.xid, prepare.gid) == (commit.xid, commit.gid) == (facts["xid"], facts["gid"])
    assert _streamed_rows(items) == {facts["xid"]: list(range(5001, 5601))}


def check_stream_rollback(cap: Capture, items: list[Item]) -> None:
    xid = cap.facts["xid"]
    sequence = tags(items)
    assert re.fullmatch(r"(S[^SE]*E)+A", sequence), sequence
    [abort] = of(items, StreamAbort)
    assert abort.xid == abort.subxid == xid  # the whole transaction
    rows = _streamed_rows(items)
    assert set(rows) == {xid}
    assert 0 < len(rows[xid]) <= 600 and rows[xid] == list(range(7001, 7001 + len(rows[xid])))


CHECKS = {
    "dml": check_dml, "dml_binary": check_dml, "truncate": check_truncate,
    "messages": check_messages, "origin": check_origin, "twophase": check_twophase,
    "stream_commit": check_stream_commit, "stream_commit_parallel": check_stream_commit,
    "stream_prepare": check_stream_prepare, "stream_rollback": check_stream_rollback,
    "stream_rollback_parallel": check_stream_rollback,
}
DETERMINISTIC = {"dml", "dml_binary", "truncate", "messages", "origin", "twophase"}


def check_capture(cap: Capture) -> list[Item]:
    items = decode(cap)
    check_protocol(cap, items)
    CHECKS[cap.scenario](cap, items)
    return items


# -- fixtures -------------------------------------------------------------------------

@pytest.mark.parametrize("cap", FIXTURE_CAPTURES, ids=lambda c: c.name)
def test_fixture(cap: Capture) -> None:
    check_capture(cap)


def test_fixture_files() -> None:
    paths = sorted(FIXTURES.glob("pg*/*.json"))
    assert sum(p.stat().st_size for p in paths) < 1_000_000
    majors = set()
    for path in paths:
        data = json.loads(path.read_text())
        assert path.parent.name == f"pg{data['server_major']}"
        assert data["server_version"].split(".")[0] == str(data["server_major"])
        assert path.stem == data["scenario"] and data["scenario"] in CHECKS
        if int(data["options"]["proto_version"]) >= 4:
            assert data["server_major"] >= 16  # protocol 4 is PostgreSQL 16+
        majors.add(data["server_major"])
    assert 18 in majors and min(majors) < 16  # the embedded server and an older one
    pg18 = {c.scenario for c in FIXTURE_CAPTURES if c.server_major == 18}
    assert pg18 == set(CHECKS)


def test_fixtures_cover_every_message_and_column_kind() -> None:
    seen: set[str] = set()
    for cap in FIXTURE_CAPTURES:
        for item in decode(cap):
            msg = item.msg
            seen.add(TAG_OF[type(msg)])
            if type(msg) is StreamAbort:
                seen.add("A+lsn" if msg.abort_lsn is not None else "A-lsn")
            if type(msg) is Update:
                seen.add(f"U{msg.old_kind}")
            if type(msg) in (Delete, Truncate, LogicalMessage):
                seen.add(f"{TAG_OF[type(msg)]}{getattr(msg, 'old_kind', '')}"
                         f"{getattr(msg, 'options', '')}{getattr(msg, 'transactional', '')}")
            if type(msg) is Relation:
                seen.add(f"R{msg.replica_identity}")
            if type(msg) in (Insert, Update, Delete) and msg.xid is not None:
                seen.add(f"{TAG_OF[type(msg)]}+xid")
            for row in tuples(msg):
                for value in row.values:
                    seen.add("n" if value is None else "u" if value is UNCHANGED_TOAST
                             else "b" if type(value) is BinaryValue else "t")
    assert set(TAG_NAMES) <= seen
    assert {"A+lsn", "A-lsn", "UNone", "UK", "UO", "DK", "DO", "T3", "T0", "MTrue", "MFalse",
            "Rd", "Rf", "Ri", "I+xid", "U+xid", "D+xid", "t", "n", "u", "b"} <= seen


def test_stream_changes_need_the_stream_state() -> None:
    """An Insert from inside a stream has an xid first: a fresh Decoder rejects it."""
    cap = next(c for c in FIXTURE_CAPTURES if c.scenario == "stream_commit")
    lsn, data = next((lsn, d) for lsn, d in cap.messages if d[:1] == b"I")
    with pytest.raises(DecodeError, match="Insert") as info:
        Decoder().decode(data, lsn)
    assert info.value.tag == "I" and info.value.lsn == lsn
    decoder = Decoder()
    decoder.decode(b"S" + data[1:5] + b"\x01", lsn)
    assert decoder.decode(data, lsn).xid == int.from_bytes(data[1:5], "big")


# -- live servers ---------------------------------------------------------------------

def _compare_with_fixtures(caps: list[Capture], major: int) -> None:
    fixtures = {c.scenario: c for c in FIXTURE_CAPTURES if c.server_major == major}
    for cap in caps:
        if cap.scenario in DETERMINISTIC and cap.scenario in fixtures:
            fixture = fixtures[cap.scenario]
            assert tags(decode(cap)) == tags(decode(fixture)), cap.name
            assert [d[:1] for _, d in cap.messages] == [d[:1] for _, d in fixture.messages]


def test_live_capture(pg_cluster: PgServer, dsn: str) -> None:
    """Capture every scenario the server allows now, decode and check it."""
    caps = capture_all(dsn)
    expected = {"dml", "dml_binary", "truncate", "messages", "origin", "stream_commit",
                "stream_rollback"}
    if pg_cluster.major_version >= 16:
        expected |= {"stream_commit_parallel", "stream_rollback_parallel"}
    with psycopg.connect(dsn) as conn:
        if conn.execute("SHOW max_prepared_transactions").fetchone() != ("0",):
            expected |= {"twophase", "stream_prepare"}
    assert {c.scenario for c in caps} == expected
    for cap in caps:
        assert cap.server_major == pg_cluster.major_version
        check_capture(cap)
    _compare_with_fixtures(caps, pg_cluster.major_version)


def test_live_two_phase(pg_cluster: PgServer, dsn: str) -> None:
    """Two-phase scenarios need max_prepared_transactions > 0: a sibling cluster if need be."""
    with psycopg.connect(dsn) as conn:
        enabled = conn.execute("SHOW max_prepared_transactions").fetchone() != ("0",)
    if enabled:
        pytest.skip("covered by test_live_capture on this server")
    if pg_cluster.cluster is None:
        pytest.skip("external server without max_prepared_transactions")
    settings = {"max_prepared_transactions": "4", "logical_decoding_work_mem": WORK_MEM}
    with Cluster(pg_cluster.cluster.bindir, settings) as cluster:
        caps = capture_all(cluster.dsn(), ["twophase", "stream_prepare"])
    assert [c.scenario for c in caps] == ["twophase", "stream_prepare"]
    for cap in caps:
        check_capture(cap)
    _compare_with_fixtures(caps, pg_cluster.major_version)


def test_live_non_utf8_database(pg_cluster: PgServer) -> None:
    """Names arrive in the replication connection's client_encoding.

    The decoder reads names as UTF-8.  In a LATIN1 database the server converts
    them (and text values) only if the connection asks for ``client_encoding
    UTF8``; otherwise the Relation is a DecodeError, not a UnicodeDecodeError.
    """
    dbname = f"walex_latin1_{os.getpid()}"
    ident = sql.Identifier(dbname)
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C'"
                             " LC_CTYPE 'C' TEMPLATE template0").format(ident))
    received: dict[str | None, list[tuple[int, bytes]]] = {}
    try:
        dsn = pg_cluster.dsn(dbname)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute('CREATE TABLE "café" ("naïve" text)')
            conn.execute('CREATE PUBLICATION walex_pub FOR TABLE "café"')
            for encoding in ("UTF8", None):
                slot = f"walex_latin1_{encoding or 'default'}".lower()
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
                conn.execute("""INSERT INTO "café" VALUES ('é')""")
                sender = WalSender(make_conninfo(dsn, client_encoding=encoding) if encoding
                                   else dsn, slot, {"proto_version": "1",
                                                    "publication_names": "walex_pub"})
                try:
                    sender.read_until(lambda m: m[:1] == b"C", timeout=30)
                finally:
                    sender.close()
                received[encoding] = sender.messages
    finally:
        with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
            for _ in range(100):  # the walsenders may take a moment to exit
                try:
                    conn.execute("SELECT pg_drop_replication_slot(slot_name)"
                                 " FROM pg_replication_slots WHERE database = %s", [dbname])
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.05)
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident))

    decoder = Decoder()
    _, relation, insert, _ = (decoder.decode(d, lsn) for lsn, d in received["UTF8"])
    assert type(relation) is Relation and relation.name == "café"
    assert [c.name for c in relation.columns] == ["naïve"]
    assert type(insert) is Insert and insert.new.values == ["é".encode()]

    decoder = Decoder()
    (lsn0, begin_raw), (lsn1, relation_raw), (lsn2, insert_raw), _ = received[None]
    decoder.decode(begin_raw, lsn0)
    with pytest.raises(DecodeError, match="malformed pgoutput Relation message") as info:
        decoder.decode(relation_raw, lsn1)
    assert info.value.tag == "R"
    assert decoder.decode(insert_raw, lsn2).new.values == ["é".encode("latin-1")]
