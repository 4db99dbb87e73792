"""CloudEvents HTTP binding codec: golden cases from the spec and hypothesis round trips."""

from __future__ import annotations

import email.utils
import json
import string
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.http import codec
from mediator.core import formats
from mediator.core.envelope import Envelope, context_attributes, data_bytes, from_context_attributes
from mediator.core.errors import RejectCode, Rejected

# ---------------------------------------------------------------- header values (spec 3.1.3.2)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("Euro \u20ac \U0001f600", "Euro%20%E2%82%AC%20%F0%9F%98%80"),  # the spec's own example
        ("plain-ascii/1.0?x=y&z", "plain-ascii/1.0?x=y&z"),
        ('say "hi"', "say%20%22hi%22"),
        ("100%", "100%25"),
        ("tab\there", "tab%09here"),
        ("del\x7f", "del%7F"),
        ("", ""),
    ],
)
def test_header_value_golden(value: str, encoded: str) -> None:
    assert codec.encode_header_value(value) == encoded
    assert codec.decode_header_value(encoded) == value


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("euro%e2%82%ac", "euro\u20ac"),  # lower-case hex must be accepted
        ("%41%42", "AB"),  # unnecessary encoding must be accepted
        ('"quoted value"', "quoted value"),  # older senders: RFC 7230 quoted-string
        ('"a \\"b\\" c"', 'a "b" c'),
        ('"50%25"', "50%"),  # quotes removed first, then one round of percent-decoding
        ("%2541", "%41"),  # exactly one round
    ],
)
def test_header_value_decoding(header: str, value: str) -> None:
    assert codec.decode_header_value(header) == value


@pytest.mark.parametrize("header", ["%C0%A0", "%FF", "%E2%82"])
def test_header_value_invalid_utf8_is_rejected(header: str) -> None:
    with pytest.raises(Rejected) as info:
        codec.decode_header_value(header)
    assert info.value.code is RejectCode.INVALID


@given(st.text())
def test_header_value_round_trip(value: str) -> None:
    encoded = codec.encode_header_value(value)
    assert all("\x21" <= c <= "\x7e" and c not in '"' for c in encoded)
    assert codec.decode_header_value(encoded) == value


# ---------------------------------------------------------------- binary mode


SPEC_EXAMPLE = {
    "ce-specversion": "1.0",
    "ce-type": "com.example.someevent",
    "ce-time": "2018-04-05T03:56:24Z",
    "ce-id": "1234-1234-1234",
    "ce-source": "/mycontext/subcontext",
    "Content-Type": "application/json; charset=utf-8",
    "Content-Length": "13",
    "Host": "webhook.example.com",
}


def test_from_binary_spec_example() -> None:
    env = codec.from_binary(SPEC_EXAMPLE, b'{"a": "b"}\n')
    assert context_attributes(env) == {
        "specversion": "1.0",
        "id": "1234-1234-1234",
        "source": "/mycontext/subcontext",
        "type": "com.example.someevent",
        "time": "2018-04-05T03:56:24Z",
        "datacontenttype": "application/json; charset=utf-8",
    }
    assert data_bytes(env) == b'{"a": "b"}\n'


def test_from_binary_is_case_insensitive_and_decodes_values() -> None:
    headers = {
        "CE-SpecVersion": "1.0",
        "Ce-Id": "x",
        "ce-source": "urn:a%20b",
        "ce-type": "t",
        "ce-myext": '"quoted"',
    }
    env = codec.from_binary(headers, b"")
    assert (env.id, env.source) == ("x", "urn:a b")
    assert env.attributes["myext"].ce_string == "quoted"
    assert "datacontenttype" not in env.attributes


def test_to_binary_golden() -> None:
    env = from_context_attributes(
        {
            "specversion": "1.0",
            "id": "A234-1234-1234",
            "source": "/mycontext",
            "type": "com.example.someevent",
            "time": "2018-04-05T17:31:00Z",
            "subject": "Euro \u20ac",
            "datacontenttype": "text/xml",
            "comexampleextension1": "value",
        },
        b'<much wow="xml"/>',
    )
    headers, body = codec.to_binary(env)
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "A234-1234-1234",
        "ce-source": "/mycontext",
        "ce-type": "com.example.someevent",
        "ce-time": "2018-04-05T17:31:00Z",
        "ce-subject": "Euro%20%E2%82%AC",
        "Content-Type": "text/xml",
        "ce-comexampleextension1": "value",
    }
    assert body == b'<much wow="xml"/>'


def test_to_binary_never_writes_provenance() -> None:
    env = codec.from_binary(SPEC_EXAMPLE, b"{}")
    env.provenance.inbound = "secret"
    headers, _ = codec.to_binary(env)
    assert "secret" not in json.dumps(headers)


