"""The Sink every inbound hands events to: ingress checks, routing, commit, hand-off to dispatchers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import structlog

from mediator.core import deadletter
from mediator.core.envelope import Envelope
from mediator.core.errors import (
    NotReady,
    Overloaded,
    Rejected,
    RequestTimeout,
    RequestUndeliverable,
    RetryableDeliveryError,
    TerminalDeliveryError,
)
from mediator.core.ingress import Batch, Origin, Principal, Stage
from mediator.core.patterns import TemplateError
from mediator.core.router import Delivery, DestinationSpec, Router
from mediator.core.seams import Reply, RequestOutbound
from mediator.core.tap import Passed, Tap
from mediator.correlator import Correlator, new_id
from mediator.dispatch import Backlog, Dispatcher
from mediator.observability.metrics import DEFERRED_OVERLOADED, DEFERRED_UNAVAILABLE, Metrics
from mediator.outbox.base import Accepted, Outbox, Pending, StorageError
from mediator.overload import Overload
from mediator.stages.authn import Authenticate

log = structlog.get_logger(__name__)

FORWARD_ROUTE = "dead-letter"
"""The route name of forwarded dead letters (reserved: a route cannot be named so)."""


class Pipeline:
    def __init__(
        self,
        router: Router,
        outbox: Outbox,
        dispatchers: Mapping[str, Dispatcher],
        backlog: Backlog,
        *,
        max_pending: int,
        dedup: bool = True,
        stages: Sequence[Stage] = (),
        authenticate: Authenticate | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._dedup = dedup
        self.metrics = metrics if metrics is not None else Metrics()
        # Swapped whole on a config reload, like the router; a call reads each once.
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.authenticator = authenticate if authenticate is not None else Authenticate({})
        outbox.on_commit = self.dispatch
        self.router = router  # swapped whole on a config reload; routing reads it once per event
        self.dead_letter_destination: DestinationSpec | None = None
        self._outbox = outbox
        self._dispatchers = dispatchers
        self._backlog = backlog
        self._max_pending = max_pending
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Request-reply: the waiter table and the outbounds that can carry requests (by name; the daemon
        # keeps it current as units come and go).
        self.correlator = Correlator()
        self.tap = Tap()
        self.requesters: dict[str, RequestOutbound] = {}
        # Shedding by priority (mediator/overload.py); None: only max_pending refuses.
        self.overload: Overload | None = None

    async def authenticate(self, origin: Origin) -> Principal:
        try:
            return await self.authenticator.authenticate(origin)
        except Rejected as exc:
            _log_refusal(exc, origin, None)
            if not origin.inbound.startswith("listener:"):  # an admin request (it names the listener) is no event
                m = self.metrics.inbound(origin.inbound)
                m.received.inc()  # refused before its events were read: one
                m.refused[exc.code.value].inc()
            raise

    def refused(self, origin: Origin, exc: Rejected) -> None:
        """An inbound refused a message before handing it over (too large, a media type it does not take,
        bytes that do not decode): logged and counted like a stage's refusal."""
        _log_refusal(exc, origin, None)
        m = self.metrics.inbound(origin.inbound)
        m.received.inc()
        m.refused[exc.code.value].inc()

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> set[str]:
        if origin is None:
            # No Origin: nothing was presented, so the inbound's policy sees an anonymous caller.
            inbound = events[0].provenance.inbound if events else ""
            origin = Origin(inbound=inbound, protocol=events[0].provenance.protocol if events else "")
        m = self.metrics.inbound(origin.inbound)
        if self.draining:
            m.deferred[DEFERRED_UNAVAILABLE].inc(len(events))
            raise NotReady("shutting down", retry_after_s=5.0)
        if self._backlog.value >= self._max_pending:
            m.deferred[DEFERRED_OVERLOADED].inc(len(events))
            raise Overloaded(f"outbox holds {self._backlog.value} undelivered events", retry_after_s=2.0)
        overload = self.overload
        if overload is not None and not origin.trusted:
            shed = overload.refusal(origin.inbound)
            if shed is not None:
                m.deferred[DEFERRED_OVERLOADED].inc(len(events))
                raise shed
        batch = Batch(origin, list(events))
        try:
            # The gateway's own events (aggregation composites) were made from events that passed already.
            for stage in () if origin.trusted else self.stages:
                await stage.run(batch)
        except Rejected as exc:
            _log_refusal(exc, origin, batch)
            if len(events) == 1:
                m.received.inc()
                m.refused[exc.code.value].inc()
            else:  # the inbound may settle each event on its own next (the Stage contract): counted then
                m.refused_batches[exc.code.value].inc()
            raise
        received = len(events)
        events = batch.events
        router = self.router
        items = []
        data = batch.data.get  # a route's `when` and a destination's transform share each event's parse
        for env in events:
            deliveries, failures = router.route(env, data, _log_predicate)
            # CloudEvents: source + id identify an event; a repeat within the window is committed once.
            # An id the gateway made up cannot be repeated by anyone: it is not recorded.
            key = f"{env.source}\x00{env.id}" if self._dedup and not env.provenance.id_minted else None
            if deliveries or failures:
                items.append(Accepted(env, deliveries, failures, dedup_key=key))
                for fail in failures:
                    kind = deadletter.classify(fail.reason, fail.outbound)
                    what = "transform.failed" if kind == deadletter.TRANSFORM_FAILED else "route.unrenderable"
                    log.warning(what, event_id=env.id, route=fail.route, outbound=fail.outbound, reason=fail.reason)
            else:
                items.append(Accepted(env, (), (), dead_reason=deadletter.UNMATCHED_REASON, dedup_key=key))
                log.warning("route.unmatched", event_id=env.id, type=env.type, inbound=env.provenance.inbound)
        for env, reason in batch.dead_letters:
            log.error("envelope.dead_lettered", event_id=env.id, inbound=env.provenance.inbound, reason=reason)
            items.append(Accepted(env, (), (), dead_reason=reason))
        # Once the commit is under way it completes and its deliveries are dispatched (by the outbox's
        # on_commit hook) even if the caller is cancelled; the caller then does not acknowledge, the sender
        # retries, and the deduplication window absorbs the repeat.
        duplicates: list[int] = []  # positions in ``items`` the dedup window skipped
        if items:  # a stage may have taken every event (an aggregation stored them itself)
            try:
                await self._commit(items, duplicates)
            except NotReady:
                m.deferred[DEFERRED_UNAVAILABLE].inc(received)
                raise
        m.received.inc(received)
        if duplicates:
            m.duplicates.inc(len(duplicates))
        m.accepted.inc(received - len(duplicates))
        self.metrics.committed(items, duplicates, m)
        if self.tap.active:  # someone watches the live tail (mediator/tap.py): otherwise this is all it costs
            self._show(items, duplicates)
        if self.dead_letter_destination is not None:
            for item in items:
                if item.dead_reason is not None:
                    await self.forward_dead(item.event, item.dead_reason)
                for fail in item.failures:
                    await self.forward_dead(item.event, fail.reason, fail.route, fail.outbound)
        return {items[i].event.id for i in duplicates}

    def _show(self, items: list[Accepted], duplicates: list[int]) -> None:
        dup = set(duplicates)
        self.tap.offer(
            [
                Passed(
                    item.event,
                    tuple(dict.fromkeys(d.route for d in item.deliveries)),
                    tuple(dict.fromkeys(d.outbound for d in item.deliveries)),
                    i in dup,
                    item.dead_reason,
                )
                for i, item in enumerate(items)
            ]
        )

    async def request(self, event: Envelope, origin: Origin, timeout_s: float) -> Reply:
        """``Requests.request``: the same stages as ``accept``, then one request-capable destination, with no
        outbox commit. Why not through the outbox: a request is worth something only while its caller
        waits, so a retry after a crash or an outage (what the outbox is for) would act on an expired
        request; the broker's own expiry (AMQP ``expiration``, MQTT Message Expiry Interval, both set to
        the timeout) is what guarantees that a request nobody took in time is never acted on later. A
        failed publish is answered at once (502/503) and the caller decides whether to retry."""
        correlator = self.correlator
        if self.draining:
            raise NotReady("shutting down", retry_after_s=5.0)
        batch = Batch(origin, [event])
        m = self.metrics.inbound(origin.inbound)
        try:
            for stage in () if origin.trusted else self.stages:
                await stage.run(batch)
        except Rejected as exc:
            _log_refusal(exc, origin, batch)
            m.received.inc()
            m.refused[exc.code.value].inc()
            correlator.finished("refused")
            raise
        m.received.inc()
        try:
            if len(batch.events) != 1 or batch.dead_letters:
                raise RequestUndeliverable(
                    f"a request must stay one event through the ingress stages; it became {len(batch.events)}"
                )
            env = batch.events[0]
            deliveries, failures = self.router.route(env, batch.data.get, _log_predicate)
            if failures:
                raise RequestUndeliverable(f"route {failures[0].route!r}: {failures[0].reason}")
            if len(deliveries) != 1:
                routes = sorted({d.route for d in deliveries})
                raise RequestUndeliverable(
                    f"a request needs exactly one destination; it matched {len(deliveries)}"
                    + (f" (routes {', '.join(routes)})" if routes else " (no route matched)")
                )
            delivery = deliveries[0]
            outbound = self.requesters.get(delivery.outbound)
            refusal = (
                "not an outbound that carries requests (AMQP and MQTT 5 outbounds do)"
                if outbound is None
                else outbound.request_refusal()
            )
            if outbound is None or refusal is not None:
                raise RequestUndeliverable(f"outbound {delivery.outbound!r}: {refusal}")
        except RequestUndeliverable as exc:
            correlator.finished("undeliverable")
            log.warning("request.undeliverable", event_id=event.id, inbound=origin.inbound, reason=exc.reason)
            raise
        correlation_id = new_id()
        with correlator.waiting(correlation_id) as reply:
            try:
                async with asyncio.timeout(timeout_s):
                    await outbound.send_request(
                        delivery.event or env, delivery.address, delivery.format, correlation_id, timeout_s
                    )
                    answer = await reply
            except TimeoutError:
                correlator.finished("timeout")
                log.info(
                    "request.timed_out",
                    event_id=env.id,
                    correlation_id=correlation_id,
                    route=delivery.route,
                    outbound=delivery.outbound,
                    timeout_s=timeout_s,
                )
                raise RequestTimeout(f"no reply within {timeout_s:g} s") from None
            except (RetryableDeliveryError, TerminalDeliveryError) as exc:
                correlator.finished("undeliverable")
                log.warning("request.undeliverable", event_id=env.id, outbound=delivery.outbound, reason=str(exc))
                retryable = isinstance(exc, RetryableDeliveryError)
                raise RequestUndeliverable(str(exc), retryable=retryable) from exc
        correlator.finished("error_reply" if answer.error else "replied")
        log.debug(
            "request.replied",
            event_id=env.id,
            correlation_id=correlation_id,
            route=delivery.route,
            error=answer.error,
            size=len(answer.body),
        )
        return answer

    async def dead_letter(self, event: Envelope, reason: str) -> None:
        log.error("envelope.dead_lettered", event_id=event.id, inbound=event.provenance.inbound, reason=reason)
        await self._commit([Accepted(event, (), (), dead_reason=reason)])
        self.metrics.dead_letter("", reason)
        await self.forward_dead(event, reason)

    async def forward_dead(
        self, event: Envelope, reason: str, route: str = "", outbound: str = "", attempts: int = 0
    ) -> None:
        """Send a copy of a dead-lettered event to the configured dead-letter destination, if any.

        The copy carries why it died as extension attributes (``deadletterreason``, ``deadletterroute``,
        ``deadletteroutbound``, ``deadletterattempts``), so the address template can use them. A copy that
        itself fails is dead-lettered but never forwarded again. Never raises: the dead letter is already
        stored; a failure here is logged.
        """
        dest = self.dead_letter_destination
        if dest is None or route == FORWARD_ROUTE:
            return
        copy = Envelope()
        copy.CopyFrom(event)
        for name, value in (
            ("deadletterreason", reason),
            ("deadletterroute", route),
            ("deadletteroutbound", outbound),
            ("deadletterattempts", str(attempts)),
        ):
            copy.attributes[name].ce_string = value
        try:
            address = dest.address.render(copy)
            await self._commit(
                [Accepted(copy, [Delivery(FORWARD_ROUTE, dest.outbound, address, dest.format)], stored=False)]
            )
        except (TemplateError, NotReady) as exc:
            log.error("dead_letter.forward_failed", event_id=event.id, reason=str(exc))

    async def _commit(self, items: list[Accepted], duplicates: list[int] | None = None) -> None:
        self._in_flight += 1
        self._idle.clear()
        started = time.perf_counter()
        try:
            await self._outbox.commit(items, duplicates)
            self.metrics.commit_took(time.perf_counter() - started)
        except StorageError as exc:
            raise NotReady(str(exc), retry_after_s=5.0) from exc
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    def dispatch(self, pending: list[Pending]) -> None:
        """The outbox's on_commit hook: hand committed deliveries to their dispatchers."""
        self._backlog.add(len(pending))
        dispatchers = self._dispatchers
        for p in pending:
            dispatchers[p.outbound].submit(p)

    async def close(self) -> None:
        await self.authenticator.close()

    async def wait_idle(self) -> None:
        """Return when no commit is in progress."""
        await self._idle.wait()


