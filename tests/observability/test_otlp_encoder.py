"""The lean OTLP encoder writes what the SDK's encoder writes for the same spans: both decoded and compared
as messages; and the recorder samples as the SDK's ``ParentBased(TraceIdRatioBased)`` does."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context

from mediator.observability.otlp import Encoder, sdk_request
from mediator.observability.spans import Parent, Recorder, SpanRecord, parse, to_readable

RESOURCE = Resource.create({"service.name": "mediator", "n": 3})
SCOPE = InstrumentationScope("mediator", "1.2.3")


def _spans(recorder: Recorder) -> list[SpanRecord]:
    out: list[SpanRecord] = []
    remote = parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert remote is not None
    for i in range(200):
        attrs = {"messaging.system": "rabbitmq", "messaging.message.id": f"id-{i}", "n": i - 100, "f": 0.5 * i}
        span = recorder.start("send out", SpanKind.PRODUCER, remote if i % 2 else None, {**attrs, "ok": i % 2 == 0})
        if i % 3 == 0:
            child = recorder.start("process in", SpanKind.CONSUMER, span.context(), {}, links=(remote,))
            child.set_error("dead-lettered: boom")
            child.end()
            out.append(child)
        if i % 7 == 0:
            span.set_attribute("list", [1, 2, 3])
        span.end()
        out.append(span)
    return out


def test_lean_encoding_equals_the_sdks() -> None:
    recorder = Recorder(1.0, resource=RESOURCE, scope=SCOPE)
    spans = _spans(recorder)
    assert len(spans) > 250
    encoder = Encoder(RESOURCE, SCOPE)
    lean = ExportTraceServiceRequest.FromString(encoder.request(spans))
    sdk = ExportTraceServiceRequest.FromString(sdk_request([to_readable(s, RESOURCE, SCOPE) for s in spans]))
    assert lean == sdk
    decoded = lean.resource_spans[0].scope_spans[0].spans
    assert sum(s.trace_state == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7" for s in decoded) >= 100
    assert any(s.status.code == 2 and s.status.message == "dead-lettered: boom" for s in decoded)
    # The caches of repeated attributes and names change nothing on a second batch.
    assert ExportTraceServiceRequest.FromString(encoder.request(spans)) == sdk


def test_sampling_is_the_sdks_parent_based_ratio() -> None:
    ratio = 0.25
    recorder = Recorder(ratio, resource=RESOURCE, scope=SCOPE)
    sampler = ParentBased(TraceIdRatioBased(ratio))
    roots = [recorder.start("root", SpanKind.SERVER, None, {}) for _ in range(4000)]
    for span in roots:
        decision = sampler.should_sample(None, int(span.trace_id, 16), "root")
        assert (decision.decision is Decision.RECORD_AND_SAMPLE) == span.sampled
    assert 700 < sum(s.sampled for s in roots) < 1300
    # A parent's flag decides, whatever the ratio.
    never = Recorder(0.0, resource=RESOURCE, scope=SCOPE)
    for flag in (True, False):
        parent = Parent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", flag)
        child = never.start("child", SpanKind.CONSUMER, parent, {})
        ctx = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), True, TraceFlags(int(flag)))
        sdk = sampler.should_sample(set_span_in_context(NonRecordingSpan(ctx)), ctx.trace_id, "child")
        assert child.sampled is flag is (sdk.decision is Decision.RECORD_AND_SAMPLE)
        assert child.trace_id == parent.trace_id
        assert child.traceparent.endswith("-01" if flag else "-00")


def test_a_full_queue_drops_new_spans_and_counts_them() -> None:
    recorder = Recorder(1.0, resource=RESOURCE, scope=SCOPE, max_queue_size=10, max_export_batch=4)
    batches: list[int] = []

    def export(batch: list[SpanRecord]) -> bool:
        batches.append(len(batch))
        return True

    recorder._export = export  # export without a thread
    for _ in range(15):
        recorder.start("s", SpanKind.INTERNAL, None, {}).end()
    assert recorder.dropped == 5
    assert recorder.flush()
    assert batches == [4, 4, 2]
    assert recorder.exported == 10
    unsampled = Recorder(0.0, resource=RESOURCE, scope=SCOPE)
    unsampled.start("s", SpanKind.INTERNAL, None, {}).end()
    assert not unsampled._queue
