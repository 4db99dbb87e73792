"""The AMQP 0-9-1 binding: golden cases and round trips (envelope -> message -> envelope)."""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.amqp.codec import (
    UNDECODABLE_TYPE,
    AmqpMessage,
    binary_attributes,
    detect_mode,
    from_envelope,
    header_str,
    to_envelope,
    undecodable,
)
from adapters.amqp.config import HEADER_PREFIXES
from mediator.core.envelope import Envelope, attribute, context_attributes, data_bytes, new_event
from mediator.core.errors import Rejected
from mediator.core.formats import to_protobuf
from mediator.core.patterns import Template

TYPE = Template.compile("io.mediator.amqp.message")
SOURCE = Template.compile("amqp://{inbound}")


def decode(msg: AmqpMessage, decode: str = "auto", **kw: Template) -> Envelope:
    return to_envelope(
        msg,
        inbound="commands",
        type_template=kw.get("type", TYPE),
        source_template=kw.get("source", SOURCE),
        decode=decode,  # type: ignore[arg-type]
    )


def sample_event() -> Envelope:
    env = new_event(
        type="com.example.order.created",
        source="/orders",
        data=b'{"order":1}',
        content_type="application/json",
        id="evt-1",
        subject="order-1",
    )
    env.attributes["time"].ce_timestamp.FromJsonString("2024-05-06T07:08:09.123456789Z")
    env.attributes["priority"].ce_integer = 7
    env.attributes["urgent"].ce_boolean = True
    env.provenance.inbound = "secret-inbound"
    return env


# ---------------------------------------------------------------- inbound golden cases


def test_binary_mode_cloudevents_prefix() -> None:
    msg = AmqpMessage(
        body=b'{"a":1}',
        routing_key="orders.created",
        content_type="application/json",
        headers={
            "cloudEvents_specversion": "1.0",
            "cloudEvents_id": "abc",
            "cloudEvents_source": "/shop",
            "cloudEvents_type": "com.example.created",
            "cloudEvents_time": "2024-01-02T03:04:05.5Z",
            "cloudEvents_subject": "s1",
            "x-other": "ignored",
        },
    )
    assert detect_mode(msg) == "binary"
    env = decode(msg)
    assert context_attributes(env) == {
        "specversion": "1.0",
        "id": "abc",
        "source": "/shop",
        "type": "com.example.created",
        "time": "2024-01-02T03:04:05.500Z",
        "subject": "s1",
        "datacontenttype": "application/json",
    }
    assert data_bytes(env) == b'{"a":1}'
    prov = env.provenance
    assert (prov.inbound, prov.protocol, prov.topic, prov.topic_separator) == (
        "commands",
        "amqp",
        "orders.created",
        ".",
    )
    assert prov.received.seconds > 0


@pytest.mark.parametrize("prefix", ["ce-", "ce_", "cloudEvents:", "CE-"])
def test_binary_mode_other_prefixes_and_header_types(prefix: str) -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    msg = AmqpMessage(
        body=b"raw",
        headers={
            f"{prefix}specversion": b"1.0",
            f"{prefix}id": b"id-1",
            f"{prefix}source": "/s",
            f"{prefix}type": "t",
            f"{prefix}time": when,
            f"{prefix}count": 42,
            f"{prefix}flag": False,
            f"{prefix}ratio": 0.5,
            f"{prefix}nothing": None,
        },
    )
    env = decode(msg)
    attrs = context_attributes(env)
    assert attrs["id"] == "id-1"
    assert attrs["specversion"] == "1.0"
    assert attrs["time"] == "2024-01-02T03:04:05Z"
    assert attrs["count"] == "42"
    assert attrs["flag"] == "false"
    assert attrs["ratio"] == "0.5"
    assert "nothing" not in attrs
    assert "datacontenttype" not in attrs
    assert data_bytes(env) == b"raw"


def test_binary_mode_falls_back_to_properties_for_id_and_time() -> None:
    msg = AmqpMessage(
        body=b"x",
        headers={"ce-specversion": "1.0", "ce-source": "/s", "ce-type": "t"},
        message_id="mid",
        timestamp=datetime(2023, 3, 4, 5, 6, 7, tzinfo=UTC),
    )
    attrs = binary_attributes(msg)
    assert attrs["id"] == "mid"
    assert attrs["time"] == "2023-03-04T05:06:07Z"


