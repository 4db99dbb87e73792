"""deadline(): the semantics of asyncio.timeout, on the real event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from mediator.core.deadline import _clocks, deadline


async def test_expires_with_timeout_error_at_the_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info, deadline(0.2):
        await asyncio.sleep(5)
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 1.0
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0.01)  # no cancellation left pending for the next await


async def test_a_block_that_finishes_in_time_is_untouched() -> None:
    with deadline(0.05):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # past the deadline: nothing may fire now
    loop = asyncio.get_running_loop()
    assert not _clocks[loop].scopes


async def test_the_timer_moves_earlier_for_a_shorter_scope() -> None:
    async def long() -> str:
        with deadline(30):
            await asyncio.sleep(0.5)
        return "done"

    task = asyncio.create_task(long())
    await asyncio.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(TimeoutError), deadline(0.1):
        await asyncio.sleep(5)
    assert time.monotonic() - start < 0.5
    assert await task == "done"


async def test_each_of_many_scopes_expires_on_its_own() -> None:
    async def one(delay: float, work: float) -> str:
        try:
            with deadline(delay):
                await asyncio.sleep(work)
        except TimeoutError:
            return "timeout"
        return "ok"

    cases = [(0.05 + 0.01 * (i % 10), 0.3 if i % 2 else 0.0) for i in range(200)]
    results = await asyncio.gather(*(one(d, w) for d, w in cases))
    assert results == ["timeout" if w else "ok" for _, w in cases]


async def test_an_outside_cancellation_stays_a_cancellation() -> None:
    entered = asyncio.Event()

    async def body() -> None:
        with deadline(10):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _nested(outer_s: float, inner_s: float) -> list[str]:
    """Which scopes raised TimeoutError, inner first, for an inner scope inside an outer one."""
    seen: list[str] = []
    try:
        with deadline(outer_s):
            try:
                with deadline(inner_s):
                    await asyncio.sleep(5)
            except TimeoutError:
                seen.append("inner")
            await asyncio.sleep(5)
    except TimeoutError:
        seen.append("outer")
    return seen


async def test_nested_scopes_each_own_their_expiry() -> None:
    assert await _nested(outer_s=0.3, inner_s=0.05) == ["inner", "outer"]


async def test_an_outer_scope_expiring_is_not_taken_for_the_inner_ones() -> None:
    assert await _nested(outer_s=0.05, inner_s=10) == ["outer"]


def test_a_scope_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"inside a task|no running event loop"), deadline(1):
        pass


def test_every_loop_has_its_own_clock() -> None:
    async def expire() -> bool:
        try:
            with deadline(0.05):
                await asyncio.sleep(1)
        except TimeoutError:
            return True
        return False

    assert asyncio.run(expire())
    assert asyncio.run(expire())  # a second loop: a timer left on the first must not matter
