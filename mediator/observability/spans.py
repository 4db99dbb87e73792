"""Spans as small records, sampled, queued and exported by a thread of ours: what tracing costs per span.

The SDK's span objects cost about 39 us each here (start, attributes, end, its batch processor's queue:
``python -m timeit`` on a bound tracer), two per HTTP -> AMQP event, which made tracing at 100% cost a
third of the throughput. A ``SpanRecord`` holds what an OTLP span carries and nothing else: the ids as the
hex a traceparent writes them (no conversion on the hot path), the name, kind, times, attributes, links
and status. The sampling is the SDK's ``ParentBased(TraceIdRatioBased(ratio))`` decision, written out: a
parent's sampled flag decides; a trace started here is sampled when the low 64 bits of its id fall below
the SDK's bound for the ratio. An unsampled span still has a context (its traceparent carries ``-00``, as
the SDK's non-recording spans do), and is never queued.

``Recorder.finish`` appends a sampled record to a deque (bounded by ``max_queue_size``: beyond it new
spans are counted as dropped, as the SDK's processor does) and wakes the export thread once a batch is
there; the thread encodes each batch with ``mediator.observability.otlp`` and posts it with the SDK's
OTLP/HTTP exporter (its transport, headers, timeout and retries). ``to_readable`` gives the SDK's
``ReadableSpan`` of a record: the export of an exporter without a raw-bytes client, and the tests'
comparison of both encoders.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import structlog
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from mediator.core.tracecontext import valid_traceparent

log = structlog.get_logger(__name__)

_LOW64 = (1 << 64) - 1
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_DROPPED_LOG_EVERY_S = 10.0


class Parent(NamedTuple):
    """A span context as a traceparent names it: ids in lower-case hex."""

    trace_id: str
    span_id: str
    sampled: bool
    state: str = ""  # the tracestate header, "" for none
    remote: bool = True


def parse(traceparent: str, tracestate: str = "") -> Parent | None:
    """The context a traceparent names, or None when it is absent, invalid, or has an all-zero id."""
    value = valid_traceparent(traceparent)
    if value is None:
        return None
    trace_id, span_id = value[3:35], value[36:52]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = TraceState.from_header([tracestate]).to_header() if tracestate else ""
    return Parent(trace_id, span_id, bool(int(value[53:55], 16) & 1), state)


class SpanRecord:
    """One span: started by ``Recorder.start``, ended by ``end`` (then queued for export when sampled)."""

    __slots__ = (
        "_recorder",
        "attributes",
        "description",
        "end_ns",
        "error",
        "kind",
        "links",
        "name",
        "parent",
        "sampled",
        "span_id",
        "start_ns",
        "state",
        "trace_id",
    )

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        kind: SpanKind,
        trace_id: str,
        span_id: str,
        parent: Parent | None,
        sampled: bool,
        state: str,
        attributes: dict[str, Any],
        links: Sequence[Parent],
    ) -> None:
        self._recorder = recorder
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.sampled = sampled
        self.state = state
        self.attributes = attributes
        self.links = links
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.error = False
        self.description: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def context(self) -> Parent:
        """This span as the parent of another (in this process: not remote)."""
        return Parent(self.trace_id, self.span_id, self.sampled, self.state, False)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_error(self, description: str) -> None:
        """Error status (OpenTelemetry's ``StatusCode.ERROR``) with ``description``."""
        self.error = True
        self.description = description

    def end(self) -> None:
        if self.end_ns:
            return
        self.end_ns = time.time_ns()
        if self.sampled:
            self._recorder.finish(self)


class Recorder:
    """Starts spans, and exports the sampled ones from a thread of its own (``start_export``)."""

    def __init__(
        self,
        sample_ratio: float,
        *,
        resource: Resource,
        scope: InstrumentationScope,
        max_queue_size: int = 8192,
        max_export_batch: int = 512,
        schedule_delay_s: float = 2.0,
    ) -> None:
        self.resource = resource
        self.scope = scope
        self._bound = TraceIdRatioBased.get_bound_for_rate(sample_ratio)
        self._queue: deque[SpanRecord] = deque()
        self._max_queue = max_queue_size
        self._batch = max(1, min(max_export_batch, max_queue_size))
        self._delay_s = schedule_delay_s
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._exporting = threading.Lock()  # one batch at a time: the thread's, or a flush's
        self.dropped = 0  # sampled spans not queued: the queue was full
        self.exported = 0
        self.failed = 0  # spans in batches the collector did not take
        self._bits = random.getrandbits
        self._export: Callable[[list[SpanRecord]], bool] = lambda batch: False

    # ---------------------------------------------------------------- the hot path (the event loop)
    def start(
        self,
        name: str,
        kind: SpanKind,
        parent: Parent | None,
        attributes: dict[str, Any],
        links: Sequence[Parent] = (),
    ) -> SpanRecord:
        bits = self._bits
        if parent is not None:
            trace_id, sampled, state = parent.trace_id, parent.sampled, parent.state
        else:
            n = bits(128) or 1
            trace_id, sampled, state = f"{n:032x}", (n & _LOW64) < self._bound, ""
        span_id = f"{bits(64) or 1:016x}"
        return SpanRecord(self, name, kind, trace_id, span_id, parent, sampled, state, attributes, links)

    def finish(self, span: SpanRecord) -> None:
        queue = self._queue
        if len(queue) >= self._max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) % self._batch == 0:
            self._wake.set()

    # ---------------------------------------------------------------- export (its own thread)
    def start_export(self, export: Callable[[list[SpanRecord]], bool]) -> None:
        """Export batches with ``export(records) -> bool`` on a thread, at least every ``schedule_delay_s``."""
        self._export = export
        self._thread = threading.Thread(target=self._run, name="mediator-span-export", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        reported = 0
        last_report = time.monotonic()
        while True:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self.flush()
            if self.dropped != reported and time.monotonic() - last_report >= _DROPPED_LOG_EVERY_S:
                log.warning("tracing.spans_dropped", dropped=self.dropped - reported, queue_max=self._max_queue)
                reported, last_report = self.dropped, time.monotonic()
            if self._stopping:
                return

    def flush(self, deadline: float | None = None) -> bool:
        """Export what is queued now, batch by batch; False when the deadline (monotonic) passed first."""
        queue = self._queue
        with self._exporting:
            while queue:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                batch = [queue.popleft() for _ in range(min(len(queue), self._batch))]
                try:
                    ok = bool(self._export(batch))
                except Exception as exc:  # the collector's problem must not end the thread
                    log.warning("tracing.export_failed", error=repr(exc), spans=len(batch))
                    ok = False
                if ok:
                    self.exported += len(batch)
                else:
                    self.failed += len(batch)
        return True

    def stop(self, timeout_s: float) -> bool:
        """Export what is queued within ``timeout_s`` and end the thread (blocking: call it on a thread)."""
        deadline = time.monotonic() + timeout_s
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            return not thread.is_alive() and not self._queue
        return self.flush(deadline)


_STATUS_OK = Status(StatusCode.UNSET)


def to_readable(span: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """The SDK's ``ReadableSpan`` of a record (for an exporter that takes only those, and for tests)."""
    state = TraceState.from_header([span.state]) if span.state else None
    ctx = SpanContext(int(span.trace_id, 16), int(span.span_id, 16), False, TraceFlags(1), state)
    parent = span.parent
    parent_ctx = (
        SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), parent.remote, TraceFlags(1), state)
        if parent is not None
        else None
    )
    links = [
        Link(SpanContext(int(ln.trace_id, 16), int(ln.span_id, 16), ln.remote, TraceFlags(1))) for ln in span.links
    ]
    return ReadableSpan(
        name=span.name,
        context=ctx,
        parent=parent_ctx,
        resource=resource,
        attributes=span.attributes,
        links=links,
        kind=span.kind,
        instrumentation_scope=scope,
        status=Status(StatusCode.ERROR, span.description) if span.error else _STATUS_OK,
        start_time=span.start_ns,
        end_time=span.end_ns,
    )
