"""The gRPC binding: request envelope -> validated inbound envelope; outbound envelope -> subscriber's."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.grpc.codec import REJECT_STATUS, code_number, from_envelope, to_envelope
from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import RejectCode, Rejected
from mediator.v1.envelope_pb2 import Provenance

RECEIVED_NS = 1_700_000_000_123_456_789


def sample() -> Envelope:
    env = new_event(
        type="com.example.order.created",
        source="/orders",
        data=b'{"order":42}',
        content_type="application/json",
        id="ev-1",
        subject="42",
    )
    env.attributes["tenant"].ce_string = "acme"
    return env


def test_to_envelope_sets_provenance_and_keeps_the_event() -> None:
    original = sample()
    request = Envelope()
    request.CopyFrom(original)
    env = to_envelope(request, inbound="api", method="Publish", received_ns=RECEIVED_NS)
    prov = env.provenance
    assert (prov.inbound, prov.protocol, prov.topic, prov.topic_separator) == ("api", "grpc", "Publish", "/")
    assert prov.received.ToNanoseconds() == RECEIVED_NS
    assert (prov.principal, dict(prov.claims)) == ("", {})
    env.ClearField("provenance")
    assert env == original


def test_to_envelope_discards_the_senders_provenance() -> None:
    request = sample()
    request.provenance.CopyFrom(
        Provenance(inbound="forged", protocol="mqtt", principal="admin", claims={"role": "root"}, topic="x")
    )
    env = to_envelope(request, inbound="api", method="PublishStream", received_ns=RECEIVED_NS)
    assert env.provenance == Provenance(
        inbound="api", protocol="grpc", topic="PublishStream", topic_separator="/", received=env.provenance.received
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", "", "id"),
        ("source", "", "source"),
        ("type", "", "type"),
        ("spec_version", "", "specversion"),
        ("spec_version", "0.3", "specversion"),
    ],
)
def test_to_envelope_rejects_invalid_events(field: str, value: str, message: str) -> None:
    request = sample()
    setattr(request, field, value)
    with pytest.raises(Rejected, match=message) as info:
        to_envelope(request, inbound="api", method="Publish", received_ns=RECEIVED_NS)
    assert info.value.code is RejectCode.INVALID


def test_to_envelope_rejects_bad_attribute_names() -> None:
    request = sample()
    request.attributes["Bad-Name"].ce_string = "x"
    with pytest.raises(Rejected, match="Bad-Name"):
        to_envelope(request, inbound="api", method="Publish", received_ns=RECEIVED_NS)


def test_every_reject_code_has_a_status() -> None:
    assert set(REJECT_STATUS) == set(RejectCode)
    assert REJECT_STATUS[RejectCode.INVALID] is grpc.StatusCode.INVALID_ARGUMENT
    assert REJECT_STATUS[RejectCode.UNAUTHENTICATED] is grpc.StatusCode.UNAUTHENTICATED
    assert REJECT_STATUS[RejectCode.FORBIDDEN] is grpc.StatusCode.PERMISSION_DENIED
    assert REJECT_STATUS[RejectCode.RATE_LIMITED] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc.StatusCode.OK not in REJECT_STATUS.values()


def test_code_numbers_are_google_rpc_codes() -> None:
    assert code_number(grpc.StatusCode.OK) == 0
    assert code_number(grpc.StatusCode.INVALID_ARGUMENT) == 3
    assert code_number(grpc.StatusCode.PERMISSION_DENIED) == 7
    assert code_number(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
    assert code_number(grpc.StatusCode.UNAVAILABLE) == 14
    assert code_number(grpc.StatusCode.UNAUTHENTICATED) == 16


def test_from_envelope_strips_provenance_without_touching_the_event() -> None:
    event = sample()
    event.provenance.CopyFrom(Provenance(inbound="devices", protocol="mqtt", topic="a/b", topic_separator="/"))
    out = from_envelope(event)
    assert not out.HasField("provenance")
    assert event.HasField("provenance")
    event.ClearField("provenance")
    assert out == event


def test_from_envelope_without_provenance_is_the_event_itself() -> None:
    event = sample()
    assert from_envelope(event) is event


# ---------------------------------------------------------------- round trips

_names = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
    lambda n: n not in {"id", "source", "specversion", "type", "time", "datacontenttype"}
)
_text = st.text(min_size=1, max_size=40)


@st.composite
def events(draw: st.DrawFn) -> Envelope:
    env = Envelope(id=draw(_text), source=draw(_text), spec_version="1.0", type=draw(_text))
    env.attributes["time"].ce_timestamp.FromNanoseconds(draw(st.integers(0, 4_102_444_800 * 10**9)))
    content_type = draw(st.none() | st.sampled_from(["application/json", "text/plain", "application/octet-stream"]))
    if content_type is not None:
        env.attributes["datacontenttype"].ce_string = content_type
    for name, value in draw(st.dictionaries(_names, st.one_of(_text, st.integers(-(2**31), 2**31 - 1)))).items():
        if isinstance(value, int):
            env.attributes[name].ce_integer = value
        else:
            env.attributes[name].ce_string = value
    data = draw(st.one_of(st.binary(max_size=200), st.text(max_size=50), st.none()))
    if isinstance(data, bytes):
        env.binary_data = data
    elif isinstance(data, str):
        env.text_data = data
    return env


@given(events(), st.booleans())
def test_round_trip_publish_then_subscribe(event: Envelope, forged: bool) -> None:
    wire = Envelope()
    wire.CopyFrom(event)
    if forged:
        wire.provenance.inbound = "forged"
    # What a client sends goes through the wire format, then in and out of the gateway.
    request = Envelope.FromString(wire.SerializeToString())
    inbound = to_envelope(request, inbound="api", method="Publish", received_ns=RECEIVED_NS)
    assert inbound.provenance.inbound == "api"
    delivered = Envelope.FromString(from_envelope(inbound).SerializeToString())
    assert delivered == event
    assert (delivered.id, delivered.source, delivered.type) == (event.id, event.source, event.type)
    assert delivered.attributes["time"] == event.attributes["time"]
    assert delivered.WhichOneof("data") == event.WhichOneof("data")
