"""The bulkhead that confines each dependency of the API (``api/bulkhead.py``)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from api.bulkhead import Bulkhead, BulkheadFull, DeadlineExceeded


def test_results_and_errors_pass_through() -> None:
    bulkhead = Bulkhead("db", limit=2, deadline_s=10)

    def fail() -> None:
        raise ValueError("broken")

    async def scenario() -> int:
        assert await bulkhead.call(sum, [1, 2, 3]) == 6
        with pytest.raises(ValueError, match="broken"):
            await bulkhead.call(fail)
        return bulkhead.running

    assert asyncio.run(scenario()) == 0


def test_a_stuck_call_is_abandoned_at_its_deadline_and_keeps_its_slot() -> None:
    """Past the deadline the caller gets DeadlineExceeded; the stuck thread still counts, so
    with the limit reached the next call is refused at once; once it ends, calls run again."""
    bulkhead = Bulkhead("db", limit=1, deadline_s=0.2)
    release = threading.Event()

    def stuck() -> str:
        release.wait(30)
        raise RuntimeError("late failure, nobody waits for it")

    async def scenario() -> list[str]:
        seen = []
        try:
            await bulkhead.call(stuck)
        except DeadlineExceeded as exc:
            seen.append(f"deadline: {exc.detail}")
        try:
            await bulkhead.call(sum, [1])
        except BulkheadFull as exc:
            seen.append(f"full: {exc.detail}")
        release.set()
        while bulkhead.running:
            await asyncio.sleep(0.01)
        seen.append(f"after: {await bulkhead.call(sum, [1, 1])}")
        return seen

    seen = asyncio.run(scenario())
    assert seen == [
        "deadline: db did not answer within 0.2 s",
        "full: db: 1 calls still running (limit 1)",
        "after: 2",
    ]
    assert (bulkhead.timed_out, bulkhead.refused) == (1, 1)


def test_calls_up_to_the_limit_run_at_once() -> None:
    bulkhead = Bulkhead("db", limit=3, deadline_s=10)
    arrived = threading.Barrier(3, timeout=10)  # broken (an error) unless all 3 run together

    async def scenario() -> list[int]:
        return list(await asyncio.gather(*(bulkhead.call(arrived.wait) for _ in range(3))))

    assert sorted(asyncio.run(scenario())) == [0, 1, 2]


def test_a_bulkhead_needs_a_limit_and_a_deadline() -> None:
    with pytest.raises(ValueError, match="limit"):
        Bulkhead("db", limit=0, deadline_s=1)
