"""The pure pieces of transformation and conversion: each field operation, their order, values from
templates, what fails and why, the JSONata bound (reset per evaluation), Protobuf and Avro converters,
and the config's key paths for all of it."""

from __future__ import annotations

import io
import json
import struct
import time
import tomllib
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from pydantic import ValidationError

from mediator.config import parse
from mediator.core.content import parsed
from mediator.core.convert import ConvertConfig, Converter
from mediator.core.envelope import Envelope, attribute, new_event
from mediator.core.errors import ConfigError
from mediator.core.transform import JsonataProgram, Transform, TransformConfig, TransformError
from mediator.registry import load_specs

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "config.toml").read_text()


def event(data: Any = None, raw: bytes | None = None, **attrs: str) -> Envelope:
    body = raw if raw is not None else orjson.dumps(data if data is not None else {})
    env = new_event(
        type="t", source="/s", data=body, content_type="application/json", subject=attrs.pop("subject", None)
    )
    for name, value in attrs.items():
        env.attributes[name].ce_string = value
    env.provenance.inbound = "orders-http"
    env.provenance.topic = "shop/eu/orders"
    env.provenance.topic_separator = "/"
    return env


def apply(env: Envelope, **cfg: Any) -> tuple[Any, Envelope]:
    out = Transform(TransformConfig(**cfg)).apply(env)
    return orjson.loads(out.binary_data), out


def test_remove_data_fields_and_attributes() -> None:
    env = event({"a": 1, "secret": 2, "nested": {"x": 1, "y": 2}}, tenant="t1")
    data, out = apply(env, remove=["data.secret", "data.nested.y", "data.missing.deep", "tenant"])
    assert data == {"a": 1, "nested": {"x": 1}}
    assert attribute(out, "tenant") is None
    assert orjson.loads(env.binary_data)["secret"] == 2, "the event given is never changed"
    assert attribute(env, "tenant") == "t1"


def test_rename_moves_between_data_and_attributes() -> None:
    env = event({"cust": "c1", "deviceId": 42}, region="eu")
    data, out = apply(
        env,
        rename={
            "data.cust": "data.customer.id",
            "data.deviceId": "subject",
            "region": "data.region",
            "data.none": "data.x",
        },
    )
    assert data == {"customer": {"id": "c1"}, "region": "eu"}
    assert attribute(out, "subject") == "42", "an attribute gets the value's string form"
    assert attribute(out, "region") is None


def test_replace_only_where_present_and_add_only_where_absent() -> None:
    env = event({"status": "new", "total": 5}, subject="dev-7")
    data, out = apply(
        env,
        replace={"data.status": "seen-{topic.1}", "data.absent": "x", "subject": "{subject}-{inbound}"},
        add={"data.total": 0, "data.via": "{inbound}", "data.tags": ["a"], "data.meta.n": 1, "region": "{topic.1}"},
    )
    assert data == {"status": "seen-eu", "total": 5, "via": "orders-http", "tags": ["a"], "meta": {"n": 1}}
    assert attribute(out, "subject") == "dev-7-orders-http"
    assert attribute(out, "region") == "eu"


def test_operations_run_in_kong_order() -> None:
    # remove, then rename (so a renamed field is not removed), replace (sees the rename), add (absent only),
    # promote (after add).
    env = event({"a": 1, "b": 2}, subject="s0")
    data, out = apply(
        env,
        add={"data.b": 99, "data.c": "{subject}"},
        replace={"data.a2": "replaced"},
        rename={"data.a": "data.a2", "data.b": "subject"},
        remove=["data.b"],
        promote={"data.c": "copied"},
    )
    assert data == {"a2": "replaced", "b": 99, "c": "s0"}
    assert attribute(out, "subject") == "s0", "b was removed before the rename could move it"
    assert attribute(out, "copied") == "s0", "promote ran after add"


