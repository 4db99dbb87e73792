"""The live tail's tap (mediator/core/tap.py) and the rate sampler (mediator/rates.py), without a daemon."""

from __future__ import annotations

import json

import pytest

from mediator.core.envelope import new_event
from mediator.core.tap import MAX_WATCHERS, WATCHER_QUEUE, Passed, TailFilter, Tap, TooManyWatchers
from mediator.rates import Rates


def passed(n: int, type: str = "com.example.order.created", route: str = "orders") -> Passed:
    data = json.dumps({"n": n}).encode()
    return Passed(new_event(type=type, source="/t", data=data, content_type="application/json"), (route,), ("o",))


async def test_the_tap_is_inactive_until_watched_and_after() -> None:
    tap = Tap()
    assert not tap.active  # what the pipeline reads per batch: nothing else runs
    w = tap.watch(TailFilter())
    assert tap.active
    tap.close(w)
    assert not tap.active


async def test_filters_by_type_route_and_cel() -> None:
    tap = Tap()
    w = tap.watch(TailFilter(type="com.example.*", route="orders", when="data.n > 1"))
    tap.offer([passed(1), passed(2), passed(3, route="other"), passed(4, type="org.other"), passed(5)])
    got = await w.next(1.0)
    assert [json.loads(p.event.binary_data)["n"] for p in got] == [2, 5]
    assert await w.next(0.01) == []
    with pytest.raises(ValueError, match="unknown function"):
        tap.watch(TailFilter(when="nope(data)"))


async def test_a_slow_watcher_loses_events_and_is_told() -> None:
    tap = Tap()
    w = tap.watch(TailFilter())
    tap.offer([passed(i) for i in range(WATCHER_QUEUE + 10)])
    assert len(await w.next(1.0)) == WATCHER_QUEUE
    tap.offer([passed(0)])
    [after] = await w.next(1.0)
    assert after.dropped == 10


def test_watchers_are_bounded() -> None:
    tap = Tap()
    for _ in range(MAX_WATCHERS):
        tap.watch(TailFilter())
    with pytest.raises(TooManyWatchers):
        tap.watch(TailFilter())


def test_rates_are_differences_over_time() -> None:
    totals: dict[str, dict[tuple[str, ...], float]] = {
        "events_accepted": {("in",): 0.0},
        "deliveries_sent": {("out",): 0.0},
    }
    rates = Rates(lambda: totals, points=3)
    rates.sample(100.0)
    totals["events_accepted"][("in",)] = 20.0
    rates.sample(102.0)
    totals["deliveries_sent"][("out",)] = 8.0
    rates.sample(104.0)
    snap = rates.snapshot()
    assert snap["series"] == {"inbound:in": [10.0, 0.0], "outbound:out": [0.0, 4.0]}
    assert snap["times"] == [102.0, 104.0]
