"""OpenTelemetry tracing, observed at the seams: ``Sink`` (receive spans) and ``Outbound.send`` (send spans).

Built only when ``[tracing] enabled``: the daemon then wraps its sink and each outbound, so with tracing
off nothing here runs and nothing is imported on the hot path. A reload that turns tracing on, off or
changes it builds a new ``Tracing`` (or none), switches the daemon's sink and rewraps its outbounds, and
closes the old one (``mediator.daemon.Daemon._set_tracing``).

Spans follow the OpenTelemetry messaging conventions, as few and as cheap as they allow:

- **Receive.** One SERVER span per HTTP request or gRPC call (one per committed batch of a PublishStream),
  one CONSUMER span (``process``) per MQTT or AMQP message. Parent: the W3C ``traceparent`` of the hop's
  carrier (``Origin`` for calls, ``provenance`` for broker messages); without one, the event's own
  CloudEvents ``traceparent`` (the trace continues rather than restarts); else a new trace. The span's
  context is stamped into each event's provenance before the commit, so it survives in the outbox.
- **Creation context.** An event without a CloudEvents ``traceparent`` attribute gets the receive span's:
  it was created here. One that has it keeps it unchanged, across every hop (the distributed tracing
  extension carries the trace that started the event; the carriers carry the hop).
- **Send.** One PRODUCER span per delivery attempt (a retry is a new span), child of the receive span and
  linked to the event's creation context when that is in another trace. Its context is what the outbound
  writes into its carrier (``mediator.core.tracecontext.outgoing``), so a consumer's parent is the send
  span. A failed attempt has error status with the reason; a dead letter has a span of its own, error
  status, the reason as description.

Spans are ``mediator.observability.spans`` records (the SDK's sampling decision, ids and OTLP messages,
without its span objects: 39 us each here), exported by a thread of their own over OTLP/HTTP with the
SDK's exporter and a lean encoder (``otlp.py``); ``close`` flushes within the drain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import structlog
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from mediator.core.envelope import Envelope
from mediator.core.errors import ConfigError, NotReady, Rejected
from mediator.core.ingress import Origin, Principal
from mediator.core.seams import Outbound, Sink
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE, reset_outgoing, set_outgoing
from mediator.observability.otlp import LeanOTLPSpanExporter
from mediator.observability.spans import Parent, Recorder, SpanRecord, parse
from mediator.observability.tracing_config import TracingConfig
from mediator.outbox.base import Pending

log = structlog.get_logger(__name__)

# messaging.system: the well-known value where there is one (rabbitmq), the protocol otherwise.
_SYSTEMS = {"amqp": "rabbitmq", "mqtt": "mqtt", "http": "http", "grpc": "grpc"}
_GRPC_SERVICE = "mediator.v1.Mediator"

__all__ = ["SpanTotals", "TracedOutbound", "TracedSink", "Tracing", "parse"]


def _event_context(env: Envelope) -> Parent | None:
    """The creation context the CloudEvents distributed tracing extension holds, if any."""
    attrs = env.attributes
    if TRACEPARENT not in attrs:
        return None
    state = attrs[TRACESTATE].ce_string if TRACESTATE in attrs else ""
    return parse(attrs[TRACEPARENT].ce_string, state)


class Tracing:
    """The span recorder of one daemon, and the wrappers that observe its seams."""

    def __init__(self, cfg: TracingConfig, *, version: str = "") -> None:
        headers, problems = cfg.resolved_headers()
        if problems:
            raise ConfigError("environment", problems)
        self.cfg = cfg
        resource = Resource.create({"service.name": cfg.service_name, "service.version": version})
        scope = InstrumentationScope("mediator", version)
        self.recorder = Recorder(
            cfg.sample_ratio,
            resource=resource,
            scope=scope,
            max_queue_size=cfg.max_queue_size,
            max_export_batch=cfg.max_export_batch,
            schedule_delay_s=cfg.schedule_delay_s,
        )
        self._exporter = LeanOTLPSpanExporter(
            resource, scope, endpoint=cfg.endpoint, headers=headers, timeout=cfg.export_timeout_s
        )
        self.recorder.start_export(self._exporter.export_records)
        log.info("tracing.started", endpoint=cfg.endpoint, sample_ratio=cfg.sample_ratio)

    def sink(self, inner: Sink) -> Sink:
        return TracedSink(inner, self.recorder)

    def outbound(self, inner: Outbound, kind: str) -> Outbound:
        return TracedOutbound(inner, kind, self.recorder)

    def dead_letter_span(self, delivery: Pending, reason: str) -> None:
        """The span of a dispatcher's dead letter: error status, the reason as its description, child of the
        event's receive span."""
        event = delivery.event
        prov = event.provenance
        span = self.recorder.start(
            f"dead_letter {delivery.outbound}",
            SpanKind.INTERNAL,
            parse(prov.traceparent, prov.tracestate),
            {
                "messaging.message.id": event.id,
                "messaging.destination.name": delivery.address,
                "mediator.outbound": delivery.outbound,
                "mediator.route": delivery.route,
                "mediator.delivery.attempts": delivery.attempts,
                "error.type": "dead_letter",
            },
        )
        span.set_error(reason)
        span.end()

    def dead_lettered(
        self, hook: Callable[[Pending, str], Awaitable[None]]
    ) -> Callable[[Pending, str], Awaitable[None]]:
        """``hook`` (the dispatcher's dead-letter callback) preceded by ``dead_letter_span``."""

        async def traced(delivery: Pending, reason: str) -> None:
            self.dead_letter_span(delivery, reason)
            await hook(delivery, reason)

        return traced

    async def close(self, timeout_s: float) -> None:
        """Export what is still queued (within ``timeout_s``), then stop the exporter thread."""
        started = time.monotonic()
        flushed = await asyncio.to_thread(self.recorder.stop, max(0.001, timeout_s))
        await asyncio.to_thread(self._exporter.shutdown)
        r = self.recorder
        log.info(
            "tracing.stopped",
            flushed=flushed,
            exported=r.exported,
            failed=r.failed,
            dropped=r.dropped,
            took_s=round(time.monotonic() - started, 3),
        )