@pytest.mark.parametrize(
    "headers",
    [
        {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s"},
        {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "t", "ce-Bad_Name": "v"},
        {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "t", "ce-time": "yesterday"},
    ],
)
def test_from_binary_invalid(headers: dict[str, str]) -> None:
    with pytest.raises(Rejected) as info:
        codec.from_binary(headers, b"")
    assert info.value.code is RejectCode.INVALID


# ---------------------------------------------------------------- mode detection


def test_to_envelopes_detects_each_mode() -> None:
    env = codec.from_binary(SPEC_EXAMPLE, b'{"a":1}')
    structured = {"content-type": "application/cloudevents+json; charset=UTF-8"}
    assert codec.to_envelopes(structured, formats.to_structured(env), max_batch=10)[0].id == env.id
    batch = {"Content-Type": formats.BATCH_CONTENT_TYPE}
    assert len(codec.to_envelopes(batch, formats.to_batch([env, env]), max_batch=10)) == 2
    proto = {"Content-Type": formats.PROTOBUF_CONTENT_TYPE}
    assert codec.to_envelopes(proto, formats.to_protobuf(env), max_batch=10)[0].id == env.id
    assert codec.to_envelopes(SPEC_EXAMPLE, b"{}", max_batch=10)[0].id == env.id
    assert codec.to_envelope(SPEC_EXAMPLE, b"{}").id == env.id


def test_to_envelopes_refuses_what_is_no_cloudevent() -> None:
    with pytest.raises(Rejected) as info:
        codec.to_envelopes({"Content-Type": "application/json"}, b"{}", max_batch=10)
    assert info.value.code is RejectCode.UNSUPPORTED_MEDIA
    with pytest.raises(Rejected) as info:
        codec.to_envelope({"Content-Type": formats.BATCH_CONTENT_TYPE}, b"[]")
    assert info.value.code is RejectCode.UNSUPPORTED_MEDIA


def test_batch_limit_and_index_in_reason() -> None:
    good = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    with pytest.raises(Rejected) as info:
        codec.from_batch(json.dumps([good] * 3).encode(), max_batch=2)
    assert info.value.code is RejectCode.TOO_LARGE
    with pytest.raises(Rejected, match=r"event \[2\]"):
        codec.from_batch(json.dumps([good, good, {"id": "x"}]).encode(), max_batch=5)


def test_from_envelope_formats() -> None:
    env = codec.from_binary(SPEC_EXAMPLE, b'{"a":1}')
    headers, body = codec.from_envelope(env, "structured")
    assert headers == {"Content-Type": formats.JSON_CONTENT_TYPE}
    assert json.loads(body)["data"] == {"a": 1}
    headers, body = codec.from_envelope(env, "protobuf")
    assert headers == {"Content-Type": formats.PROTOBUF_CONTENT_TYPE}
    assert Envelope.FromString(body).id == env.id
    with pytest.raises(ValueError, match="unknown format"):
        codec.from_envelope(env, "xml")


# ---------------------------------------------------------------- Retry-After


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert codec.parse_retry_after("120", now) == 120.0
    assert codec.parse_retry_after(" 0 ", now) == 0.0
    assert codec.parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert codec.parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert codec.parse_retry_after("soon", now) is None
    assert codec.parse_retry_after("-5", now) is None
    assert codec.parse_retry_after(None, now) is None


# ---------------------------------------------------------------- round trips

_RESERVED = {"id", "source", "specversion", "type", "time", "datacontenttype", "data", "dataschema"}
_names = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=20).filter(lambda n: n not in _RESERVED)
_timestamps = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1)).map(
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%S") + (f".{d.microsecond:06d}" if d.microsecond else "") + "Z"
)
_content_types = st.sampled_from(
    [None, "application/json", "text/plain; charset=utf-8", "application/octet-stream", "application/x-\u00e9"]
)


@st.composite
def events(draw: st.DrawFn) -> Envelope:
    attrs = {
        "specversion": "1.0",
        "id": draw(st.text(min_size=1)),
        "source": draw(st.text(min_size=1)),
        "type": draw(st.text(min_size=1)),
    }
    if draw(st.booleans()):
        attrs["time"] = draw(_timestamps)
    content_type = draw(_content_types)
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    for name, value in draw(st.dictionaries(_names, st.text(), max_size=4)).items():
        attrs[name] = value
    return from_context_attributes(attrs, draw(st.binary(max_size=256)))


def _same(a: Envelope, b: Envelope) -> None:
    assert context_attributes(a) == context_attributes(b)
    assert data_bytes(a) == data_bytes(b)


@settings(max_examples=200)
@given(events())
def test_binary_round_trip(env: Envelope) -> None:
    headers, body = codec.from_envelope(env, "binary")
    assert all(v.isascii() and " " not in v for k, v in headers.items() if k.startswith("ce-"))
    _same(codec.to_envelope(headers, body), env)


@settings(max_examples=200)
@given(events())
def test_protobuf_round_trip(env: Envelope) -> None:
    headers, body = codec.from_envelope(env, "protobuf")
    _same(codec.to_envelope(headers, body), env)


@settings(max_examples=200)
@given(events())
def test_structured_round_trip(env: Envelope) -> None:
    headers, body = codec.from_envelope(env, "structured")
    got = codec.to_envelope(headers, body)
    assert context_attributes(got) == context_attributes(env)
    if formats.is_json(context_attributes(env).get("datacontenttype")):
        # JSON data travels as a JSON value: equal as JSON when it parses, byte-exact (base64) otherwise.
        try:
            expected = json.loads(data_bytes(env))
        except ValueError:
            assert data_bytes(got) == data_bytes(env)
        else:
            assert json.loads(data_bytes(got)) == expected
    else:
        assert data_bytes(got) == data_bytes(env)


def test_structured_empty_data() -> None:
    env = codec.from_binary(SPEC_EXAMPLE, b"")
    headers, body = codec.from_envelope(env, "structured")
    assert data_bytes(codec.to_envelope(headers, body)) == b""
