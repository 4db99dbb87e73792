"""OTLP/HTTP span export with a lean encoder of our own.

The SDK's encoder (``opentelemetry.exporter.otlp.proto.common``) builds a protobuf message object per
span, attribute and value, then serializes them: 30-49 us per span here, on the exporter thread but
holding the GIL the event loop needs, which made it the largest cost of tracing at 100% (two spans per
event). This writes the same bytes directly (protobuf wire format: tags, varints, length prefixes), with
the encoding of a repeated attribute (the system, the destination, the operation) cached: a few
microseconds per span. ``tests/observability/test_otlp_encoder.py`` decodes both encoders' output and
compares the messages; a span with anything this does not handle is encoded by the SDK instead.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind

_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_CACHE_MAX = 4096


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, its length, its bytes."""
    return tag + _varint(len(payload)) + payload


def _string(tag: bytes, text: str | None) -> bytes:
    return _field(tag, text.encode("utf-8")) if text else b""


def _flags(parent: SpanContext | None) -> bytes:
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    return b"\x85\x01" + struct.pack("<I", flags)  # field 16, fixed32


class Encoder:
    def __init__(self) -> None:
        self._attrs: dict[tuple[str, Any], bytes] = {}

    def _attribute(self, key: str, value: Any) -> bytes:
        """One KeyValue field (without its own tag), cached by (key, value) for scalar values."""
        cacheable = isinstance(value, str | bool | int | float)
        if cacheable:
            hit = self._attrs.get((key, value))
            if hit is not None:
                return hit
        if isinstance(value, bool):
            any_value = b"\x10" + (b"\x01" if value else b"\x00")
        elif isinstance(value, str):
            any_value = _field(b"\x0a", value.encode("utf-8"))
        elif isinstance(value, int):
            any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
        elif isinstance(value, float):
            any_value = b"\x21" + _DOUBLE.pack(value)
        else:  # arrays and the rest: the SDK's own encoding of this one attribute
            return _encode_attributes({key: value})[0].SerializeToString()
        encoded = _string(b"\x0a", key) + _field(b"\x12", any_value)
        if cacheable:
            if len(self._attrs) >= _CACHE_MAX:
                self._attrs.clear()
            self._attrs[key, value] = encoded
        return encoded

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        return b"".join(_field(tag, self._attribute(k, v)) for k, v in attributes.items())

    def span(self, span: ReadableSpan) -> bytes:
        ctx = span.get_span_context()
        assert ctx is not None
        parent = span.parent
        parts = [
            _field(b"\x0a", ctx.trace_id.to_bytes(16, "big")),
            _field(b"\x12", ctx.span_id.to_bytes(8, "big")),
        ]
        if ctx.trace_state:
            parts.append(_string(b"\x1a", ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())))
        if parent is not None:
            parts.append(_field(b"\x22", parent.span_id.to_bytes(8, "big")))
        parts.append(_string(b"\x2a", span.name))
        parts.append(b"\x30" + _varint(_KIND[span.kind]))
        parts.append(b"\x39" + _FIXED64.pack(span.start_time or 0))
        parts.append(b"\x41" + _FIXED64.pack(span.end_time or 0))
        parts.append(self._attributes(b"\x4a", span.attributes))
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            body = b"\x09" + _FIXED64.pack(event.timestamp) + _string(b"\x12", event.name)
            body += self._attributes(b"\x1a", event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(b"\x5a", body))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            lc = link.context
            body = _field(b"\x0a", lc.trace_id.to_bytes(16, "big")) + _field(b"\x12", lc.span_id.to_bytes(8, "big"))
            body += self._attributes(b"\x22", link.attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + struct.pack("<I", _HAS_IS_REMOTE | (_IS_REMOTE if lc.is_remote else 0))
            parts.append(_field(b"\x6a", body))
        if span.dropped_links:
            parts.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        if status is not None:
            body = _string(b"\x12", status.description)
            if status.status_code.value:
                body += b"\x18" + _varint(status.status_code.value)
            parts.append(_field(b"\x7a", body))
        parts.append(_flags(parent))
        return b"".join(parts)

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """An ExportTraceServiceRequest: spans grouped by resource, then by instrumentation scope."""
        groups: dict[int, tuple[Any, dict[Any, list[bytes]]]] = {}
        for span in spans:
            resource = span.resource
            entry = groups.setdefault(id(resource), (resource, {}))
            entry[1].setdefault(span.instrumentation_scope, []).append(self.span(span))
        out = []
        for resource, scopes in groups.values():
            body = _field(b"\x0a", self._attributes(b"\x0a", resource.attributes))
            for scope, encoded in scopes.items():
                scope_body = b""
                if scope is not None:
                    scope_body = _string(b"\x0a", scope.name) + _string(b"\x12", scope.version)
                    scope_body += self._attributes(b"\x1a", scope.attributes)
                chunk = _field(b"\x0a", scope_body) + b"".join(_field(b"\x12", s) for s in encoded)
                if scope is not None and scope.schema_url:
                    chunk += _string(b"\x1a", scope.schema_url)
                body += _field(b"\x12", chunk)
            if resource.schema_url:
                body += _string(b"\x1a", resource.schema_url)
            out.append(_field(b"\x0a", body))
        return b"".join(out)


class LeanOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter with ``Encoder`` in place of its message-object encoder. Relies on the
    exporter's ``_client.export(bytes)`` (opentelemetry-exporter-otlp-proto-http 1.45); where that is not
    there, or the lean encoder fails, it is the SDK's own export."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder = Encoder()
        self._lean = callable(getattr(getattr(self, "_client", None), "export", None))

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._lean or self._shutdown:
            return super().export(spans)
        try:
            data = self._encoder.request(spans)
        except Exception:
            return super().export(spans)
        result = self._client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


def sdk_request(spans: Sequence[ReadableSpan]) -> bytes:
    """What the SDK's encoder writes for ``spans`` (for comparison)."""
    return encode_spans(spans).SerializeToString()