class SpanTotals:
    """The span counts of every recorder one daemon ran (the metrics' ``SpanCounts``): a reload that
    replaces or stops tracing keeps ``mediator_spans_total`` counting on instead of resetting or vanishing.
    One recorder per reload that changed ``[tracing]``, each emptied once stopped."""

    def __init__(self) -> None:
        self.recorders: list[Recorder] = []

    @property
    def exported(self) -> int:
        return sum(r.exported for r in self.recorders)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.recorders)

    @property
    def dropped(self) -> int:
        return sum(r.dropped for r in self.recorders)


class TracedSink:
    """A ``Sink`` that opens the receive span(s) of each call around the inner sink's ``accept``."""

    def __init__(self, inner: Sink, recorder: Recorder) -> None:
        self._inner = inner
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:  # anything else the pipeline offers
        return getattr(self._inner, name)

    async def authenticate(self, origin: Origin) -> Principal:
        return await self._inner.authenticate(origin)

    async def accept(self, events: Sequence[Envelope], origin: Origin) -> Collection[str] | None:
        if not events:
            return await self._inner.accept(events, origin)
        broker = origin.broker
        spans = [self._consumer(env) for env in events] if broker else [self._server(events, origin)]
        # A refused or deferred batch comes back (event by event, or after a pause): what the carrier said
        # must still be there, not this attempt's span.
        saved = [
            (env, env.provenance.traceparent, env.provenance.tracestate, TRACEPARENT in env.attributes)
            for env in events
        ]
        if broker:
            for span, env in zip(spans, events, strict=True):
                _stamp(env, span)
        else:
            for env in events:
                _stamp(env, spans[0])
        try:
            return await self._inner.accept(events, origin)
        except BaseException as exc:
            _restore(saved)
            for span in spans:
                _failed(span, exc, error=broker or not isinstance(exc, Rejected))
            raise
        finally:
            for span in spans:
                span.end()

    async def dead_letter(self, event: Envelope, reason: str) -> None:
        span = self._consumer(event)
        span.set_attribute("error.type", "dead_letter")
        span.set_error(reason)
        _stamp(event, span)
        try:
            await self._inner.dead_letter(event, reason)
        finally:
            span.end()

    def _consumer(self, env: Envelope) -> SpanRecord:
        prov = env.provenance
        parent = parse(prov.traceparent, prov.tracestate) or _event_context(env)
        return self._recorder.start(
            f"process {prov.inbound}",
            SpanKind.CONSUMER,
            parent,
            {
                "messaging.system": _SYSTEMS.get(prov.protocol, prov.protocol),
                "messaging.operation.type": "process",
                "messaging.destination.name": prov.topic,
                "messaging.message.id": env.id,
            },
        )

    def _server(self, events: Sequence[Envelope], origin: Origin) -> SpanRecord:
        first = events[0]
        parent = parse(origin.traceparent, origin.tracestate) or _event_context(first)
        attributes: dict[str, str | int]
        if origin.protocol == "grpc":
            method = first.provenance.topic
            name = f"{_GRPC_SERVICE}/{method}"
            attributes = {"rpc.system": "grpc", "rpc.service": _GRPC_SERVICE, "rpc.method": method}
        else:
            route = "/" + first.provenance.topic
            name = f"POST {route}"
            attributes = {"http.request.method": "POST", "http.route": route}
        if len(events) == 1:
            attributes["messaging.message.id"] = first.id
        else:
            attributes["messaging.batch.message_count"] = len(events)
        return self._recorder.start(name, SpanKind.SERVER, parent, attributes)


