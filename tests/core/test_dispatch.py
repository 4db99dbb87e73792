"""Dispatchers and the pipeline over the in-memory outbox, with outbounds that fail on command."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest

from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import NotReady, RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.patterns import Template
from mediator.core.router import DestinationSpec, Router, RouteSpec
from mediator.core.seams import OutboundConfigBase, RetryConfig
from mediator.dispatch import Backlog, Dispatcher
from mediator.observability.metrics import Metrics
from mediator.outbox import MemoryOutbox, Pending, StorageError
from mediator.outbox.base import Accepted
from mediator.pipeline import Pipeline

FAST = RetryConfig(max_attempts=5, backoff_initial_s=0.001, backoff_max_s=0.01)


class FakeOutbound:
    """An Outbound (our own seam) that raises ``failures`` in turn, then delivers; ``hang`` blocks sends."""

    def __init__(
        self, name: str, failures: Sequence[Exception] = (), *, always: Exception | None = None, max_in_flight: int = 4
    ) -> None:
        self.name = name
        self.max_in_flight = max_in_flight
        self.failures = list(failures)
        self.always = always
        self.hang: asyncio.Event | None = None
        self.calls: list[tuple[str, str, str]] = []
        self.delivered: list[tuple[str, str, str]] = []
        self.entered = asyncio.Event()
        self._changed = asyncio.Event()

    async def send(self, event: Envelope, address: str, format: str) -> None:
        self.calls.append((event.id, address, format))
        self.entered.set()
        if self.hang is not None:
            await self.hang.wait()
        if self.always is not None:
            raise self.always
        if self.failures:
            raise self.failures.pop(0)
        self.delivered.append((event.id, address, format))
        self._changed.set()

    async def wait_delivered(self, count: int, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.delivered) < count:
                self._changed.clear()
                await self._changed.wait()


class RecordingOutbox(MemoryOutbox):
    """The in-memory outbox, recording what the dispatcher told it."""

    def __init__(self, dedup_window_s: float = 0.0) -> None:
        super().__init__(dedup_window_s=dedup_window_s)
        self.done_ids: list[int] = []
        self.failed_attempts: list[int] = []

    def done(self, delivery: Pending) -> None:
        self.done_ids.append(delivery.id)
        super().done(delivery)

    def failed(self, delivery: Pending) -> None:
        self.failed_attempts.append(delivery.attempts)
        super().failed(delivery)


class Harness:
    def __init__(self, pipeline: Pipeline, outbox: RecordingOutbox, backlog: Backlog, health: Health) -> None:
        self.pipeline = pipeline
        self.outbox = outbox
        self.backlog = backlog
        self.health = health

    async def settled(self, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            await self.backlog.wait_empty()


def event(n: int, type: str = "com.example.reading") -> Envelope:
    env = new_event(type=type, source="/s", data=b"{}", id=f"ev-{n}")
    env.provenance.inbound = "edge"
    env.provenance.topic = f"devices/{n}"
    return env


def to_all(outbounds: Sequence[str], types: tuple[str, ...] = ()) -> Router:
    dests = tuple(DestinationSpec(o, Template.compile(f"{o}/{{topic.1}}")) for o in outbounds)
    return Router([RouteSpec("main", dests, types=types)])


@asynccontextmanager
async def running(
    *outbounds: FakeOutbound,
    retry: RetryConfig = FAST,
    max_pending: int = 1000,
    ready: bool = True,
    router: Callable[[Sequence[str]], Router] = to_all,
    dead_letter_to: DestinationSpec | None = None,
    dedup_window_s: float = 0.0,
    metrics: Metrics | None = None,
) -> AsyncIterator[Harness]:
    health = Health()
    backlog = Backlog()
    outbox = RecordingOutbox(dedup_window_s)
    dispatchers = {}
    pipeline: Pipeline | None = None

    async def forward(p: Pending, reason: str) -> None:
        assert pipeline is not None
        await pipeline.forward_dead(p.event, reason, p.route, p.outbound, p.attempts)

    for ob in outbounds:
        health.register(f"outbound:{ob.name}")
        if ready:
            health.set(f"outbound:{ob.name}", True, "connected")
        cfg = OutboundConfigBase(kind="fake", send_timeout_s=30.0, retry=retry)
        dispatchers[ob.name] = Dispatcher(ob.name, ob, cfg, outbox, health, backlog, forward, metrics)
    pipeline = Pipeline(
        router([ob.name for ob in outbounds]), outbox, dispatchers, backlog, max_pending=max_pending, metrics=metrics
    )
    pipeline.dead_letter_destination = dead_letter_to
    tasks = [asyncio.create_task(d.run(), name=f"dispatcher:{n}") for n, d in dispatchers.items()]
    try:
        yield Harness(pipeline, outbox, backlog, health)
    finally:
        for task in tasks:
            task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            assert task.cancelled(), "a dispatcher stopped on its own"


# ---------------------------------------------------------------------------------------------- delivery outcomes
async def test_delivers_every_event_once() -> None:
    out = FakeOutbound("out")
    async with running(out) as h:
        await h.pipeline.accept([event(n) for n in range(50)])
        await h.settled()
        assert sorted(out.delivered) == sorted((f"ev-{n}", f"out/{n}", "binary") for n in range(50))
        assert len(h.outbox.done_ids) == len(set(h.outbox.done_ids)) == 50
        assert await h.outbox.dead_letters() == []
        assert h.outbox._pending == {}


async def test_retryable_failures_then_success_delivers_once() -> None:
    out = FakeOutbound("out", [RetryableDeliveryError("503"), RetryableDeliveryError("timeout"), RuntimeError("bug")])
    async with running(out) as h:
        await h.pipeline.accept([event(1)])
        await h.settled()
        assert out.calls == [("ev-1", "out/1", "binary")] * 4
        assert out.delivered == [("ev-1", "out/1", "binary")]
        assert h.outbox.failed_attempts == [1, 2, 3]  # an adapter bug counts as a retryable failure
        assert len(h.outbox.done_ids) == 1
        assert await h.outbox.dead_letters() == []


async def test_always_failing_is_dead_lettered_after_max_attempts() -> None:
    out = FakeOutbound("out", always=RetryableDeliveryError("connection refused"))
    async with running(out, retry=RetryConfig(max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.01)) as h:
        await h.pipeline.accept([event(1)])
        await h.settled()
        assert len(out.calls) == 3
        assert out.delivered == []
        [dead] = await h.outbox.dead_letters()
        assert (dead.event.id, dead.outbound, dead.address, dead.attempts) == ("ev-1", "out", "out/1", 3)
        assert dead.reason == "gave up after 3 attempts: connection refused"
        assert h.outbox.done_ids == []
        assert h.outbox._pending == {}


async def test_terminal_failure_is_dead_lettered_at_once() -> None:
    out = FakeOutbound("out", [TerminalDeliveryError("no such queue")])
    async with running(out) as h:
        await h.pipeline.accept([event(1)])
        await h.settled()
        assert len(out.calls) == 1
        [dead] = await h.outbox.dead_letters()
        assert (dead.reason, dead.attempts) == ("no such queue", 1)  # the one send that was tried
        assert h.outbox.failed_attempts == []


async def test_retry_after_hint_is_honoured_up_to_the_cap() -> None:
    out = FakeOutbound("out", [RetryableDeliveryError("429", retry_after_s=30.0)])
    async with running(out) as h:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await h.pipeline.accept([event(1)])
        await h.settled()
        # backoff_max_s (0.01 s) caps the peer's 30 s hint, so the retry is prompt.
        assert loop.time() - start < 2.0
        assert len(out.delivered) == 1


async def test_slow_outbound_does_not_delay_another() -> None:
    slow = FakeOutbound("slow", max_in_flight=1)
    slow.hang = asyncio.Event()
    fast = FakeOutbound("fast")
    async with running(slow, fast) as h:
        await h.pipeline.accept([event(n) for n in range(20)])
        async with asyncio.timeout(5):
            await slow.entered.wait()
        await fast.wait_delivered(20, timeout_s=2.0)
        assert sorted(e for e, _, _ in fast.delivered) == sorted(f"ev-{n}" for n in range(20))
        assert slow.delivered == []
        assert len(slow.calls) == 1  # one send stuck, the rest queued behind it
        assert h.backlog.value == 20  # the slow outbound's deliveries are still owed

        slow.hang.set()
        await h.settled()
        assert len(slow.delivered) == 20


async def test_dispatcher_waits_for_its_outbound_to_be_ready() -> None:
    out = FakeOutbound("out")
    async with running(out, ready=False) as h:
        await h.pipeline.accept([event(1)])
        await asyncio.sleep(0.05)  # a window in which nothing may happen (not a synchronisation)
        assert out.calls == []
        assert h.outbox.failed_attempts == []  # waiting for the connection spends no attempts
        h.health.set("outbound:out", True)
        await h.settled()
        assert out.delivered == [("ev-1", "out/1", "binary")]


# ---------------------------------------------------------------------------------------------- pipeline
async def test_accept_refuses_when_the_backlog_is_full() -> None:
    out = FakeOutbound("out")
    async with running(out, ready=False, max_pending=2) as h:
        await h.pipeline.accept([event(1)])
        await h.pipeline.accept([event(2)])
        assert h.backlog.value == 2
        with pytest.raises(NotReady) as info:
            await h.pipeline.accept([event(3)])
        assert "2 undelivered" in info.value.reason
        assert info.value.retry_after_s > 0
        assert len(h.outbox._pending) == 2  # the refused event was not committed

        h.health.set("outbound:out", True)
        await h.settled()
        await h.pipeline.accept([event(3)])
        await h.settled()
        assert sorted(e for e, _, _ in out.delivered) == ["ev-1", "ev-2", "ev-3"]


async def test_accept_refuses_while_draining() -> None:
    out = FakeOutbound("out")
    async with running(out) as h:
        h.pipeline.draining = True
        with pytest.raises(NotReady, match="shutting down"):
            await h.pipeline.accept([event(1)])
        assert h.outbox._pending == {}
        assert await h.outbox.dead_letters() == []
        assert out.calls == []


async def test_unmatched_events_are_dead_lettered() -> None:
    out = FakeOutbound("out")
    async with running(out, router=lambda names: to_all(names, types=("com.example.*",))) as h:
        await h.pipeline.accept([event(1, type="org.other"), event(2)])
        await h.settled()
        assert out.delivered == [("ev-2", "out/2", "binary")]
        [dead] = await h.outbox.dead_letters()
        assert (dead.event.id, dead.reason, dead.format) == ("ev-1", "no route matched", "")


async def test_unrenderable_destination_is_dead_lettered_and_the_rest_delivered() -> None:
    out = FakeOutbound("out")

    def router(names: Sequence[str]) -> Router:
        dests = (
            DestinationSpec("out", Template.compile("x/{subject}")),
            DestinationSpec("out", Template.compile("y/{topic.1}")),
        )
        return Router([RouteSpec("main", dests)])

    async with running(out, router=router) as h:
        await h.pipeline.accept([event(1)])
        await h.settled()
        assert out.delivered == [("ev-1", "y/1", "binary")]
        [dead] = await h.outbox.dead_letters()
        assert (dead.route, dead.outbound) == ("main", "out")
        assert "subject" in dead.reason


async def test_pipeline_dead_letter_commits_an_undecodable_message() -> None:
    out = FakeOutbound("out")
    async with running(out) as h:
        await h.pipeline.dead_letter(event(1), "not a CloudEvent")
        assert [(d.event.id, d.reason) for d in await h.outbox.dead_letters()] == [("ev-1", "not a CloudEvent")]
        assert out.calls == []
        assert h.backlog.value == 0


async def test_storage_failure_is_not_ready() -> None:
    class BrokenOutbox(RecordingOutbox):
        async def commit(self, items: Sequence[Accepted], duplicates: list[int] | None = None) -> list[Pending]:
            raise StorageError("disk full")

    backlog = Backlog()
    pipeline = Pipeline(to_all(["out"]), BrokenOutbox(), {}, backlog, max_pending=10)
    with pytest.raises(NotReady, match="disk full"):
        await pipeline.accept([event(1)])
    async with asyncio.timeout(1):
        await pipeline.wait_idle()
    assert backlog.value == 0


# ---------------------------------------------------------------------------------------------- dead-letter forwarding
async def test_dead_letters_are_forwarded_with_their_reason() -> None:
    out = FakeOutbound("out", [TerminalDeliveryError("no such queue")])
    dlx = FakeOutbound("dlx")
    only_out = Router([RouteSpec("main", (DestinationSpec("out", Template.compile("out/{topic.1}")),))])
    dlx_spec = DestinationSpec("dlx", Template.compile("dead.{deadletterroute}"), "structured")
    async with running(out, dlx, router=lambda _names: only_out, dead_letter_to=dlx_spec) as h:
        await h.pipeline.accept([event(1)])
        await dlx.wait_delivered(1)
        await h.settled()
        assert dlx.delivered == [("ev-1", "dead.main", "structured")]
        [dead] = await h.outbox.dead_letters()
        assert dead.reason == "no such queue"


async def test_a_failing_forward_is_not_forwarded_again() -> None:
    dlx = FakeOutbound("dlx", always=TerminalDeliveryError("dlx gone"))
    dlx_spec = DestinationSpec("dlx", Template.compile("dead"), "binary")
    async with running(dlx, router=lambda _names: Router([]), dead_letter_to=dlx_spec) as h:
        await h.pipeline.accept([event(1)])  # no route: dead-lettered, and forwarded once
        await h.settled()
        assert len(dlx.calls) == 1
        reasons = sorted(dl.reason for dl in await h.outbox.dead_letters())
        assert reasons == ["dlx gone", "no route matched"]


async def test_only_ids_a_sender_gave_enter_the_dedup_window() -> None:
    """A sender's id repeated within the window is committed once. An id the gateway made up is never
    recorded (nobody can send it again): the same id marked as minted goes through every time."""
    ob = FakeOutbound("out")
    async with running(ob, dedup_window_s=60.0) as h:
        given = event(1)
        await h.pipeline.accept([given])
        await h.pipeline.accept([given])
        minted = event(2)
        minted.provenance.id_minted = True
        await h.pipeline.accept([minted])
        await h.pipeline.accept([minted])
        await h.settled()
    assert sorted(i for i, _, _ in ob.delivered) == ["ev-1", "ev-2", "ev-2"]
