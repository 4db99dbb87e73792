"""CloudEvents JSON (structured and batch) and Protobuf formats: golden cases and round trips."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.core.envelope import Envelope, context_attributes, data_bytes, new_event
from mediator.core.errors import RejectCode, Rejected
from mediator.core.formats import (
    from_batch,
    from_protobuf,
    from_structured,
    to_batch,
    to_json_dict,
    to_protobuf,
    to_structured,
)


def base(data: bytes = b"", content_type: str | None = None) -> Envelope:
    env = Envelope(id="ev-1", source="/sensors/kitchen", spec_version="1.0", type="com.example.reading")
    env.binary_data = data
    if content_type is not None:
        env.attributes["datacontenttype"].ce_string = content_type
    return env


def structured(env: Envelope) -> dict[str, Any]:
    obj = json.loads(to_structured(env))
    assert isinstance(obj, dict)
    return obj


def rejected(body: bytes, fragment: str) -> None:
    with pytest.raises(Rejected) as info:
        from_structured(body)
    assert info.value.code is RejectCode.INVALID
    assert fragment in info.value.reason


# ---------------------------------------------------------------------------------------------- structured: out
def test_json_data_is_embedded_as_json() -> None:
    env = base(b'{"temp": 21.5, "tags": ["a"]}', "application/json")
    assert structured(env) == {
        "specversion": "1.0",
        "id": "ev-1",
        "source": "/sensors/kitchen",
        "type": "com.example.reading",
        "datacontenttype": "application/json",
        "data": {"temp": 21.5, "tags": ["a"]},
    }


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/vnd.x+json", "text/json"]
)
def test_json_media_types_and_absent_content_type_embed_json(content_type: str | None) -> None:
    assert structured(base(b"[1,2]", content_type))["data"] == [1, 2]


def test_invalid_json_under_a_json_content_type_falls_back_to_base64() -> None:
    out = structured(base(b"not json", "application/json"))
    assert "data" not in out
    assert out["data_base64"] == base64.b64encode(b"not json").decode()


def test_text_data_is_a_string() -> None:
    out = structured(base("héllo {world}".encode(), "text/plain"))
    assert out["data"] == "héllo {world}"
    assert "data_base64" not in out
    assert structured(base(b"<a/>", "application/xml"))["data"] == "<a/>"


def test_text_oneof_is_a_string() -> None:
    env = base()
    env.text_data = "plain words"
    env.attributes["datacontenttype"].ce_string = "text/plain"
    assert structured(env)["data"] == "plain words"


def test_binary_data_is_base64() -> None:
    raw = bytes(range(256))
    out = structured(base(raw, "application/octet-stream"))
    assert "data" not in out
    assert base64.b64decode(out["data_base64"]) == raw
    # Text that is not UTF-8 cannot be a JSON string either.
    assert "data_base64" in structured(base(b"\xff\xfe", "text/plain"))


def test_no_data_means_no_data_member() -> None:
    env = Envelope(id="1", source="s", spec_version="1.0", type="t")
    out = structured(env)
    assert "data" not in out
    assert "data_base64" not in out


def test_typed_extensions_and_time() -> None:
    env = base(b"{}", "application/json")
    env.attributes["flag"].ce_boolean = True
    env.attributes["off"].ce_boolean = False
    env.attributes["count"].ce_integer = -42
    env.attributes["blob"].ce_bytes = b"\x00\x01"
    env.attributes["schema"].ce_uri = "https://example.com/s"
    env.attributes["time"].ce_timestamp.FromJsonString("2024-02-29T12:34:56.789Z")
    out = structured(env)
    assert out["flag"] is True
    assert out["off"] is False
    assert out["count"] == -42
    assert out["blob"] == "AAE="
    assert out["schema"] == "https://example.com/s"
    assert out["time"] == "2024-02-29T12:34:56.789Z"


def test_structured_output_is_compact_utf8() -> None:
    body = to_structured(base("ü".encode(), "text/plain"))
    assert "ü".encode() in body  # not \u00fc
    assert b", " not in body
    assert b": " not in body


# ---------------------------------------------------------------------------------------------- structured: in
def test_from_structured_json_data() -> None:
    env = from_structured(
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","datacontenttype":"application/json",'
        b'"data":{"k":[1,true,null]},"count":3,"flag":false,"time":"2024-01-02T03:04:05+01:00","nothing":null}'
    )
    assert (env.id, env.source, env.type, env.spec_version) == ("a", "/s", "t", "1.0")
    assert json.loads(data_bytes(env)) == {"k": [1, True, None]}
    assert env.attributes["count"].ce_integer == 3
    assert env.attributes["flag"].WhichOneof("attr") == "ce_boolean"
    assert env.attributes["flag"].ce_boolean is False
    assert context_attributes(env)["time"] == "2024-01-02T02:04:05Z"  # normalised to UTC
    assert "nothing" not in env.attributes


def test_from_structured_text_and_base64() -> None:
    text = from_structured(
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","datacontenttype":"text/plain","data":"hi"}'
    )
    assert data_bytes(text) == b"hi"
    raw = from_structured(b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data_base64":"AP8="}')
    assert data_bytes(raw) == b"\x00\xff"


def test_from_structured_json_string_data_stays_json() -> None:
    env = from_structured(b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":"hi"}')
    assert data_bytes(env) == b'"hi"'  # no content type means JSON: the string is a JSON value


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"specversion":"1.0","source":"/s","type":"t"}', "missing required attribute(s): id"),
        (b'{"specversion":"1.0","id":"","source":"/s","type":"t"}', "id"),
        (b'{"id":"a","source":"/s","type":"t"}', "specversion"),
        (b'{"specversion":"0.3","id":"a","source":"/s","type":"t"}', "unsupported specversion"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","Bad_Name":"x"}', "invalid attribute name"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","UPPER":1}', "invalid attribute name"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t"', "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":1,"data_base64":"AA=="}', "both"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data_base64":"!!"}', "not valid base64"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data_base64":5}', "must be a string"),
        (b'{"specversion":"1.0","id":7,"source":"/s","type":"t"}', "must be a string"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","time":"yesterday"}', "RFC 3339"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","n":2147483648}', "32-bit"),
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t","obj":{}}', "string, integer or boolean"),
    ],
)
def test_from_structured_rejects(body: bytes, fragment: str) -> None:
    rejected(body, fragment)


# ---------------------------------------------------------------------------------------------- batch
def test_batch_round_trip() -> None:
    first = base(b'{"n":1}', "application/json")
    second = base(b"two", "text/plain")
    second.id = "ev-2"
    body = to_batch([first, second])
    assert [e["id"] for e in json.loads(body)] == ["ev-1", "ev-2"]
    back = from_batch(body)
    assert [e.id for e in back] == ["ev-1", "ev-2"]
    assert json.loads(data_bytes(back[0])) == {"n": 1}
    assert data_bytes(back[1]) == b"two"


def test_empty_batch() -> None:
    assert to_batch([]) == b"[]"
    assert from_batch(b"[]") == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"specversion":"1.0","id":"a","source":"/s","type":"t"}', "JSON array"),
        (b"[1]", "JSON object"),
        (b'[{"specversion":"1.0","id":"a","source":"/s","type":"t"},{"specversion":"1.0"}]', "missing"),
        (b"[", "not valid JSON"),
    ],
)
def test_batch_rejects(body: bytes, fragment: str) -> None:
    with pytest.raises(Rejected) as info:
        from_batch(body)
    assert info.value.code is RejectCode.INVALID
    assert fragment in info.value.reason


# ---------------------------------------------------------------------------------------------- protobuf
def with_provenance() -> Envelope:
    env = new_event(type="t", source="/s", data=b"\x01\x02", content_type="application/octet-stream", id="p-1")
    env.provenance.inbound = "edge"
    env.provenance.topic = "a/b"
    env.provenance.principal = "alice"
    return env


def test_to_protobuf_strips_provenance_without_touching_the_original() -> None:
    env = with_provenance()
    out = Envelope.FromString(to_protobuf(env))
    assert not out.HasField("provenance")
    assert (out.id, out.binary_data) == ("p-1", b"\x01\x02")
    assert env.provenance.principal == "alice"


def test_to_protobuf_without_provenance() -> None:
    env = base(b"x")
    assert Envelope.FromString(to_protobuf(env)) == env


def test_from_protobuf_clears_forged_provenance() -> None:
    forged = with_provenance().SerializeToString()
    env = from_protobuf(forged)
    assert not env.HasField("provenance")
    assert env.id == "p-1"
    assert data_bytes(env) == b"\x01\x02"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\x0a\x05ab", "not a CloudEvents Protobuf"),  # truncated length-delimited field
        (b"", "missing required attribute(s): id, source, specversion, type"),
        (Envelope(id="a", source="s", spec_version="0.3", type="t").SerializeToString(), "specversion"),
    ],
)
def test_from_protobuf_rejects(body: bytes, fragment: str) -> None:
    with pytest.raises(Rejected) as info:
        from_protobuf(body)
    assert info.value.code is RejectCode.INVALID
    assert fragment in info.value.reason


def test_from_protobuf_rejects_bad_attribute_names() -> None:
    env = base()
    env.attributes["Bad-Name"].ce_string = "x"
    with pytest.raises(Rejected, match="invalid attribute name"):
        from_protobuf(env.SerializeToString())


# ---------------------------------------------------------------------------------------------- round trips
# Names the format gives a meaning of its own (or a non-string type) are left out of the random extensions.
RESERVED = {"id", "source", "specversion", "type", "data", "time", "datacontenttype", "dataschema"}
NAMES = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(lambda n: n not in RESERVED)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    env = Envelope(
        id=draw(st.text(min_size=1, max_size=40)),
        source=draw(st.text(min_size=1, max_size=40)),
        spec_version="1.0",
        type=draw(st.text(min_size=1, max_size=40)),
    )
    for name, value in draw(st.dictionaries(NAMES, st.text(max_size=30), max_size=5)).items():
        env.attributes[name].ce_string = value
    if draw(st.booleans()):
        seconds = draw(st.integers(0, 253402300799))  # 0001-01-01 .. 9999-12-31 (RFC 3339 range)
        env.attributes["time"].ce_timestamp.FromSeconds(seconds - 62135596800)
        env.attributes["time"].ce_timestamp.nanos = draw(st.integers(0, 999_999_999))
    kind = draw(st.sampled_from(["json", "text", "binary"]))
    if kind == "json":
        env.attributes["datacontenttype"].ce_string = "application/json"
        env.binary_data = json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "text":
        env.attributes["datacontenttype"].ce_string = "text/plain; charset=utf-8"
        env.binary_data = draw(st.text(max_size=50)).encode()
    else:
        env.attributes["datacontenttype"].ce_string = "application/octet-stream"
        env.binary_data = draw(st.binary(max_size=50))
    return env


def assert_same_event(before: Envelope, after: Envelope) -> None:
    assert context_attributes(after) == context_attributes(before)
    if before.attributes["datacontenttype"].ce_string == "application/json":
        assert json.loads(data_bytes(after)) == json.loads(data_bytes(before))
    else:
        assert data_bytes(after) == data_bytes(before)


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_structured_round_trip(env: Envelope) -> None:
    assert_same_event(env, from_structured(to_structured(env)))


@settings(max_examples=100, deadline=None)
@given(st.lists(envelopes(), max_size=5))
def test_batch_round_trip_property(events: list[Envelope]) -> None:
    back = from_batch(to_batch(events))
    assert len(back) == len(events)
    for before, after in zip(events, back, strict=True):
        assert_same_event(before, after)


@settings(max_examples=300, deadline=None)
@given(envelopes(), st.text(max_size=10))
def test_protobuf_round_trip(env: Envelope, inbound: str) -> None:
    env.provenance.inbound = inbound
    after = from_protobuf(to_protobuf(env))
    assert_same_event(env, after)
    assert after.binary_data == env.binary_data  # protobuf keeps the bytes exactly
    assert not after.HasField("provenance")


def test_to_json_dict_is_what_to_structured_writes() -> None:
    env = base(b'{"a":1}', "application/json")
    assert json.loads(to_structured(env)) == to_json_dict(env)
