"""The CloudEvents MQTT binding as pure functions (no I/O).

MQTT 5 binary mode: payload = data, the Content Type property = ``datacontenttype``, every other
attribute a user property named as the attribute; a ``specversion`` user property marks a binary-mode
event. Structured mode: the whole event as CloudEvents JSON (Content Type
``application/cloudevents+json``) or CloudEvents Protobuf (``application/cloudevents+protobuf``).
MQTT 3.1.1 has neither properties nor content type: structured JSON, or a raw payload whose
attributes come from the inbound's templates and topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from mediator.core import formats
from mediator.core.envelope import (
    Envelope,
    Provenance,
    attribute,
    data_bytes,
    from_context_attributes,
    iter_attributes,
    new_event,
    now_timestamp,
    valid_attribute_name,
    validate,
)
from mediator.core.errors import RejectCode, Rejected, TerminalDeliveryError
from mediator.core.patterns import Template, TemplateError
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE

PROTOCOL = "mqtt"
TOPIC_SEPARATOR = "/"
UNDECODABLE_TYPE = "io.mediator.undecodable"

Decode = Literal["auto", "raw", "structured"]


@dataclass(frozen=True, slots=True)
class MqttMessage:
    """The parts of an MQTT PUBLISH the binding reads or writes. ``content_type`` and
    ``user_properties`` exist on MQTT 5 only (always None and empty on 3.1.1)."""

    topic: str
    payload: bytes
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class InboundRules:
    """How one inbound reads its messages."""

    inbound: str
    type: Template
    source: Template
    content_type: str | None = None
    decode: Decode = "auto"


def provenance(inbound: str, topic: str, received: Timestamp | None = None) -> Provenance:
    prov = Provenance(inbound=inbound, protocol=PROTOCOL, topic=topic, topic_separator=TOPIC_SEPARATOR)
    prov.received.CopyFrom(received if received is not None else now_timestamp())
    return prov


def _media(content_type: str | None) -> str:
    return content_type.split(";", 1)[0].strip().lower() if content_type else ""


def to_envelope(message: MqttMessage, rules: InboundRules, received: Timestamp | None = None) -> list[Envelope]:
    """The events one MQTT message carries (one, or several for a CloudEvents JSON batch), each with
    the gateway's provenance. Raises ``Rejected`` when the message claims to be a CloudEvent but is not
    a valid one, or when a template cannot be rendered for it."""
    prov = provenance(rules.inbound, message.topic, received)
    for name, value in message.user_properties:
        # The hop's W3C trace context (in binary mode the same property is also the CloudEvents attribute).
        if name == TRACEPARENT:
            prov.traceparent = value
        elif name == TRACESTATE:
            prov.tracestate = value
    media = _media(message.content_type)
    if rules.decode == "structured":
        events = [formats.from_structured(message.payload)]
    elif rules.decode == "raw":
        return [_raw(message, rules, prov)]
    elif media == formats.JSON_CONTENT_TYPE:
        events = [formats.from_structured(message.payload)]
    elif media == formats.PROTOBUF_CONTENT_TYPE:
        events = [formats.from_protobuf(message.payload)]
    elif media == formats.BATCH_CONTENT_TYPE:
        events = formats.from_batch(message.payload)
    elif any(name == "specversion" for name, _ in message.user_properties):
        events = [_binary(message)]
    else:
        return [_raw(message, rules, prov)]
    for env in events:
        env.provenance.CopyFrom(prov)  # replaces whatever a sender put there: it cannot forge gateway facts
    return events


def _binary(message: MqttMessage) -> Envelope:
    attrs: dict[str, str] = {}
    for name, value in message.user_properties:
        # User properties that cannot be CloudEvents attribute names are the producer's own metadata,
        # not part of the event; they are left behind rather than failing the event.
        if name in ("id", "source", "specversion", "type") or valid_attribute_name(name):
            attrs[name] = value
    if message.content_type:
        attrs["datacontenttype"] = message.content_type
    return from_context_attributes(attrs, message.payload)


def _raw(message: MqttMessage, rules: InboundRules, prov: Provenance) -> Envelope:
    env = new_event(
        type="",
        source="",
        data=message.payload,
        content_type=message.content_type or rules.content_type,
        provenance=prov,
    )
    try:
        env.type = rules.type.render(env)
        env.source = rules.source.render(env)
    except TemplateError as exc:
        raise Rejected(RejectCode.INVALID, f"cannot name the event: {exc}") from exc
    validate(env)
    return env


def undecodable(message: MqttMessage, inbound: str, received: Timestamp | None = None) -> Envelope:
    """The raw message wrapped as an event, for the dead letters."""
    return new_event(
        type=UNDECODABLE_TYPE,
        source=inbound,
        data=message.payload,
        content_type=message.content_type,
        provenance=provenance(inbound, message.topic, received),
    )


def from_envelope(
    env: Envelope, topic: str, format: str, *, v5: bool, trace: tuple[str, str] | None = None
) -> MqttMessage:
    """The MQTT message for ``env`` in ``format`` (see ``mediator.core.formats.FORMATS``).

    On MQTT 3.1.1 the binary format is the payload alone: 3.1.1 has no properties, so the attributes
    cannot travel (a consumer that needs them asks for ``structured``). Provenance is never written.
    ``trace``, (traceparent, tracestate) of the send, goes in the ``traceparent`` and ``tracestate`` user
    properties on MQTT 5; in binary mode it wins over the event's own attributes of those names (the
    binding puts both under one name, and the hop's context is what a consumer's tracing reads).
    Raises ``TerminalDeliveryError`` for an unknown format.
    """
    if format == "binary":
        if not v5:
            return MqttMessage(topic, data_bytes(env))
        props = tuple((name, value) for name, value in iter_attributes(env) if name != "datacontenttype")
        if trace is not None:
            props = _with_trace(props, trace)
        return MqttMessage(topic, data_bytes(env), attribute(env, "datacontenttype"), props)
    hop = _with_trace((), trace) if trace is not None and v5 else ()
    if format == "structured":
        return MqttMessage(topic, formats.to_structured(env), formats.JSON_CONTENT_TYPE if v5 else None, hop)
    if format == "protobuf":
        return MqttMessage(topic, formats.to_protobuf(env), formats.PROTOBUF_CONTENT_TYPE if v5 else None, hop)
    raise TerminalDeliveryError(f"unknown format {format!r}; expected one of {', '.join(formats.FORMATS)}")


def _with_trace(props: tuple[tuple[str, str], ...], trace: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    kept = tuple(p for p in props if p[0] != TRACEPARENT and p[0] != TRACESTATE)
    traceparent, tracestate = trace
    return (
        (*kept, (TRACEPARENT, traceparent), (TRACESTATE, tracestate))
        if tracestate
        else (
            *kept,
            (TRACEPARENT, traceparent),
        )
    )


def user_properties(pairs: object) -> tuple[tuple[str, str], ...]:
    """Normalise paho's ``UserProperty`` value (a list of (name, value) pairs) to a tuple."""
    if not isinstance(pairs, list | tuple):
        return ()
    out: list[tuple[str, str]] = []
    for pair in pairs:
        if isinstance(pair, tuple | list) and len(pair) == 2:
            out.append((str(pair[0]), str(pair[1])))
    return tuple(out)
