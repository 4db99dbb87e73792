"""Dispatchers: one per outbound, claiming committed deliveries and classifying every outcome.

Done -> forget the delivery; retryable -> back off (exponential, full jitter, the peer's Retry-After if
longer) and try again, up to ``max_attempts``; terminal or exhausted -> dead letter with the reason.
A dispatcher has its own workers and queue, so one slow or dead destination never delays another.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import structlog

from mediator.core import deadletter
from mediator.core.deadline import deadline
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.seams import Outbound, OutboundConfigBase
from mediator.observability.metrics import (
    FAILED_ERROR,
    FAILED_RETRYABLE,
    FAILED_TERMINAL,
    FAILED_TIMEOUT,
    Metrics,
)
from mediator.outbox.base import Outbox, Pending, StorageError

log = structlog.get_logger(__name__)

BREAKER_THRESHOLD = 5
"""Consecutive failures that open a destination's circuit breaker."""


class Backlog:
    """Deliveries committed and not yet done or dead-lettered, across every outbound."""

    def __init__(self) -> None:
        self.value = 0
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, n: int) -> None:
        self.value += n
        if self.value:
            self._empty.clear()

    def settle(self) -> None:
        self.value -= 1
        if self.value <= 0:
            self.value = 0
            self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()


class Dispatcher:
    def __init__(
        self,
        name: str,
        outbound: Outbound,
        cfg: OutboundConfigBase,
        outbox: Outbox,
        health: Health,
        backlog: Backlog,
        on_dead: Callable[[Pending, str], Awaitable[None]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self._m = (metrics if metrics is not None else Metrics()).outbound(name)
        self._sending = 0  # deliveries a worker took from the queue and has not settled yet
        self._on_dead = on_dead
        self._outbound = outbound
        self._cfg = cfg
        self._outbox = outbox
        self._health = health
        self._backlog = backlog
        # Unbounded by type, bounded in practice: the pipeline refuses new events past max_pending.
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._timers: dict[int, tuple[asyncio.TimerHandle, Pending]] = {}
        self._failures = 0
        self._open_until = 0.0
        self._log = log.bind(outbound=name)
        # The overload manager's broker monitor (mediator/overload.py): when this dispatcher last made
        # progress (a confirmed delivery, or work arriving while it held none), and whether it runs at all
        # (a parked one, whose outbound a reload removed, is not a broker pushing back).
        self._progress = time.monotonic()
        self._running = False

    def submit(self, delivery: Pending) -> None:
        if not self.backlog:
            self._progress = time.monotonic()
        self._queue.put_nowait(delivery)

    @property
    def stalled_s(self) -> float:
        """How long this running dispatcher has held deliveries without one confirmed (0: it holds none):
        a broker that blocks publishers (RabbitMQ's connection.blocked), stops confirming, or is down."""
        if not self._running or not self.backlog:
            return 0.0
        return time.monotonic() - self._progress

    @property
    def backlog(self) -> int:
        """Deliveries held: queued, being sent, or waiting for their retry."""
        return self._queue.qsize() + self._sending + len(self._timers)

    @property
    def breaker_open(self) -> bool:
        return self._open_until > time.monotonic()

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def replace(self, outbound: Outbound, cfg: OutboundConfigBase) -> None:
        """Send through ``outbound`` from the next ``run`` on (a reload rebuilt it); the queue stays."""
        self._outbound = outbound
        self._cfg = cfg

    def take_all(self) -> list[Pending]:
        """Every delivery this (stopped) dispatcher holds, queued or waiting for a retry; it holds none after."""
        taken = [delivery for _, delivery in self._timers.values()]
        for timer, _ in self._timers.values():
            timer.cancel()
        self._timers.clear()
        while not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return taken

    async def run(self) -> None:
        """Run the workers until cancelled. Cancellation leaves unfinished deliveries in the outbox, and
        queued here: a send cut short and a delivery waiting for its retry are queued again, so that a
        reload that stops a dispatcher (its outbound changed or went) and runs it again loses none."""
        self._sending = 0  # a worker cancelled in the middle of settling did not count down
        self._running = True
        self._progress = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(self._outbound.max_in_flight):
                    tg.create_task(self._worker(), name=f"dispatch:{self.name}:{i}")
        finally:
            self._running = False
            for timer, delivery in self._timers.values():
                timer.cancel()
                self._queue.put_nowait(delivery)
            self._timers.clear()

    async def _worker(self) -> None:
        component = f"outbound:{self.name}"
        timeout_s = self._cfg.send_timeout_s + 1.0  # the outbound bounds itself; this is the safety net
        while True:
            delivery = await self._queue.get()
            self._sending += 1
            try:
                # Waiting for the connection (or an open breaker) does not spend the delivery's attempts.
                if not self._health.is_ready(component):
                    await self._health.wait_ready(component)
                wait = self._open_until - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                with deadline(timeout_s):
                    await self._outbound.send(delivery.event, delivery.address, delivery.format)
            except asyncio.CancelledError:
                self._sending -= 1
                self._queue.put_nowait(delivery)  # stopped (see run): the delivery waits for the next run
                raise
            except TerminalDeliveryError as exc:
                delivery.attempts += 1  # this send was an attempt too: the dead letter counts what was tried
                self._m.failed[FAILED_TERMINAL].inc()
                await self._dead(delivery, str(exc))
            except RetryableDeliveryError as exc:
                await self._retry(delivery, str(exc), exc.retry_after_s)
            except TimeoutError:
                await self._retry(delivery, f"no confirmation within {timeout_s:.1f} s", None, FAILED_TIMEOUT)
            except Exception as exc:  # an adapter bug must not kill the worker or lose the delivery
                self._log.exception("delivery.crashed", event_id=delivery.event.id, route=delivery.route)
                await self._retry(delivery, f"{type(exc).__name__}: {exc}", None, FAILED_ERROR)
            else:
                self._failures = 0
                self._progress = time.monotonic()
                self._outbox.done(delivery)
                self._backlog.settle()
                received = delivery.event.provenance.received
                self._m.delivered(received.seconds + received.nanos * 1e-9)
                self._log.debug("delivery.done", event_id=delivery.event.id, route=delivery.route)
            self._sending -= 1

    async def _retry(
        self, delivery: Pending, reason: str, retry_after_s: float | None, kind: str = FAILED_RETRYABLE
    ) -> None:
        delivery.attempts += 1
        self._m.failed[kind].inc()
        policy = self._cfg.retry
        if delivery.attempts >= policy.max_attempts:
            await self._dead(delivery, f"{deadletter.EXHAUSTED_PREFIX}{delivery.attempts} attempts: {reason}")
            return
        self._m.retried[kind].inc()
        self._failures += 1
        cap = min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** (delivery.attempts - 1))
        delay = random.uniform(cap / 2, cap)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, policy.backoff_max_s))
        if self._failures >= BREAKER_THRESHOLD:
            self._open_until = max(self._open_until, time.monotonic() + delay)
        self._outbox.failed(delivery)
        self._log.warning(
            "delivery.retried",
            event_id=delivery.event.id,
            route=delivery.route,
            attempt=delivery.attempts,
            delay_s=round(delay, 3),
            reason=reason,
        )
        self._later(delivery, delay)

    def _later(self, delivery: Pending, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[delivery.id] = (loop.call_later(delay, self._requeue, delivery), delivery)

    def _requeue(self, delivery: Pending) -> None:
        self._timers.pop(delivery.id, None)
        self._queue.put_nowait(delivery)

    async def _dead(self, delivery: Pending, reason: str) -> None:
        try:
            await self._outbox.dead_letter(delivery, reason)
        except StorageError as exc:
            # Not recorded anywhere yet: keep the delivery and try to bury it again later.
            self._log.error("delivery.dead_letter_failed", event_id=delivery.event.id, error=str(exc))
            self._later(delivery, self._cfg.retry.backoff_max_s)
            return
        self._backlog.settle()
        self._m.dead[deadletter.classify(reason, self.name)].inc()
        self._log.error(
            "delivery.dead_lettered",
            event_id=delivery.event.id,
            route=delivery.route,
            address=delivery.address,
            attempts=delivery.attempts,
            reason=reason,
        )
        if self._on_dead is not None:
            await self._on_dead(delivery, reason)
