"""A worker's concurrency slots (walex.workers.gate): at most ``slots`` holders at once, in
turn, and a cancelled caller neither keeps nor loses a slot."""

from __future__ import annotations

import asyncio

from support import run

from walex.workers.gate import Gate


def test_holders_at_most_slots_in_turn() -> None:
    async def main() -> list[str]:
        gate = Gate(2)
        log: list[str] = []
        inside = 0
        most = 0

        async def call(name: str, hold: float) -> None:
            nonlocal inside, most
            if not gate.enter_now():
                await gate.enter()
            try:
                inside += 1
                most = max(most, inside)
                log.append(name)
                await asyncio.sleep(hold)
            finally:
                inside -= 1
                gate.leave()

        await asyncio.gather(*(call(f"c{i}", 0.01 * (i % 3)) for i in range(8)))
        assert most == 2 and gate.free == 2
        return log

    assert run(main(), timeout=10) == [f"c{i}" for i in range(8)]


def test_a_cancelled_waiter_neither_keeps_nor_loses_a_slot() -> None:
    async def main() -> None:
        gate = Gate(1)
        assert gate.enter_now() and not gate.enter_now()
        # waiting, then cancelled: the slot still goes to the next one
        first = asyncio.ensure_future(gate.enter())
        second = asyncio.ensure_future(gate.enter())
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        gate.leave()
        await asyncio.wait_for(second, 1)
        # handed the slot, cancelled before it resumed: the slot goes on
        third = asyncio.ensure_future(gate.enter())
        fourth = asyncio.ensure_future(gate.enter())
        await asyncio.sleep(0)
        gate.leave()  # to third
        third.cancel()
        await asyncio.gather(third, return_exceptions=True)
        await asyncio.wait_for(fourth, 1)
        gate.leave()
        assert gate.free == 1 and gate.enter_now()

    run(main(), timeout=10)
