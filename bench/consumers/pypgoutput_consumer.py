"""Level ``pypgoutput``: the PyPI package pypgoutput (psycopg2 + pydantic 1), as its README shows.

Runs in ``bench/.venv-peers`` (it needs ``pydantic<2``). Iterates
``LogicalReplicationReader``; every item is a pydantic ``ChangeEvent`` whose
``before``/``after`` are pydantic models the library typed. The loop touches
every value and stops at the marker row.
"""

from __future__ import annotations

import sys

from _common import Result, parse_args, touch_mapping

import pypgoutput


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    res = Result("pypgoutput", args)
    reader = pypgoutput.LogicalReplicationReader(
        publication_name=args.publication, slot_name=args.slot, dsn=args.dsn,
    )
    res.ready()
    rows = values = 0
    for ev in reader:
        if ev.table_schema.table == args.marker_table:
            res.data["marker_seen"] = True
            res.end()
            break
        if rows == 0:
            res.first_row()
        rows += 1
        _ = (ev.op, ev.lsn, ev.transaction.commit_ts, ev.table_schema.schema_name)
        values += touch_mapping(ev.after) + touch_mapping(ev.before)
    reader.stop()
    res.data.update(rows=rows, values=values)
    res.write()
    return 0 if res.data["marker_seen"] else 1


if __name__ == "__main__":
    sys.exit(main())