def test_promote_copies_and_templates_render_after_earlier_operations() -> None:
    env = event({"deviceId": "d1", "n": 3, "ok": True, "obj": {"x": 1}}, subject="s")
    data, out = apply(env, promote={"data.deviceId": "subject", "data.n": "count", "data.ok": "flag"})
    assert data == {"deviceId": "d1", "n": 3, "ok": True, "obj": {"x": 1}}, "promote copies"
    assert (attribute(out, "subject"), attribute(out, "count"), attribute(out, "flag")) == ("d1", "3", "true")
    with pytest.raises(TransformError, match="a dict cannot become an attribute"):
        apply(env, promote={"data.obj": "x"})


def test_failures_say_why() -> None:
    with pytest.raises(TransformError, match="the data is not JSON"):
        Transform(TransformConfig(add={"data.x": 1})).apply(
            new_event(type="t", source="/s", data=b"x", content_type="text/plain")
        )
    with pytest.raises(TransformError, match="JSON list, not an object"):
        apply(event([1, 2]), add={"data.x": 1})
    with pytest.raises(TransformError, match=r"data.a is a int, not an object"):
        apply(event({"a": 1}), add={"data.a.b": 1})
    with pytest.raises(TransformError, match="not an RFC 3339 timestamp"):
        apply(event({"t": "yesterday"}), promote={"data.t": "time"})
    with pytest.raises(TransformError, match="no attribute 'nothere'"):
        apply(event({}), add={"data.x": "{nothere}"})
    with pytest.raises(TransformError, match="not valid JSON"):
        Transform(TransformConfig(add={"data.x": 1})).apply(event(raw=b'{"a": '))


