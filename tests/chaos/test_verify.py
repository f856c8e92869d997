"""The checker of the chaos suite, on hand-made logs: each kind of breakage is caught.

No server needed; this guards against a checker that passes everything.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from harness import Incarnation, verify

pytestmark = pytest.mark.chaos

TRUTH: dict[int, list[Any]] = {
    1: [["insert", "items", 100, 1, "h1"], ["insert", "txns", 1, None, None]],
    2: [["update", "items", 100, 2, "h1"], ["insert", "items", 101, 3, None],
        ["insert", "txns", 2, None, None]],
    3: [["truncate", "items", None, None, None], ["insert", "txns", 3, None, None]],
    4: [["insert", "items", 100, 4, "h4"], ["delete", "items", 101, 3, None],
        ["insert", "txns", 4, None, None]],
}
END = {1: 0x100, 2: 0x200, 3: 0x300, 4: 0x400}
ORDER = [1, 2, 3, 4]


class Log:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.calls: dict[int, int] = {}

    def deliver(self, pid: int, txn: int, ops: list[Any] | None = None, end: int | None = None) -> Log:
        call = self.calls[pid] = self.calls.get(pid, 0) + 1
        end = END[txn] if end is None else end
        for pos, (kind, table, pk, seq, vhash) in enumerate(ops or TRUTH[txn]):
            self.rows.append({
                "rowid": len(self.rows) + 1, "call": call, "pid": pid,
                "id": f"{end:016X}-{pos:08X}", "end_lsn": end, "pos": pos, "lsn": "0/0",
                "tbl": table, "type": kind, "pk": pk, "seq": seq, "vhash": vhash, "at": 0.0,
            })
        return self


def inc(pid: int, start: int | None, overlapped: bool = False) -> Incarnation:
    return Incarnation(SimpleNamespace(pid=pid), start, 0.0, overlapped=overlapped)  # type: ignore[arg-type]


def check(log: Log, incs: list[Incarnation], samples: list[Any] | None = None,
          truth: dict[int, list[Any]] = TRUTH, aborted: list[int] = []) -> list[str]:
    return verify(log.rows, truth, ORDER, aborted, incs, samples or [])["violations"]


def test_a_clean_run_with_a_correct_redelivery_passes() -> None:
    log = Log().deliver(1, 1).deliver(1, 2).deliver(1, 3)
    log.deliver(2, 2).deliver(2, 3).deliver(2, 4)  # restarted at 0x100: 2 and 3 again
    samples = [(0.0, 0x100, 2, None), (0.0, 0x300, 7, None), (0.0, 0x400, len(log.rows), None)]
    report = verify(log.rows, TRUTH, ORDER, [], [inc(1, None), inc(2, 0x100)], samples)
    assert report["violations"] == []
    assert report["duplicates"] == 5 and report["lost"] == 0


def test_lost_transaction() -> None:
    log = Log().deliver(1, 1).deliver(1, 2).deliver(1, 4)
    assert any("never delivered" in v for v in check(log, [inc(1, None)]))


def test_partial_transaction() -> None:
    log = Log().deliver(1, 1).deliver(1, 2, TRUTH[2][1:]).deliver(1, 3).deliver(1, 4)
    assert any("delivered as" in v for v in check(log, [inc(1, None)]))


def test_wrong_payload_or_unfilled_toast() -> None:
    ops = [list(op) for op in TRUTH[2]]
    ops[0][4] = "UNCHANGED_TOAST"
    log = Log().deliver(1, 1).deliver(1, 2, ops).deliver(1, 3).deliver(1, 4)
    assert any("delivered as" in v for v in check(log, [inc(1, None)]))


def test_duplicate_within_one_process() -> None:
    log = Log().deliver(1, 1).deliver(1, 2).deliver(1, 2).deliver(1, 3).deliver(1, 4)
    assert any("twice in one process" in v for v in check(log, [inc(1, None)]))


def test_acknowledged_transaction_delivered_again() -> None:
    log = Log().deliver(1, 1).deliver(1, 2).deliver(2, 2).deliver(2, 3).deliver(2, 4)
    assert check(log, [inc(1, None), inc(2, 0x200)])  # 2 ended at 0x200: acknowledged


def test_unacknowledged_transaction_not_delivered_again() -> None:
    log = Log().deliver(1, 1).deliver(1, 2).deliver(2, 3).deliver(2, 4)
    assert check(log, [inc(1, None), inc(2, 0x100)])  # 2 was above 0x100: must come again


def test_redelivered_with_other_ids() -> None:
    log = Log().deliver(1, 1).deliver(1, 2).deliver(2, 2, end=0x210).deliver(2, 3).deliver(2, 4)
    assert any("end LSN" in v for v in check(log, [inc(1, None), inc(2, 0x100)]))


def test_early_acknowledgement() -> None:
    log = Log().deliver(1, 1).deliver(1, 2).deliver(1, 3).deliver(1, 4)
    early = [(0.0, 0x200, 2, None)]  # 0x200 acknowledged, but only transaction 1 was logged
    assert any("early acknowledgement" in v for v in check(log, [inc(1, None)], early))
    idle = [(0.0, 0x1F0, 2, None)]  # past the log's last end LSN, before the next commit: fine
    assert check(log, [inc(1, None)], idle) == []


def test_rolled_back_work_delivered() -> None:
    poison = [["insert", "items", 1000, -1, None]] + TRUTH[3]
    log = Log().deliver(1, 1).deliver(1, 2).deliver(1, 3, poison).deliver(1, 4)
    assert any("rolled-back savepoint" in v for v in check(log, [inc(1, None)]))
    truth = dict(TRUTH)
    del truth[3]
    log = Log().deliver(1, 1).deliver(1, 2).deliver(1, 3).deliver(1, 4)
    assert any("never committed" in v for v in check(log, [inc(1, None)], truth=truth, aborted=[3]))


def test_out_of_commit_order() -> None:
    log = Log().deliver(1, 1).deliver(1, 3).deliver(1, 2).deliver(1, 4)
    assert any("commit order" in v for v in check(log, [inc(1, None)]))


def test_seq_going_backwards_for_a_pk() -> None:
    truth = dict(TRUTH)
    truth[4] = [["update", "items", 100, 1, "h4"], ["insert", "txns", 4, None, None]]
    log = Log().deliver(1, 1).deliver(1, 2).deliver(1, 3).deliver(1, 4, truth[4])
    assert any("pk 100" in v for v in check(log, [inc(1, None)], truth=truth))


def test_overlapping_consumer_must_not_leave_a_gap() -> None:
    log = Log().deliver(1, 1).deliver(2, 2).deliver(2, 3).deliver(2, 4)
    assert check(log, [inc(1, None), inc(2, None, overlapped=True)]) == []
    log = Log().deliver(1, 1).deliver(2, 3).deliver(2, 4)
    assert check(log, [inc(1, None), inc(2, None, overlapped=True)])
