"""The lean OTLP encoder writes what the SDK's encoder writes: both decoded and compared as messages."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from mediator.observability.otlp import Encoder, sdk_request


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_lean_encoding_equals_the_sdks() -> None:
    keep = _Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "mediator", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(keep))
    tracer = provider.get_tracer("mediator", "1.2.3")
    other = TracerProvider().get_tracer("other")
    provider.get_tracer("x")
    for i in range(200):
        attrs: dict[str, str | int | float | bool] = {
            "messaging.system": "rabbitmq",
            "messaging.message.id": f"id-{i}",
            "n": i - 100,
            "f": 0.5 * i,
        }
        span = tracer.start_span("send out", kind=SpanKind.PRODUCER, attributes={**attrs, "ok": i % 2 == 0})
        if i % 3 == 0:
            child = tracer.start_span(
                "process in", kind=SpanKind.CONSUMER, links=[Link(span.get_span_context(), {"k": "v"})]
            )
            child.set_status(Status(StatusCode.ERROR, "dead-lettered: boom"))
            child.add_event("retry", {"attempt": 2, "tags": ["a", "b"]})
            child.end()
        if i % 7 == 0:
            span.set_attribute("list", [1, 2, 3])
        span.end()
    _ = other
    assert len(keep.spans) > 250
    encoder = Encoder()
    lean = ExportTraceServiceRequest.FromString(encoder.request(keep.spans))
    sdk = ExportTraceServiceRequest.FromString(sdk_request(keep.spans))
    assert lean == sdk
    # The cache of repeated attributes changes nothing on a second batch.
    assert ExportTraceServiceRequest.FromString(encoder.request(keep.spans)) == sdk
