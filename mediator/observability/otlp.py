"""OTLP/HTTP span export with a lean encoder of our own.

The SDK's encoder (``opentelemetry.exporter.otlp.proto.common``) builds a protobuf message object per
span, attribute and value, then serializes them: 30-49 us per span here, on the exporter thread but
holding the GIL the event loop needs. This writes the same bytes directly from ``SpanRecord``s (protobuf
wire format: tags, varints, length prefixes), with what repeats cached: the resource and scope of every
request, each span name with its kind, each (key, value) of an attribute that names a system, an
operation or a destination. ``tests/observability/test_otlp_encoder.py`` decodes this encoder's output
and the SDK's for the same spans (``spans.to_readable``) and compares the messages.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from mediator.observability.spans import SpanRecord, to_readable

_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE)  # field 16, fixed32
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)
_LINK_LOCAL = b"\x35" + struct.pack("<I", _HAS_IS_REMOTE)  # Link.flags, field 6
_LINK_REMOTE = b"\x35" + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)
_STATUS_UNSET = b"\x7a\x00"  # field 15, an empty Status (the SDK writes one for an unset status)
_ERROR = 2  # StatusCode.ERROR
_CACHE_MAX = 4096
UNCACHED = frozenset({"messaging.message.id", "messaging.batch.message_count", "mediator.delivery.attempts"})
"""Attribute keys whose values are unique or nearly so: encoded each time, never cached."""


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


def _key_value(key: str, value: Any) -> bytes:
    """One KeyValue message's bytes (without its own tag)."""
    if isinstance(value, bool):
        any_value = b"\x10" + (b"\x01" if value else b"\x00")
    elif isinstance(value, str):
        any_value = _field(b"\x0a", value.encode("utf-8"))
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    elif isinstance(value, float):
        any_value = b"\x21" + _DOUBLE.pack(value)
    else:  # arrays and the rest: the SDK's own encoding of this one attribute
        return bytes(_encode_attributes({key: value})[0].SerializeToString())
    return _string(b"\x0a", key) + _field(b"\x12", any_value)


class Encoder:
    """ExportTraceServiceRequest bytes for batches of ``SpanRecord``s of one resource and scope."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        self._attrs: dict[tuple[str, type, Any], bytes] = {}
        self._keys: dict[str, bytes] = {}
        self._names: dict[tuple[str, SpanKind], bytes] = {}
        resource_body = self._attributes(b"\x0a", resource.attributes)
        self._resource = _field(b"\x0a", resource_body)
        self._resource_tail = _string(b"\x1a", resource.schema_url)
        scope_body = _string(b"\x0a", scope.name) + _string(b"\x12", scope.version)
        scope_body += self._attributes(b"\x1a", scope.attributes)
        self._scope = _field(b"\x0a", scope_body)
        self._scope_tail = _string(b"\x1a", scope.schema_url)

    def _attribute(self, key: str, value: Any) -> bytes:
        """One attribute as a tagged KeyValue field of a Span (field 9); cached by (key, type, value)."""
        if key in UNCACHED:
            if value.__class__ is str:  # a message id: the key's bytes are cached, the value encoded
                data = value.encode("utf-8")
                any_value = b"\x0a" + _varint(len(data)) + data
                kv = self._key(key) + b"\x12" + _varint(len(any_value)) + any_value
                return b"\x4a" + _varint(len(kv)) + kv
            return _field(b"\x4a", _key_value(key, value))
        try:
            hit = self._attrs.get((key, value.__class__, value))
        except TypeError:  # unhashable: an array
            return _field(b"\x4a", _key_value(key, value))
        if hit is None:
            if len(self._attrs) >= _CACHE_MAX:
                self._attrs.clear()
            hit = self._attrs[key, value.__class__, value] = _field(b"\x4a", _key_value(key, value))
        return hit

    def _key(self, key: str) -> bytes:
        hit = self._keys.get(key)
        if hit is None:
            hit = self._keys[key] = _string(b"\x0a", key)
        return hit

    @staticmethod
    def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        return b"".join(_field(tag, _key_value(k, v)) for k, v in attributes.items())

    def span(self, span: SpanRecord) -> bytes:
        parent = span.parent
        name = self._names.get((span.name, span.kind))
        if name is None:
            name = self._names[span.name, span.kind] = _string(b"\x2a", span.name) + b"\x30" + _varint(_KIND[span.kind])
        parts = [b"\x0a\x10" + bytes.fromhex(span.trace_id), b"\x12\x08" + bytes.fromhex(span.span_id)]
        if span.state:
            parts.append(_string(b"\x1a", span.state))
        if parent is not None:
            parts.append(b"\x22\x08" + bytes.fromhex(parent.span_id))
        parts.append(name)
        parts.append(b"\x39" + _FIXED64.pack(span.start_ns))
        parts.append(b"\x41" + _FIXED64.pack(span.end_ns))
        attribute = self._attribute
        parts.extend(attribute(k, v) for k, v in span.attributes.items())
        for link in span.links:
            body = b"\x0a\x10" + bytes.fromhex(link.trace_id) + b"\x12\x08" + bytes.fromhex(link.span_id)
            parts.append(_field(b"\x6a", body + (_LINK_REMOTE if link.remote else _LINK_LOCAL)))
        if span.error:
            parts.append(_field(b"\x7a", _string(b"\x12", span.description) + b"\x18" + _varint(_ERROR)))
        else:
            parts.append(_STATUS_UNSET)
        parts.append(_FLAGS_REMOTE if parent is not None and parent.remote else _FLAGS_LOCAL)
        return b"".join(parts)

    def request(self, spans: Sequence[SpanRecord]) -> bytes:
        """An ExportTraceServiceRequest: one ResourceSpans, one ScopeSpans, the spans."""
        chunk = self._scope + b"".join(_field(b"\x12", self.span(s)) for s in spans) + self._scope_tail
        body = self._resource + _field(b"\x12", chunk) + self._resource_tail
        return _field(b"\x0a", body)


class LeanOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (its transport, headers, compression, timeout and retries) with
    ``Encoder`` in place of its message-object encoder. Relies on the exporter's ``_client.export(bytes)``
    (opentelemetry-exporter-otlp-proto-http 1.45); where that is not there, records become the SDK's
    ``ReadableSpan``s and take the SDK's own export."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resource_of = resource
        self._scope_of = scope
        self._encoder = Encoder(resource, scope)
        self._lean = callable(getattr(getattr(self, "_client", None), "export", None))

    def export_records(self, spans: Sequence[SpanRecord]) -> bool:
        """Post one batch; True when the collector took it."""
        if self._shutdown:
            return False
        if not self._lean:
            readable = [to_readable(s, self._resource_of, self._scope_of) for s in spans]
            return super().export(readable) is SpanExportResult.SUCCESS
        result = self._client.export(self._encoder.request(spans))
        return bool(result.success)


def sdk_request(spans: Sequence[ReadableSpan]) -> bytes:
    """What the SDK's encoder writes for ``spans`` (for comparison)."""
    return bytes(encode_spans(spans).SerializeToString())