def test_binary_mode_missing_required_attribute_is_rejected() -> None:
    msg = AmqpMessage(body=b"x", headers={"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t"})
    with pytest.raises(Rejected, match="source"):
        decode(msg)


def test_binary_mode_bad_header_values_are_rejected() -> None:
    with pytest.raises(Rejected, match="UTF-8"):
        header_str(b"\xff\xfe")
    with pytest.raises(Rejected, match="scalar"):
        header_str({"nested": "table"})
    with pytest.raises(Rejected, match="timestamp"):
        decode(
            AmqpMessage(
                body=b"",
                headers={"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/", "ce-type": "t", "ce-time": "x"},
            )
        )


def test_structured_json() -> None:
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "s-1",
            "source": "/src",
            "type": "com.example.t",
            "time": "2024-02-03T04:05:06Z",
            "datacontenttype": "application/json",
            "data": {"k": "v"},
        }
    ).encode()
    msg = AmqpMessage(body=body, content_type="application/cloudevents+json; charset=utf-8", routing_key="a.b")
    assert detect_mode(msg) == "structured"
    env = decode(msg)
    assert (env.id, env.source, env.type) == ("s-1", "/src", "com.example.t")
    assert attribute(env, "time") == "2024-02-03T04:05:06Z"
    assert json.loads(data_bytes(env)) == {"k": "v"}
    assert env.provenance.topic == "a.b"


def test_protobuf_clears_sender_provenance() -> None:
    env = sample_event()
    forged = Envelope()
    forged.CopyFrom(env)
    body = forged.SerializeToString()  # with the forged provenance, unlike to_protobuf
    out = decode(AmqpMessage(body=body, content_type="application/cloudevents+protobuf", routing_key="r"))
    assert out.provenance.inbound == "commands"
    assert context_attributes(out) == context_attributes(env)


def test_user_id_is_the_broker_vouched_user_in_every_mode() -> None:
    env = sample_event()
    forged = Envelope()
    forged.CopyFrom(env)
    forged.provenance.vouched_user = "admin"  # a sender's claim: never kept
    messages = {
        "raw": AmqpMessage(body=b"42", routing_key="r"),
        "binary": from_envelope(env, "binary"),
        "structured": from_envelope(env, "structured"),
        "protobuf": AmqpMessage(body=forged.SerializeToString(), content_type="application/cloudevents+protobuf"),
    }
    for mode, msg in messages.items():
        assert detect_mode(msg) == mode
        vouched = decode(dataclasses.replace(msg, user_id="device-7"))
        assert vouched.provenance.vouched_user == "device-7", mode
        assert "device-7" not in context_attributes(vouched).values(), mode  # provenance, not an attribute
        assert decode(msg).provenance.vouched_user == "", mode  # the broker says nothing: nobody
    assert from_envelope(vouched, "binary").user_id is None  # never written on the way out


def test_raw_uses_properties_and_templates() -> None:
    when = datetime(2024, 6, 7, 8, 9, 10, tzinfo=UTC)
    msg = AmqpMessage(
        body=b"\x00\x01binary",
        routing_key="devices.d42.telemetry",
        content_type="application/octet-stream",
        message_id="m-7",
        timestamp=when,
        headers={"x-foo": "bar"},
    )
    assert detect_mode(msg) == "raw"
    env = decode(
        msg,
        type=Template.compile("com.example.{topic.-1}"),
        source=Template.compile("amqp://host/{topic.1}"),
    )
    assert context_attributes(env) == {
        "specversion": "1.0",
        "id": "m-7",
        "source": "amqp://host/d42",
        "type": "com.example.telemetry",
        "time": "2024-06-07T08:09:10Z",
        "datacontenttype": "application/octet-stream",
    }
    assert data_bytes(env) == b"\x00\x01binary"
    assert not env.provenance.id_minted  # the sender's message_id: it may repeat, dedup applies


def test_raw_without_properties_gets_uuid_and_now() -> None:
    now = Timestamp()
    now.FromJsonString("2030-01-01T00:00:00Z")
    env = to_envelope(
        AmqpMessage(body=b"x", routing_key="k"),
        inbound="in",
        type_template=TYPE,
        source_template=SOURCE,
        now=now,
    )
    uuid.UUID(env.id)
    assert env.provenance.id_minted
    assert attribute(env, "time") == "2030-01-01T00:00:00Z"
    assert env.provenance.received == now
    assert env.source == "amqp://in"
    assert env.type == "io.mediator.amqp.message"
    assert "datacontenttype" not in env.attributes


