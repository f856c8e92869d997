"""Level ``pgoutput-decoder``: the PyPI package pgoutput-decoder (Rust, pyo3 + tokio), as its README shows.

Runs in ``bench/.venv-peers`` (only cp312 abi3 wheels exist). ``async for``
over ``LogicalReplicationReader`` with its default ``auto_acknowledge=True``;
every message is a Debezium-style ``ReplicationMessage`` whose ``before`` /
``after`` are dicts. The loop touches every value and stops at the marker row.
"""

from __future__ import annotations

import asyncio
import sys

from _common import Result, parse_args, touch_mapping

import pgoutput_decoder


def conninfo(dsn: str) -> dict[str, str]:
    """``key=value`` pairs of a simple libpq connection string (no quoting)."""
    return dict(part.split("=", 1) for part in dsn.split())


async def run(args, res: Result) -> None:
    info = conninfo(args.dsn)
    reader = pgoutput_decoder.LogicalReplicationReader(
        publication_name=args.publication, slot_name=args.slot,
        host=info.get("host", "127.0.0.1"), database=info.get("dbname", "postgres"),
        port=int(info.get("port", "5432")), user=info.get("user", "postgres"),
        password=info.get("password", ""),
    )
    res.ready()
    rows = values = 0
    async for msg in reader:
        source = msg.source
        if source.get("table") == args.marker_table:
            res.data["marker_seen"] = True
            res.end()
            break
        if rows == 0:
            res.first_row()
        rows += 1
        _ = (msg.op, msg.ts_ms, source.get("lsn"), source.get("schema"))
        values += touch_mapping(msg.after) + touch_mapping(msg.before)
    await reader.stop()
    res.data.update(rows=rows, values=values)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    res = Result("pgoutput-decoder", args)
    asyncio.run(run(args, res))
    res.write()
    return 0 if res.data["marker_seen"] else 1


if __name__ == "__main__":
    sys.exit(main())
