"""The overload manager's levels and admission (mediator/overload.py), on its own seams: a backlog count and
dispatchers that report how long they have stalled. The end-to-end test with a blocked RabbitMQ is
tests/faults/test_shedding.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from mediator.core.errors import Overloaded
from mediator.overload import Overload, OverloadConfig


@dataclass
class FakeDispatcher:
    stalled_s: float = 0.0
    backlog: int = 0


class Held:
    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def make(**cfg: object) -> tuple[Overload, Held, FakeDispatcher]:
    held, dispatcher = Held(), FakeDispatcher()
    o = Overload(OverloadConfig.model_validate(cfg), 100, held, {"out": dispatcher})
    o.priorities = {"c": "critical", "n": "normal", "l": "low"}
    return o, held, dispatcher


def test_outbox_fill_sheds_low_then_normal_never_critical() -> None:
    o, held, _ = make(outbox_low=0.5, outbox_normal=0.8)
    held.value = 49
    assert [o.refusal(i) for i in "cnl"] == [None, None, None]
    held.value = 50
    assert o.refusal("l") is not None
    assert o.refusal("n") is None
    assert o.refusal("c") is None
    held.value = 80
    shed = o.refusal("n")
    assert isinstance(shed, Overloaded)
    assert shed.monitor == "outbox"
    assert "80% full" in shed.reason
    assert o.refusal("c") is None
    assert o.refusal("unknown") is not None  # an inbound without a priority is normal
    assert o.shed == {("l", "low", "outbox"): 1, ("n", "normal", "outbox"): 1, ("unknown", "normal", "outbox"): 1}


def test_loop_lag_and_broker_stall_are_sampled_by_the_tick() -> None:
    o, _, dispatcher = make(loop_lag_low_s=0.2, loop_lag_normal_s=1.0, broker_stall_s=2.0)
    o.lag_s = 0.3
    assert o.refusal("l") is None  # not sampled yet
    o.tick()
    assert o.level == 1
    assert o.refusal("l") is not None
    assert o.refusal("n") is None
    o.lag_s = 1.5
    o.tick()
    assert o.level == 2
    assert o.refusal("n") is not None
    o.lag_s = 0.0
    dispatcher.stalled_s, dispatcher.backlog = 2.5, 7
    o.tick()
    shed = o.refusal("l")
    assert o.level == 1
    assert shed is not None
    assert shed.monitor == "broker"
    assert "outbound 'out'" in shed.reason
    assert "7 deliveries held" in shed.reason
    assert o.refusal("n") is None  # broker_sheds = "low" by default


def test_broker_sheds_normal_when_configured_and_disabled_sheds_nothing() -> None:
    o, _, dispatcher = make(broker_sheds="normal", broker_stall_s=1.0)
    dispatcher.stalled_s, dispatcher.backlog = 1.0, 1
    o.tick()
    assert o.refusal("n") is not None
    off, held, _ = make(enabled=False)
    held.value = 100
    assert off.refusal("l") is None
    assert off.level == 0


async def test_a_paused_inbound_resumes_when_the_level_drops() -> None:
    o, held, _ = make(outbox_low=0.5, loop_interval_s=0.01)
    held.value = 60
    o.tick()
    waiter = asyncio.create_task(o.admitted("l"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert "l" in o.paused
    await asyncio.wait_for(o.admitted("c"), 1)  # critical: never paused
    held.value = 10
    o.tick()
    await asyncio.wait_for(waiter, 2)
    assert o.paused == {}
    assert o.pauses == {("l", "low"): 1}


def test_thresholds_must_shed_low_first() -> None:
    with pytest.raises(ValidationError, match="outbox_low must not exceed outbox_normal"):
        OverloadConfig(outbox_low=0.9, outbox_normal=0.5)
    with pytest.raises(ValidationError, match="loop_lag_low_s must not exceed"):
        OverloadConfig(loop_lag_low_s=2.0, loop_lag_normal_s=1.0)


async def test_the_timer_measures_loop_lag() -> None:
    o, _, _ = make(loop_interval_s=0.01, loop_lag_low_s=0.05)
    task = asyncio.create_task(o.run())
    try:
        await asyncio.sleep(0.03)
        time.sleep(0.1)  # noqa: ASYNC251 (the point: the loop blocked, so the next tick is late)
        await asyncio.sleep(0.03)
        assert 0.05 <= o.max_lag_s < 5, o.max_lag_s
    finally:
        task.cancel()