def _stamp(env: Envelope, span: SpanRecord) -> None:
    """The receive span's context into the event's provenance (what its send spans are children of), and
    into its CloudEvents traceparent when it has none: it was created here."""
    traceparent, tracestate = span.traceparent, span.state
    prov = env.provenance
    prov.traceparent = traceparent
    prov.tracestate = tracestate
    attrs = env.attributes
    if TRACEPARENT not in attrs:
        attrs[TRACEPARENT].ce_string = traceparent
        if tracestate:
            attrs[TRACESTATE].ce_string = tracestate


def _restore(saved: list[tuple[Envelope, str, str, bool]]) -> None:
    for env, traceparent, tracestate, had_attribute in saved:
        env.provenance.traceparent = traceparent
        env.provenance.tracestate = tracestate
        if not had_attribute:
            env.attributes.pop(TRACEPARENT, None)
            env.attributes.pop(TRACESTATE, None)


def _failed(span: SpanRecord, exc: BaseException, *, error: bool) -> None:
    """Record why ``accept`` did not commit. A refusal answered to an HTTP or gRPC caller is the caller's
    fault (the HTTP conventions leave a server span's status unset for a 4xx); on a broker it becomes a
    dead letter, and a NotReady or a crash is ours: error status."""
    if isinstance(exc, Rejected):
        span.set_attribute("error.type", exc.code.value)
        if error:
            span.set_error(exc.reason)
    elif isinstance(exc, NotReady):
        span.set_attribute("error.type", "not_ready")
        span.set_error(exc.reason)
    elif isinstance(exc, asyncio.CancelledError):
        span.set_attribute("error.type", "cancelled")
    else:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_error(repr(exc))


class TracedOutbound:
    """An ``Outbound`` whose every ``send`` is a PRODUCER span; its context is the carrier's."""

    def __init__(self, inner: Outbound, kind: str, recorder: Recorder) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_in_flight = inner.max_in_flight
        self._system = _SYSTEMS.get(kind, kind)
        self._span_name = f"send {inner.name}"
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, event: Envelope, address: str, format: str) -> None:
        prov = event.provenance
        parent = parse(prov.traceparent, prov.tracestate)
        # The link to the creation context only where it says something: a creation context in the send
        # span's own trace is one of its ancestors already (compared as text first: the usual case).
        links: tuple[Parent, ...] = ()
        attrs = event.attributes
        if TRACEPARENT in attrs and (parent is None or attrs[TRACEPARENT].ce_string[3:35] != parent.trace_id):
            created = _event_context(event)
            if created is not None and (parent is None or created.trace_id != parent.trace_id):
                links = (created,)
        span = self._recorder.start(
            self._span_name,
            SpanKind.PRODUCER,
            parent,
            {
                "messaging.system": self._system,
                "messaging.operation.type": "send",
                "messaging.destination.name": address,
                "messaging.message.id": event.id,
            },
            links,
        )
        token = set_outgoing((span.traceparent, span.state))
        try:
            await self.inner.send(event, address, format)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_error(str(exc) or type(exc).__name__)
            raise
        finally:
            reset_outgoing(token)
            span.end()