def test_raw_template_error_is_rejected() -> None:
    with pytest.raises(Rejected, match="no segment 5"):
        decode(AmqpMessage(body=b"x", routing_key="a.b"), source=Template.compile("amqp://{topic.5}"))


def test_decode_raw_ignores_cloudevents_markers() -> None:
    msg = AmqpMessage(body=b"{}", content_type="application/cloudevents+json", headers={"ce-specversion": "1.0"})
    env = decode(msg, "raw")
    assert env.type == "io.mediator.amqp.message"
    assert data_bytes(env) == b"{}"
    assert attribute(env, "datacontenttype") == "application/cloudevents+json"


def test_decode_structured_requires_cloudevents() -> None:
    with pytest.raises(Rejected):
        decode(AmqpMessage(body=b"plain text", content_type="text/plain"), "structured")
    body = b'{"specversion":"1.0","id":"1","source":"/s","type":"t"}'
    assert decode(AmqpMessage(body=body, content_type="application/json"), "structured").id == "1"


def test_undecodable_wraps_raw_bytes() -> None:
    env = undecodable(AmqpMessage(body=b"\xff", routing_key="x.y", content_type="weird/type"), "commands")
    assert env.type == UNDECODABLE_TYPE
    assert env.source == "commands"
    assert data_bytes(env) == b"\xff"
    assert attribute(env, "datacontenttype") == "weird/type"
    assert env.provenance.topic == "x.y"
    assert env.provenance.protocol == "amqp"


# ---------------------------------------------------------------- outbound golden cases


@pytest.mark.parametrize("prefix", HEADER_PREFIXES)
def test_from_envelope_binary(prefix: str) -> None:
    out = from_envelope(sample_event(), "binary", prefix)
    assert out.body == b'{"order":1}'
    assert out.content_type == "application/json"
    assert out.message_id == "evt-1"
    assert out.type == "com.example.order.created"
    assert out.timestamp == datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert out.headers == {
        f"{prefix}specversion": "1.0",
        f"{prefix}id": "evt-1",
        f"{prefix}source": "/orders",
        f"{prefix}type": "com.example.order.created",
        f"{prefix}time": "2024-05-06T07:08:09.123456789Z",
        f"{prefix}subject": "order-1",
        f"{prefix}priority": "7",
        f"{prefix}urgent": "true",
    }
    assert not any("inbound" in str(v) for v in out.headers.values())


def test_from_envelope_structured_and_protobuf() -> None:
    env = sample_event()
    structured = from_envelope(env, "structured")
    assert structured.content_type == "application/cloudevents+json"
    doc = json.loads(structured.body)
    assert doc["id"] == "evt-1"
    assert doc["data"] == {"order": 1}
    assert doc["priority"] == 7
    assert structured.headers == {}
    assert structured.message_id == "evt-1"

    proto = from_envelope(env, "protobuf")
    assert proto.content_type == "application/cloudevents+protobuf"
    assert proto.body == to_protobuf(env)
    parsed = Envelope()
    parsed.ParseFromString(proto.body)
    assert not parsed.HasField("provenance")


def test_from_envelope_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        from_envelope(sample_event(), "xml")


def test_from_envelope_without_time_or_content_type() -> None:
    env = Envelope(id="1", source="/s", spec_version="1.0", type="t")
    env.binary_data = b"d"
    out = from_envelope(env, "binary")
    assert out.timestamp is None
    assert out.content_type is None
    assert "cloudEvents_time" not in out.headers


# ---------------------------------------------------------------- round trips

_RESERVED = {"id", "source", "specversion", "type", "time", "datacontenttype", "dataschema", "data"}
_names = st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True).filter(lambda n: n not in _RESERVED)
_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)
_ext_values = st.one_of(
    _text.map(lambda s: ("s", s)),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: ("i", i)),
    st.booleans().map(lambda b: ("b", b)),
)


