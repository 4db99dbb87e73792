"""The CloudEvents binding for AMQP 0-9-1 (RabbitMQ): pure functions, no I/O, no client library types.

Binary mode: body = data, ``content_type`` = datacontenttype, every other attribute a header named
prefix + attribute (``cloudEvents_id``, ``ce-type``...), as the CloudEvents AMQP binding and the RabbitMQ
binding of the CloudEvents SDKs write them. The AMQP properties also carry ``message_id`` = id,
``timestamp`` = time (whole seconds, so ``time`` travels as a header too) and ``type`` = event type, for
consumers that only look at properties. Structured mode: the whole event as CloudEvents JSON or Protobuf
in the body, with its media type as ``content_type``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from mediator.core.envelope import (
    SPEC_VERSION,
    Envelope,
    attribute,
    data_bytes,
    from_context_attributes,
    iter_attributes,
    new_event,
    new_id,
    now_timestamp,
    validate,
)
from mediator.core.errors import RejectCode, Rejected
from mediator.core.formats import (
    JSON_CONTENT_TYPE,
    PROTOBUF_CONTENT_TYPE,
    from_protobuf,
    from_structured,
    to_protobuf,
    to_structured,
)
from mediator.core.patterns import Template, TemplateError
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE

PROTOCOL = "amqp"
TOPIC_SEPARATOR = "."
UNDECODABLE_TYPE = "io.mediator.undecodable"

Mode = Literal["structured", "protobuf", "binary", "raw"]
Decode = Literal["auto", "raw", "structured"]

# Lower-cased, so a header is recognised whatever case the producer used (AMQP field names are
# case-sensitive, but ``cloudevents_id`` and ``CE-Id`` are seen in the wild).
_PREFIXES = ("cloudevents_", "cloudevents:", "ce-", "ce_")
_SPECVERSION_HEADERS = frozenset(p + "specversion" for p in _PREFIXES)


@dataclass(frozen=True, slots=True)
class AmqpMessage:
    """What the binding reads from and writes to one AMQP message (body, properties, headers)."""

    body: bytes
    routing_key: str = ""
    content_type: str | None = None
    headers: Mapping[str, object] = field(default_factory=dict)
    message_id: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    # The ``user_id`` property: RabbitMQ refuses a message whose user_id is not the publishing
    # connection's user (unless that user has the ``impersonator`` tag), so on the way in it is the
    # publisher as the broker vouches for it. Never written on the way out.
    user_id: str | None = None


def detect_mode(msg: AmqpMessage) -> Mode:
    """Structured by media type, binary when a header carries ``specversion`` under a known prefix."""
    if msg.content_type:
        media = msg.content_type.split(";", 1)[0].strip().lower()
        if media == JSON_CONTENT_TYPE:
            return "structured"
        if media == PROTOBUF_CONTENT_TYPE:
            return "protobuf"
    if msg.headers and any(name.lower() in _SPECVERSION_HEADERS for name in msg.headers):
        return "binary"
    return "raw"


def header_str(value: object) -> str | None:
    """An AMQP field-table value as a CloudEvents canonical string; None for void. Raises Rejected for
    values no attribute can hold (tables, arrays, undecodable bytes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected(RejectCode.INVALID, "a CloudEvents header is not valid UTF-8") from None
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return _timestamp(value).ToJsonString()
    if isinstance(value, float | Decimal):
        return str(value)
    if value is None:
        return None
    raise Rejected(RejectCode.INVALID, f"a CloudEvents header holds a {type(value).__name__}, not a scalar")


def _timestamp(value: datetime) -> Timestamp:
    if value.tzinfo is None:  # AMQP timestamps are UTC seconds; a naive datetime means UTC
        value = value.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def binary_attributes(msg: AmqpMessage) -> dict[str, str]:
    """The context attributes of a binary-mode message: prefixed headers, then the properties."""
    attrs: dict[str, str] = {}
    for name, raw in msg.headers.items():
        lower = name.lower()
        for prefix in _PREFIXES:
            if lower.startswith(prefix):
                value = header_str(raw)
                if value is not None:
                    attrs[lower[len(prefix) :]] = value
                break
    if msg.content_type:
        attrs["datacontenttype"] = msg.content_type
    # Producers that put id and time only in the AMQP properties are still read faithfully.
    if "id" not in attrs and msg.message_id:
        attrs["id"] = msg.message_id
    if "time" not in attrs and msg.timestamp is not None:
        attrs["time"] = _timestamp(msg.timestamp).ToJsonString()
    return attrs


def to_envelope(
    msg: AmqpMessage,
    *,
    inbound: str,
    type_template: Template,
    source_template: Template,
    decode: Decode = "auto",
    now: Timestamp | None = None,
) -> Envelope:
    """Decode one delivered message into an envelope stamped with the gateway's provenance (with the
    broker-validated ``user_id`` as ``provenance.vouched_user``; an ingress stage decides what it proves).

    Raises Rejected when the message cannot be read as asked (the inbound dead-letters it).
    """
    if now is None:
        now = now_timestamp()
    mode: Mode = "raw" if decode == "raw" else detect_mode(msg)
    if mode == "structured":
        env = from_structured(msg.body)
    elif mode == "protobuf":
        env = from_protobuf(msg.body)
    elif mode == "binary":
        env = from_context_attributes(binary_attributes(msg), msg.body)
    elif decode == "structured":
        # Not marked as CloudEvents by media type or headers: the body must still be CloudEvents JSON.
        env = from_structured(msg.body)
    else:
        env = _raw(msg, now)
    _stamp(env, inbound, msg.routing_key, now)
    if msg.user_id:
        env.provenance.vouched_user = msg.user_id
    headers = msg.headers
    if headers and TRACEPARENT in headers:
        # The hop's W3C trace context; a ``cloudEvents_traceparent`` header is the event's own attribute.
        _hop(env, headers)
    if mode == "raw" and decode != "structured":
        env.provenance.id_minted = not msg.message_id
        try:
            env.type = type_template.render(env)
            env.source = source_template.render(env)
        except TemplateError as exc:
            raise Rejected(RejectCode.INVALID, f"cannot name the event: {exc}") from exc
        validate(env)
    return env


def _hop(env: Envelope, headers: Mapping[str, object]) -> None:
    prov = env.provenance
    try:
        prov.traceparent = header_str(headers[TRACEPARENT]) or ""
        prov.tracestate = header_str(headers.get(TRACESTATE)) or ""
    except Rejected:  # a malformed trace context is ignored, as W3C Trace Context asks; the event is not
        prov.traceparent = prov.tracestate = ""


def _raw(msg: AmqpMessage, now: Timestamp) -> Envelope:
    env = Envelope(id=msg.message_id or new_id(), spec_version=SPEC_VERSION)
    env.binary_data = msg.body
    time = env.attributes["time"].ce_timestamp
    if msg.timestamp is not None:
        time.CopyFrom(_timestamp(msg.timestamp))
    else:
        time.CopyFrom(now)
    if msg.content_type:
        env.attributes["datacontenttype"].ce_string = msg.content_type
    return env


def _stamp(env: Envelope, inbound: str, routing_key: str, now: Timestamp) -> None:
    # A sender's own provenance is cleared: it cannot forge gateway facts.
    env.ClearField("provenance")
    prov = env.provenance
    prov.inbound = inbound
    prov.protocol = PROTOCOL
    prov.topic = routing_key
    prov.topic_separator = TOPIC_SEPARATOR
    prov.received.CopyFrom(now)


def undecodable(msg: AmqpMessage, inbound: str) -> Envelope:
    """The raw bytes of a message that could not be decoded, wrapped for the dead-letter store."""
    env = new_event(
        type=UNDECODABLE_TYPE,
        source=inbound,
        data=msg.body,
        content_type=msg.content_type or None,
    )
    _stamp(env, inbound, msg.routing_key, env.attributes["time"].ce_timestamp)
    return env


def _datetime(ts: Timestamp) -> datetime:
    """``ts.ToDatetime(tzinfo=UTC)`` without its timedelta arithmetic (the AMQP property keeps the whole
    seconds); ValueError when no datetime can hold it."""
    try:
        return datetime.fromtimestamp(ts.seconds, UTC).replace(microsecond=ts.nanos // 1000)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"time {ts.seconds} s since the epoch is out of range: {exc}") from exc


def from_envelope(env: Envelope, format: str, header_prefix: str = "cloudEvents_") -> AmqpMessage:
    """Encode an event for publishing (``routing_key`` is left to the caller).

    ``format``: ``binary``, ``structured`` or ``protobuf``; anything else raises ValueError.
    Provenance is never written (``to_protobuf`` strips it; the other formats never read it).
    """
    time = env.attributes.get("time")
    timestamp = None
    if time is not None and time.WhichOneof("attr") == "ce_timestamp" and time.ce_timestamp.seconds >= 0:
        # The AMQP timestamp is an unsigned count of seconds since the epoch: a time before 1970 (a valid
        # CloudEvents time) has none, and travels only as the header or in the body. Encoding it raised
        # struct.error inside pamqp (a 500 on request-reply, a crashed delivery otherwise).
        timestamp = _datetime(time.ce_timestamp)
    if format == "binary":
        headers: dict[str, object] = {
            header_prefix + name: value for name, value in iter_attributes(env) if name != "datacontenttype"
        }
        return AmqpMessage(
            body=data_bytes(env),
            content_type=attribute(env, "datacontenttype"),
            headers=headers,
            message_id=env.id,
            timestamp=timestamp,
            type=env.type,
        )
    if format == "structured":
        body, content_type = to_structured(env), JSON_CONTENT_TYPE
    elif format == "protobuf":
        body, content_type = to_protobuf(env), PROTOBUF_CONTENT_TYPE
    else:
        raise ValueError(f"unknown format {format!r}: binary, structured or protobuf")
    return AmqpMessage(body=body, content_type=content_type, message_id=env.id, timestamp=timestamp, type=env.type)


__all__ = [
    "AmqpMessage",
    "binary_attributes",
    "detect_mode",
    "from_envelope",
    "header_str",
    "to_envelope",
    "undecodable",
]