class _RefusalLog:
    """Every refusal is logged, with who, where, which rule and why (never the credential: no reason holds
    one); a caller refused again and again for the same reason is logged once a second with the count of
    the refusals in between, so a flood of 429s cannot flood the log."""

    INTERVAL_S = 1.0

    def __init__(self) -> None:
        self._last: dict[tuple[str, str, str, str | None], tuple[float, int]] = {}

    def __call__(self, exc: Rejected, origin: Origin, batch: Batch | None) -> None:
        principal = origin.principal
        if batch is not None and batch.principals and len({p.id for p in batch.principals}) == 1:
            principal = batch.principals[0]
        who = principal.id if principal is not None and principal.id else None
        key = (exc.code.value, origin.inbound, who or origin.peer, exc.rule)
        now = time.monotonic()
        last, suppressed = self._last.get(key, (0.0, 0))
        if now - last < self.INTERVAL_S:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = (now, 0)
        log.info(
            "envelope.refused",
            code=exc.code.value,
            inbound=origin.inbound,
            protocol=origin.protocol,
            principal=who,
            peer=origin.peer or None,
            rule=exc.rule,
            reason=exc.reason,
            events=len(batch.events) if batch is not None else None,
            event_id=batch.events[0].id if batch is not None and len(batch.events) == 1 else None,
            suppressed=suppressed or None,
        )


_log_refusal = _RefusalLog()


class _PredicateLog:
    """A route's ``when`` that could not be evaluated for an event (a missing field, mismatched types)
    counts as no match; each is counted per route, and logged at most once a second per route, with the
    failures in between counted (``suppressed``) and the route's total (``failures``)."""

    INTERVAL_S = 1.0

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, route: str, env: Envelope, reason: str) -> None:
        total = self.counts[route] = self.counts.get(route, 0) + 1
        now = time.monotonic()
        last, suppressed = self._last.get(route, (0.0, 0))
        if now - last < self.INTERVAL_S:
            self._last[route] = (last, suppressed + 1)
            return
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[route] = (now, 0)
        log.info(
            "route.predicate_failed",
            route=route,
            event_id=env.id,
            reason=reason,
            failures=total,
            suppressed=suppressed or None,
        )


_log_predicate = _PredicateLog()