@st.composite
def envelopes(draw: st.DrawFn, content_types: st.SearchStrategy[str | None]) -> Envelope:
    env = Envelope(id=draw(_text), source=draw(_text), spec_version="1.0", type=draw(_text))
    seconds = draw(st.integers(0, 253402300799))  # up to 9999-12-31
    nanos = draw(st.integers(0, 999_999_999))
    env.attributes["time"].ce_timestamp.seconds = seconds
    env.attributes["time"].ce_timestamp.nanos = nanos
    ct = draw(content_types)
    if ct is not None:
        env.attributes["datacontenttype"].ce_string = ct
    for name, (kind, value) in draw(st.dictionaries(_names, _ext_values, max_size=5)).items():
        if kind == "s":
            env.attributes[name].ce_string = str(value)
        elif kind == "i":
            env.attributes[name].ce_integer = int(value)
        else:
            env.attributes[name].ce_boolean = bool(value)
    env.binary_data = draw(st.binary(max_size=256))
    return env


def _over_the_wire(msg: AmqpMessage, routing_key: str) -> AmqpMessage:
    """What a consumer sees: AMQP timestamps have whole seconds only."""
    ts = msg.timestamp.replace(microsecond=0) if msg.timestamp is not None else None
    return AmqpMessage(
        body=msg.body,
        routing_key=routing_key,
        content_type=msg.content_type,
        headers=msg.headers,
        message_id=msg.message_id,
        timestamp=ts,
        type=msg.type,
    )


@settings(max_examples=150, deadline=None)
@given(
    env=envelopes(st.one_of(st.none(), st.sampled_from(["application/json", "application/octet-stream"]))),
    prefix=st.sampled_from(HEADER_PREFIXES),
    fmt=st.sampled_from(["binary", "protobuf"]),
)
def test_round_trip_binary_and_protobuf(env: Envelope, prefix: str, fmt: str) -> None:
    wire = _over_the_wire(from_envelope(env, fmt, prefix), "a.b.c")
    back = decode(wire)
    assert context_attributes(back) == context_attributes(env)
    assert data_bytes(back) == data_bytes(env)
    assert back.provenance.topic == "a.b.c"


@settings(max_examples=100, deadline=None)
@given(env=envelopes(st.sampled_from(["application/octet-stream", "image/png"])))
def test_round_trip_structured(env: Envelope) -> None:
    back = decode(_over_the_wire(from_envelope(env, "structured"), "k"))
    assert context_attributes(back) == context_attributes(env)
    assert data_bytes(back) == data_bytes(env)


@settings(max_examples=50, deadline=None)
@given(seconds=st.integers(0, 2**32 - 1), body=st.binary(max_size=64))
def test_raw_timestamp_property_becomes_time(seconds: int, body: bytes) -> None:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    env = decode(AmqpMessage(body=body, timestamp=when, message_id="x"))
    assert env.attributes["time"].ce_timestamp.seconds == seconds
    assert data_bytes(env) == body


def test_the_timestamp_property_is_the_time_attribute() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        ts = Timestamp(seconds=rng.randint(-62135596800, 253402300799), nanos=rng.randint(0, 10**9 - 1))
        env = new_event(type="t", source="/s", data=b"", id="x")
        env.attributes["time"].ce_timestamp.CopyFrom(ts)
        # Before the epoch: no AMQP timestamp (an unsigned count of seconds), the time travels as the header.
        want = ts.ToDatetime(tzinfo=UTC) if ts.seconds >= 0 else None
        assert from_envelope(env, "binary").timestamp == want
    env.attributes["time"].ce_timestamp.seconds = 10**15  # past year 9999
    with pytest.raises(ValueError, match="out of range"):
        from_envelope(env, "binary")


@pytest.mark.parametrize("fmt", ["binary", "structured", "protobuf"])
def test_a_time_before_the_epoch_has_no_amqp_timestamp(fmt: str) -> None:
    """Found by schemathesis (tests/adapters/test_openapi.py): time 0003-03-27T19:09:46Z made pamqp raise
    struct.error while encoding the (unsigned) timestamp property: a 500 on request-reply."""
    from adapters.amqp.speedups import FastProperties

    env = sample_event()
    env.attributes["time"].ce_timestamp.FromJsonString("0003-03-27T19:09:46.045460Z")
    msg = from_envelope(env, fmt)
    assert msg.timestamp is None
    FastProperties(message_id=msg.message_id, timestamp=msg.timestamp, headers=msg.headers).marshal()  # type: ignore[arg-type]
    if fmt == "binary":
        assert msg.headers["cloudEvents_time"] == "0003-03-27T19:09:46.045460Z"
    env.attributes["time"].ce_timestamp.FromJsonString("1970-01-01T00:00:00Z")
    assert from_envelope(env, fmt).timestamp == datetime(1970, 1, 1, tzinfo=UTC)