def test_attribute_only_operations_leave_any_data_alone() -> None:
    env = new_event(type="t", source="/s", data=b"\x00\x01binary", content_type="application/octet-stream")
    out = Transform(TransformConfig(add={"subject": "{type}"})).apply(env)
    assert out.binary_data == b"\x00\x01binary"
    assert attribute(out, "subject") == "t"
    untouched = event({"a": 1})
    assert Transform(TransformConfig(remove=["data.zzz"])).apply(untouched) is untouched, "nothing changed: no copy"


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"remove": ["id"]}, "'id' is a required attribute and cannot be removed"),
        ({"remove": ["Data.x"]}, "neither data.FIELD nor an attribute name"),
        ({"rename": {"type": "data.t"}}, "cannot be renamed away"),
        ({"add": {"data.": 1}}, "an empty field name"),
        ({"add": {"subject": [1]}}, "an attribute takes a string, an integer or a boolean"),
        ({"add": {"data.x": "{unbalanced"}}, "unbalanced braces"),
        ({"promote": {"subject": "x"}}, "promote copies a data field"),
        ({"promote": {"data.x": "data.y"}}, "promote writes an attribute"),
        ({"jsonata": "{ 'a': "}, "JSONata"),
        ({}, "an empty transform"),
        ({"add": {"data.x": 1}, "prepend": {}}, "Extra inputs are not permitted"),
    ],
)
def test_transform_config_errors(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TransformConfig(**cfg)


def test_jsonata_with_event_bindings() -> None:
    env = event({"items": [{"q": 2, "p": 3.5}, {"q": 1, "p": 10}]}, subject="alice")
    data, _ = apply(
        env, jsonata='{"n": $count(items), "sum": $sum(items.(q * p)), "who": $event.subject, "in": $event.inbound}'
    )
    assert data == {"n": 2, "sum": 17, "who": "alice", "in": "orders-http"}
    data, _ = apply(event({"a": 1}), jsonata="[1..3]")
    assert data == [1, 2, 3], "a JSONata sequence is written as a list"
    with pytest.raises(TransformError, match="gave no value"):
        apply(event({"a": 1}), jsonata="nothing")


def test_jsonata_bound_per_evaluation() -> None:
    loop = JsonataProgram("( $f := function($x){ $f($x + 1) }; $f(1) )", timeout_s=0.05)
    started = time.monotonic()
    with pytest.raises(TransformError, match=r"ran longer than 0.05 s"):
        loop.evaluate({}, {})
    assert time.monotonic() - started < 0.5
    deep = JsonataProgram("( $f := function($x){ $x > 0 ? 1 + $f($x - 1) : 0 }; $f(5000) )", timeout_s=5.0)
    with pytest.raises(TransformError, match="nests deeper than"):
        deep.evaluate({}, {})
    with pytest.raises(TransformError, match="must not exceed"):
        JsonataProgram("$count([1..10000000])", timeout_s=5.0).evaluate({}, {})
    # The library's own timeout counts from compilation and its depth survives an error: ours does not.
    ok = JsonataProgram("( $f := function($x){ $x > 0 ? 1 + $f($x - 1) : 0 }; $f(20) )", timeout_s=0.05)
    time.sleep(0.1)
    assert ok.evaluate({}, {}) == 20
    with pytest.raises(TransformError):
        deep.evaluate({}, {})
    shallow = JsonataProgram("$x", timeout_s=1.0)
    assert shallow.evaluate({}, {"x": 1}) == 1


def descriptor_set(tmp: Path) -> Path:
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    (tmp / "u.proto").write_text(
        'syntax = "proto3";\npackage unitshop;\nimport "google/protobuf/timestamp.proto";\n'
        "message Order { string order_id = 1; int64 count = 2; google.protobuf.Timestamp at = 3; }\n"
    )
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{tmp}", f"-I{include}", f"--descriptor_set_out={tmp / 'u.pb'}", str(tmp / "u.proto")]
    assert protoc.main([*args, "--include_imports"]) == 0
    assert protoc.main([*args[:3], f"--descriptor_set_out={tmp / 'bare.pb'}", args[4]]) == 0
    return tmp / "u.pb"


def test_protobuf_round_trip_and_its_errors(tmp_path: Path) -> None:
    descriptor_set(tmp_path)
    to_pb = Converter(ConvertConfig(to="protobuf", descriptor_set="u.pb", message="unitshop.Order"), tmp_path)
    to_json = Converter(ConvertConfig(to="json", descriptor_set="u.pb", message="unitshop.Order"), tmp_path)
    original = {"order_id": "o1", "count": "12", "at": "2024-01-01T00:00:00Z"}
    env = event(original, dataschema="https://x.example/order.json")
    pb = to_pb.apply(env, parsed)
    assert attribute(pb, "datacontenttype") == "application/protobuf"
    assert attribute(pb, "dataschema") is None, "the JSON schema no longer describes the data"
    back = to_json.apply(pb, parsed)
    assert attribute(back, "datacontenttype") == "application/json"
    assert orjson.loads(back.binary_data) == original, "int64 is a string in proto3 JSON"
    with pytest.raises(TransformError, match=r"to Protobuf unitshop.Order: field 'order_id' must be a string"):
        to_pb.apply(event({"order_id": 1.5}), parsed)
    with pytest.raises(TransformError, match=r"is not a unitshop.Order"):
        to_json.apply(new_event(type="t", source="/s", data=b"\xff\xff\xff"), parsed)
    with pytest.raises(ValueError, match=r"no message 'unitshop.Nope'.*unitshop.Order"):
        Converter(ConvertConfig(to="protobuf", descriptor_set="u.pb", message="unitshop.Nope"), tmp_path)
    with pytest.raises(ValueError, match="cannot read"):
        Converter(ConvertConfig(to="protobuf", descriptor_set="missing.pb", message="unitshop.Order"), tmp_path)
    # Without --include_imports: the well-known types come from the runtime.
    bare = Converter(ConvertConfig(to="protobuf", descriptor_set="bare.pb", message="unitshop.Order"), tmp_path)
    assert bare.apply(env, parsed).binary_data == pb.binary_data


AVSC = {
    "type": "record",
    "name": "R",
    "fields": [{"name": "a", "type": "int"}, {"name": "b", "type": ["null", "string"]}],
}


def test_avro_round_trip_with_and_without_the_confluent_header(tmp_path: Path) -> None:
    (tmp_path / "r.avsc").write_text(json.dumps(AVSC))
    parsed_schema = fastavro.parse_schema(AVSC)
    framed = Converter(ConvertConfig(to="avro", avro_schema="r.avsc", schema_id=258), tmp_path)
    plain = Converter(ConvertConfig(to="avro", avro_schema="r.avsc"), tmp_path)
    env = event({"a": 1, "b": "x"})
    out = framed.apply(env, parsed)
    assert out.binary_data[:5] == struct.pack(">bI", 0, 258)
    assert fastavro.schemaless_reader(io.BytesIO(out.binary_data[5:]), parsed_schema, None) == {"a": 1, "b": "x"}
    assert attribute(out, "datacontenttype") == "application/avro"
    raw = plain.apply(env, parsed).binary_data
    assert raw == out.binary_data[5:]
    back = Converter(ConvertConfig(to="json", avro_schema="r.avsc", schema_id=258), tmp_path).apply(out, parsed)
    assert orjson.loads(back.binary_data) == {"a": 1, "b": "x"}
    with pytest.raises(TransformError, match="schema id 258, not 259"):
        Converter(ConvertConfig(to="json", avro_schema="r.avsc", schema_id=259), tmp_path).apply(out, parsed)
    with pytest.raises(TransformError, match="to Avro R: field 'a' must be an int, not a JSON string"):
        framed.apply(event({"a": "one"}), parsed)
    with pytest.raises(TransformError, match="bytes after the Avro datum"):
        Converter(ConvertConfig(to="json", avro_schema="r.avsc"), tmp_path).apply(
            new_event(type="t", source="/s", data=raw + b"\x00\x00"), parsed
        )


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"to": "protobuf"}, "needs descriptor_set and message"),
        ({"to": "protobuf", "descriptor_set": "x.pb"}, "needs both descriptor_set and message"),
        ({"to": "avro"}, "needs avro_schema"),
        ({"to": "json"}, "converts from Protobuf"),
        ({"to": "json", "descriptor_set": "x", "message": "m", "avro_schema": "a"}, "not both"),
        ({"to": "protobuf", "descriptor_set": "x", "message": "m", "schema_id": 1}, "schema_id frames Avro"),
        ({"to": "xml"}, "Input should be"),
    ],
)
def test_convert_config_errors(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ConvertConfig(**cfg)


def test_config_key_paths_of_transforms_and_conversions(tmp_path: Path) -> None:
    extra = """
[[routes]]
name = "shaped"

[[routes.to]]
outbound = "orders-exchange"
address = "a"
transform = { remove = ["authid"] }

[[routes.to]]
outbound = "orders-exchange"
address = "b"
convert = { to = "protobuf", descriptor_set = "n.pb", message = "m" }

[[routes.to]]
outbound = "orders-exchange"
address = "c"
convert = { to = "avro", avro_schema = "bad.avsc" }
"""
    (tmp_path / "bad.avsc").write_text('{"type": "nonsense"}')
    with pytest.raises(ConfigError) as exc:
        parse(tomllib.loads(SHIPPED + extra), load_specs(), str(tmp_path / "config.toml"))
    found = exc.value.problems
    assert len(found) == 2, found
    assert any(p.startswith('routes["shaped"].to[1].convert: cannot read') for p in found), found
    assert any(p.startswith('routes["shaped"].to[2].convert: ') and "not an Avro schema" in p for p in found), found
    bad_remove = 'remove = ["authid"]'
    with pytest.raises(ConfigError) as exc:
        parse(tomllib.loads((SHIPPED + extra).replace(bad_remove, 'remove = ["id"]')), load_specs(), "config.toml")
    assert any(
        p.startswith('routes["shaped"].to[0].transform.remove: ') and "'id' is a required" in p
        for p in exc.value.problems
    ), exc.value.problems
    inbound = '[inbound.x]\nkind = "http"\nlistener = "http"\npath = "/x"\ntype = "t"\nsource = "/x"\n'
    inbound += "transform = { add = { subject = [1] } }\n"
    with pytest.raises(ConfigError) as exc:
        parse(tomllib.loads(SHIPPED + inbound), load_specs(), "config.toml")
    assert any(p.startswith("inbound.x.transform.add") for p in exc.value.problems), exc.value.problems
