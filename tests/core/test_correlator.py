"""The correlator's waiter table (pure logic: no protocol here, the e2e tests cover the brokers)."""

from __future__ import annotations

import asyncio

import pytest

from mediator.core.errors import NotReady
from mediator.core.seams import Reply
from mediator.correlator import Correlator, CorrelatorCollector, new_id

pytestmark = pytest.mark.timeout(10)


async def test_reply_resolves_its_waiter_and_only_its_own() -> None:
    c = Correlator()
    a, b = new_id(), new_id()
    with c.waiting(a) as fa, c.waiting(b) as fb:
        assert c.waiting_count == 2
        assert c.resolve(b, Reply(b"B"))
        assert c.resolve(a, Reply(b"A", "text/plain"))
        assert (await fa, await fb) == (Reply(b"A", "text/plain"), Reply(b"B"))
    assert c.waiting_count == 0
    assert c.dropped == {"late": 0, "duplicate": 0, "unknown": 0}


async def test_timeout_removes_the_waiter_and_a_late_reply_is_dropped() -> None:
    c = Correlator()
    cid = new_id()
    with pytest.raises(TimeoutError), c.waiting(cid) as fut:
        async with asyncio.timeout(0.01):
            await fut
    assert c.waiting_count == 0
    assert not c.resolve(cid, Reply(b"late"))
    assert c.dropped["late"] == 1
    # The next request is not answered by it either.
    nxt = new_id()
    with c.waiting(nxt) as fut:
        assert not fut.done()


async def test_duplicate_and_unknown_replies_are_counted_apart() -> None:
    c = Correlator()
    cid = new_id()
    with c.waiting(cid) as fut:
        assert c.resolve(cid, Reply(b"1"))
        assert not c.resolve(cid, Reply(b"2"))
        assert (await fut).body == b"1"
    assert not c.resolve("never-issued", Reply(b"?"))
    assert c.dropped == {"late": 0, "duplicate": 1, "unknown": 1}


async def test_cancelled_caller_leaves_no_waiter() -> None:
    c = Correlator()
    cid = new_id()
    entered = asyncio.Event()

    async def caller() -> None:
        with c.waiting(cid) as fut:
            entered.set()
            await fut

    task = asyncio.create_task(caller())
    await entered.wait()
    assert c.waiting_count == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c.waiting_count == 0
    assert not c.resolve(cid, Reply(b"x"))
    assert c.dropped["late"] == 1


async def test_table_is_bounded() -> None:
    c = Correlator(max_waiting=2)
    with c.waiting(new_id()), c.waiting(new_id()):
        with pytest.raises(NotReady), c.waiting(new_id()):
            pass
        assert c.outcomes["overloaded"] == 1
    assert c.waiting_count == 0


async def test_finished_ids_are_remembered_within_a_bound() -> None:
    c = Correlator(remembered=3)
    ids = [new_id() for _ in range(5)]
    for cid in ids:
        with c.waiting(cid):
            pass
    assert not c.resolve(ids[0], Reply(b""))  # forgotten: unknown
    assert not c.resolve(ids[-1], Reply(b""))  # remembered: late
    assert c.dropped == {"late": 1, "duplicate": 0, "unknown": 1}


async def test_collector_exposes_the_gauge() -> None:
    c = Correlator()
    with c.waiting(new_id()):
        families = {m.name: m for m in CorrelatorCollector(c).collect()}
        assert families["mediator_requests_waiting"].samples[0].value == 1
    families = {m.name: m for m in CorrelatorCollector(c).collect()}
    assert families["mediator_requests_waiting"].samples[0].value == 0
    assert {s.labels["reason"] for s in families["mediator_replies_dropped"].samples} == {
        "late",
        "duplicate",
        "unknown",
    }
