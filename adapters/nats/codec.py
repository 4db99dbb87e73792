"""The CloudEvents NATS protocol binding: pure functions, no I/O, no client library types.

Binary mode (NATS 2.2+ headers): body = data, ``Content-Type`` = datacontenttype, every other attribute a
header ``ce-<name>`` (read case-insensitively). Structured mode: the whole event as CloudEvents JSON (or
Protobuf) in the body, its media type in ``Content-Type``. A message that is neither is raw data, named
by the inbound's ``type`` and ``source`` templates; its id is its ``Nats-Msg-Id`` when it has one (so a
JetStream publisher's own deduplication id deduplicates here too). ``traceparent``/``tracestate`` headers
are the hop's W3C trace context; ``ce-traceparent`` is the event's own attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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

PROTOCOL = "nats"
TOPIC_SEPARATOR = "."
UNDECODABLE_TYPE = "io.mediator.undecodable"
PREFIX = "ce-"
CONTENT_TYPE = "Content-Type"
MSG_ID = "Nats-Msg-Id"

Mode = Literal["structured", "protobuf", "binary", "raw"]
Decode = Literal["auto", "raw", "structured"]


@dataclass(frozen=True, slots=True)
class NatsMessage:
    """What the binding reads from and writes to one NATS message."""

    data: bytes
    subject: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    deliveries: int = 0  # JetStream's num_delivered (0: core NATS)


def _content_type(headers: Mapping[str, str]) -> str | None:
    value = headers.get(CONTENT_TYPE)
    if value is None:
        for name, v in headers.items():
            if name.lower() == "content-type":
                return v
    return value


def detect_mode(msg: NatsMessage) -> Mode:
    headers = msg.headers
    if not headers:
        return "raw"
    content_type = _content_type(headers)
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if media == JSON_CONTENT_TYPE:
            return "structured"
        if media == PROTOBUF_CONTENT_TYPE:
            return "protobuf"
    if any(name.lower() == "ce-specversion" for name in headers):
        return "binary"
    return "raw"


def binary_attributes(headers: Mapping[str, str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for name, value in headers.items():
        if len(name) > 3 and name[:3].lower() == PREFIX:
            attrs[name[3:].lower()] = value
    content_type = _content_type(headers)
    if content_type:
        attrs["datacontenttype"] = content_type
    return attrs


def to_envelope(
    msg: NatsMessage,
    *,
    inbound: str,
    type_template: Template,
    source_template: Template,
    decode: Decode = "auto",
    now: Timestamp | None = None,
) -> Envelope:
    """Decode one message into an envelope stamped with the gateway's provenance. Raises Rejected when it
    cannot be read as asked (the inbound dead-letters it)."""
    if now is None:
        now = now_timestamp()
    mode: Mode = "raw" if decode == "raw" else detect_mode(msg)
    if mode == "structured":
        env = from_structured(msg.data)
    elif mode == "protobuf":
        env = from_protobuf(msg.data)
    elif mode == "binary":
        env = from_context_attributes(binary_attributes(msg.headers), msg.data)
    elif decode == "structured":
        env = from_structured(msg.data)
    else:
        env = _raw(msg, now)
    _stamp(env, inbound, msg, now)
    headers = msg.headers
    if headers and TRACEPARENT in headers:
        env.provenance.traceparent = headers[TRACEPARENT]
        env.provenance.tracestate = headers.get(TRACESTATE, "")
    if mode == "raw" and decode != "structured":
        env.provenance.id_minted = not (headers and headers.get(MSG_ID))
        try:
            env.type = type_template.render(env)
            env.source = source_template.render(env)
        except TemplateError as exc:
            raise Rejected(RejectCode.INVALID, f"cannot name the event: {exc}") from exc
        validate(env)
    return env


def _raw(msg: NatsMessage, now: Timestamp) -> Envelope:
    headers = msg.headers or {}
    env = Envelope(id=headers.get(MSG_ID) or new_id(), spec_version=SPEC_VERSION)
    env.binary_data = msg.data
    env.attributes["time"].ce_timestamp.CopyFrom(now)
    content_type = _content_type(headers) if headers else None
    if content_type:
        env.attributes["datacontenttype"].ce_string = content_type
    return env


def _stamp(env: Envelope, inbound: str, msg: NatsMessage, now: Timestamp) -> None:
    env.ClearField("provenance")  # a sender cannot forge gateway facts
    prov = env.provenance
    prov.inbound = inbound
    prov.protocol = PROTOCOL
    prov.topic = msg.subject
    prov.topic_separator = TOPIC_SEPARATOR
    prov.received.CopyFrom(now)
    prov.deliveries = msg.deliveries


def undecodable(msg: NatsMessage, inbound: str) -> Envelope:
    """The raw bytes of a message that could not be decoded, wrapped for the dead-letter store."""
    headers = msg.headers or {}
    env = new_event(type=UNDECODABLE_TYPE, source=inbound, data=msg.data, content_type=_content_type(headers) or None)
    _stamp(env, inbound, msg, env.attributes["time"].ce_timestamp)
    return env


def from_envelope(env: Envelope, format: str) -> NatsMessage:
    """Encode an event for publishing (the subject is left to the caller). ``format``: ``binary``,
    ``structured`` or ``protobuf``; anything else raises ValueError. Provenance is never written."""
    if format == "binary":
        headers = {PREFIX + name: value for name, value in iter_attributes(env) if name != "datacontenttype"}
        content_type = attribute(env, "datacontenttype")
        if content_type:
            headers[CONTENT_TYPE] = content_type
        return NatsMessage(data=data_bytes(env), headers=headers)
    if format == "structured":
        return NatsMessage(data=to_structured(env), headers={CONTENT_TYPE: JSON_CONTENT_TYPE})
    if format == "protobuf":
        return NatsMessage(data=to_protobuf(env), headers={CONTENT_TYPE: PROTOBUF_CONTENT_TYPE})
    raise ValueError(f"unknown format {format!r}: binary, structured or protobuf")


__all__ = ["NatsMessage", "binary_attributes", "detect_mode", "from_envelope", "to_envelope", "undecodable"]
