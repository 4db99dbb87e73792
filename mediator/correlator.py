"""The correlator of request-reply: a bounded table of requests waiting for their reply, by correlation id.

Protocol-neutral (DESIGN.md section 6): the pipeline registers a waiter (``waiting``) before it publishes a
request, an outbound's reply consumer hands every reply it receives to ``resolve``, and the waiter is taken
out of the table when its request ends however it ends (a reply, the timeout, a cancelled caller), so
nothing outlives its deadline. Replies are matched by correlation id only, never by arrival order; a
correlation id is fresh per request (``new_id``), never the event id a caller may repeat.

A reply nobody waits for is dropped, logged and counted by why: ``late`` (its request timed out or was
abandoned), ``duplicate`` (its request was answered already: a consumer that replied twice, a redelivered
request) or ``unknown`` (an id this daemon did not issue, or one forgotten since). To tell them apart the
correlator remembers the last ``REMEMBERED`` finished ids (a bounded ring), not the requests themselves.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mediator.core.errors import NotReady
from mediator.core.seams import Reply

log = structlog.get_logger(__name__)

MAX_WAITING = 10_000
"""Requests that may wait for a reply at once (per daemon); one more is refused NotReady (503)."""

REMEMBERED = 10_000
"""Finished correlation ids kept to classify a stray reply as late or duplicate."""

OUTCOMES = ("replied", "error_reply", "timeout", "undeliverable", "refused", "overloaded")
DROPPED = ("late", "duplicate", "unknown")

_ANSWERED = "answered"
_EXPIRED = "expired"


def new_id() -> str:
    """A fresh correlation id: 122 random bits, so no caller can guess or repeat another's."""
    return uuid.uuid4().hex


class Correlator:
    """The waiter table. Used from the event loop only."""

    def __init__(self, max_waiting: int = MAX_WAITING, remembered: int = REMEMBERED) -> None:
        self.max_waiting = max_waiting
        self._remembered = remembered
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.dropped: dict[str, int] = dict.fromkeys(DROPPED, 0)

    @property
    def waiting_count(self) -> int:
        """Requests waiting for their reply now (the ``mediator_requests_waiting`` gauge)."""
        return len(self._waiting)

    @contextmanager
    def waiting(self, correlation_id: str) -> Iterator[asyncio.Future[Reply]]:
        """A waiter for ``correlation_id`` for the duration of the ``with`` block: the future resolves with
        the reply. The block owns the deadline (the caller's ``asyncio.timeout``); leaving it, by any way,
        removes the waiter, so a later reply is counted late. Raises NotReady when ``max_waiting``
        requests wait already, ValueError for an id that is waiting already."""
        if len(self._waiting) >= self.max_waiting:
            self.outcomes["overloaded"] += 1
            raise NotReady(f"{len(self._waiting)} requests are waiting for replies (the limit)", retry_after_s=1.0)
        if correlation_id in self._waiting:
            raise ValueError(f"correlation id {correlation_id!r} is waiting already")
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = fut
        try:
            yield fut
        finally:
            if self._waiting.get(correlation_id) is fut:
                del self._waiting[correlation_id]
            # A timeout cancels the future its task awaited: cancelled or never done, it was not answered.
            if fut.cancelled() or not fut.done():
                fut.cancel()
                self._remember(correlation_id, _EXPIRED)

    def resolve(self, correlation_id: str, reply: Reply) -> bool:
        fut = self._waiting.pop(correlation_id, None)
        if fut is None or fut.done():
            why = {_EXPIRED: "late", _ANSWERED: "duplicate"}.get(self._finished.get(correlation_id, ""), "unknown")
            self.dropped[why] += 1
            log.warning(f"reply.{why}", correlation_id=correlation_id[:64], size=len(reply.body))
            return False
        fut.set_result(reply)
        self._remember(correlation_id, _ANSWERED)
        return True

    def finished(self, outcome: str) -> None:
        """Count a request's outcome (one of ``OUTCOMES``)."""
        self.outcomes[outcome] += 1

    def _remember(self, correlation_id: str, state: str) -> None:
        finished = self._finished
        finished[correlation_id] = state
        finished.move_to_end(correlation_id)
        while len(finished) > self._remembered:
            finished.popitem(last=False)


class CorrelatorCollector(Collector):
    """The correlator's metrics at scrape time: the waiters live now, request outcomes, dropped replies."""

    def __init__(self, correlator: Correlator) -> None:
        self._c = correlator

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        c = self._c
        yield GaugeMetricFamily(
            "mediator_requests_waiting", "Requests (request-reply) waiting for their reply now.", c.waiting_count
        )
        requests = CounterMetricFamily(
            "mediator_requests",
            "Requests (request-reply) by outcome: replied, error_reply (the consumer's error: 502), timeout "
            "(504), undeliverable (no request-capable destination or the broker refused: 502/503), refused "
            "(an ingress stage), overloaded (too many waiting: 503).",
            labels=["outcome"],
        )
        for outcome, n in c.outcomes.items():
            requests.add_metric([outcome], n)
        yield requests
        dropped = CounterMetricFamily(
            "mediator_replies_dropped",
            "Replies nobody waited for, dropped: late (after the request's timeout), duplicate (the request "
            "was answered already), unknown (a correlation id this daemon did not issue or has forgotten).",
            labels=["reason"],
        )
        for reason, n in c.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
