"""Level ``psycopg2``: LogicalReplicationConnection plus a plain pgoutput decoder.

What a Python user gets by hand: psycopg2's replication cursor with
``decode=False``, ``read_message()`` in a select loop, the straightforward
decoder of ``pgoutput_plain.py`` turning every row into a dict of typed
values, and a handler that touches every value (as the walex level does). A
standby status update (flush = end LSN of the last handled commit) goes out
every 10 s and at the end.
"""

from __future__ import annotations

import select
import sys
import time

from _common import Result, parse_args, parse_lsn
from pgoutput_plain import Begin, Change, Commit, Decoder

import psycopg2
from psycopg2.extras import LogicalReplicationConnection


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    endpos = parse_lsn(args.endpos)
    marker = args.marker_table
    res = Result("psycopg2", args)
    lag = args.lag

    conn = psycopg2.connect(args.dsn, connection_factory=LogicalReplicationConnection)
    cur = conn.cursor()
    cur.start_replication(slot_name=args.slot, decode=False,
                          options={"proto_version": "1", "publication_names": args.publication})
    res.ready()
    decoder = Decoder()
    rows = values = txns = 0
    pending: list[Change] = []  # changes of the open transaction, handled at commit
    flushed = 0
    last_feedback = time.monotonic()

    def handle(changes: list[Change], commit: Commit) -> tuple[int, int]:
        n = v = 0
        now = time.time() if lag else 0.0
        for ch in changes:
            if ch.table == marker:
                res.data["marker_seen"] = True
                continue
            n += 1
            _ = (ch.op, ch.schema, commit.commit_time, commit.commit_lsn)
            if lag:
                res.lags.append(now - commit.commit_time.timestamp())
            if ch.new is not None:
                for x in ch.new.values():
                    v += x is not None
            if ch.old is not None:
                for x in ch.old.values():
                    v += x is not None
        return n, v

    done = False
    while not done:
        msg = cur.read_message()
        if msg is None:
            now = time.monotonic()
            if now - last_feedback > 10:
                cur.send_feedback(flush_lsn=flushed, reply=True)
                last_feedback = now
            select.select([cur], [], [], 1.0)
            continue
        out = decoder.decode(msg.payload)
        if out is None:
            continue
        if type(out) is Change:
            pending.append(out)
        elif type(out) is Commit:
            n, v = handle(pending, out)
            if n:
                res.first_row()
            rows += n
            values += v
            txns += 1
            pending = []
            flushed = out.end_lsn
            if out.end_lsn >= endpos or res.data["marker_seen"]:
                res.end()
                done = True
        elif type(out) is Begin:
            pending = []
        elif type(out) is list:
            pending.extend(out)
        now = time.monotonic()
        if now - last_feedback > 10:
            cur.send_feedback(flush_lsn=flushed)
            last_feedback = now
    cur.send_feedback(flush_lsn=flushed, force=True)
    conn.close()
    res.data.update(rows=rows, values=values, transactions=txns)
    res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
