"""Conversion refuses what the target cannot hold, the same way for Protobuf and Avro: a field the target
lacks (or, with ``unknown_fields = "drop"``, leaves it out), a value of the wrong kind, a required field
that is absent (Avro: no default; a nullable union takes absent as null; Protobuf: proto2 ``required``),
at any depth (nested records/messages, their arrays and maps). Every refusal names the field."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from pydantic import ValidationError

from mediator.core.content import parsed
from mediator.core.convert import ConvertConfig, Converter
from mediator.core.envelope import Envelope, new_event
from mediator.core.transform import TransformError

PROTO3 = """
syntax = "proto3";
package strict;
import "google/protobuf/timestamp.proto";
import "google/protobuf/struct.proto";

enum Status { UNKNOWN = 0; OPEN = 1; }
message Line { string sku = 1; int32 qty = 2; }
message Node { int32 v = 1; Node next = 2; }
message Order {
  string order_id = 1;
  int32 qty = 2;
  Line line = 3;
  repeated Line lines = 4;
  map<string, Line> by_sku = 5;
  google.protobuf.Timestamp placed_at = 6;
  google.protobuf.Struct meta = 7;
  Status status = 8;
  bool paid = 9;
  double total = 10;
}
"""

PROTO2 = """
syntax = "proto2";
package strict2;
message Line { required string sku = 1; optional int32 qty = 2; }
message Order { required string order_id = 1; repeated Line lines = 2; }
"""

LINE = {"type": "record", "name": "Line", "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}]}
AVSC = {
    "type": "record",
    "name": "Order",
    "namespace": "strict",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "qty", "type": "int"},
        {"name": "line", "type": ["null", LINE], "default": None},
        {"name": "lines", "type": {"type": "array", "items": "strict.Line"}, "default": []},
        {"name": "by_sku", "type": {"type": "map", "values": "strict.Line"}, "default": {}},
        {
            "name": "status",
            "type": {"type": "enum", "name": "Status", "symbols": ["UNKNOWN", "OPEN"]},
            "default": "UNKNOWN",
        },
        {"name": "paid", "type": "boolean", "default": False},
        {"name": "total", "type": "double", "default": 0.0},
        {"name": "note", "type": ["null", "string"]},  # nullable, no default: absent is null
    ],
}


def event(data: Any) -> Envelope:
    return new_event(type="t", source="/s", data=orjson.dumps(data), content_type="application/json")


def compile_proto(tmp: Path, name: str, text: str) -> None:
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    (tmp / f"{name}.proto").write_text(text)
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{tmp}", f"-I{include}", "--include_imports", f"--descriptor_set_out={tmp / name}.pb"]
    assert protoc.main([*args, str(tmp / f"{name}.proto")]) == 0


@pytest.fixture
def converters(tmp_path: Path) -> dict[str, Converter]:
    """One converter per (format, unknown_fields), all for the same order shape."""
    compile_proto(tmp_path, "p3", PROTO3)
    (tmp_path / "o.avsc").write_text(json.dumps(AVSC))
    out = {}
    for mode in ("reject", "drop"):
        out[f"protobuf-{mode}"] = Converter(
            ConvertConfig(to="protobuf", descriptor_set="p3.pb", message="strict.Order", unknown_fields=mode), tmp_path
        )
        out[f"avro-{mode}"] = Converter(ConvertConfig(to="avro", avro_schema="o.avsc", unknown_fields=mode), tmp_path)
    return out


def decode(conv: Converter, out: Envelope) -> dict[str, Any]:
    """What a consumer reads: the Protobuf message as JSON (field names as in the .proto), the Avro datum."""
    if conv.config.to == "protobuf":
        from google.protobuf import json_format

        msg = conv._message()  # type: ignore[misc]
        msg.ParseFromString(out.binary_data)
        got: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        return got
    datum = fastavro.schemaless_reader(io.BytesIO(out.binary_data), fastavro.parse_schema(AVSC), None)
    assert isinstance(datum, dict)
    return datum


FORMATS = ("protobuf", "avro")


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_issue_event_with_an_unknown_field_is_refused_naming_it(fmt: str, converters: dict[str, Converter]) -> None:
    target = "Protobuf strict.Order" if fmt == "protobuf" else "Avro strict.Order"
    with pytest.raises(TransformError, match=rf"^cannot convert to {target}: field 'extra' is not in strict.Order"):
        converters[f"{fmt}-reject"].apply(event({"order_id": "o-12", "qty": 3, "extra": True}), parsed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_drop_leaves_unknown_fields_out_at_every_depth(fmt: str, converters: dict[str, Converter]) -> None:
    conv = converters[f"{fmt}-drop"]
    data = {
        "order_id": "o-12",
        "qty": 3,
        "extra": True,
        "line": {"sku": "a", "qty": 1, "colour": "red"},
        "lines": [{"sku": "b", "qty": 2, "gift": True}],
        "by_sku": {"c": {"sku": "c", "qty": 4, "x": 0}},
    }
    got = decode(conv, conv.apply(event(data), parsed))
    assert got["order_id"] == "o-12"
    assert got["qty"] == 3
    assert "extra" not in got
    assert got["line"] == {"sku": "a", "qty": 1}
    assert got["lines"] == [{"sku": "b", "qty": 2}]
    assert got["by_sku"] == {"c": {"sku": "c", "qty": 4}}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ({"order_id": "o", "qty": 3, "line": {"sku": "a", "qty": 1, "colour": "red"}}, "line.colour", "is not in"),
        (
            {"order_id": "o", "qty": 3, "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 1, "n": 1}]},
            "lines[1].n",
            "is not in",
        ),
        ({"order_id": "o", "qty": 3, "by_sku": {"k": {"sku": "k", "qty": 1, "z": 1}}}, "by_sku['k'].z", "is not in"),
        ({"order_id": "o", "qty": "three"}, "qty", "must be an int"),
        ({"order_id": "o", "qty": 2.5}, "qty", "fractional"),
        ({"order_id": "o", "qty": True}, "qty", "not a JSON boolean"),
        ({"order_id": 12, "qty": 3}, "order_id", "must be a string, not a JSON number"),
        ({"order_id": "o", "qty": 3, "paid": "yes"}, "paid", "must be a boolean"),
        ({"order_id": "o", "qty": 3, "total": "lots"}, "total", "must be a"),
        ({"order_id": "o", "qty": 3, "status": "SHUT"}, "status", "enum strict.Status"),
        ({"order_id": "o", "qty": 3, "line": {"sku": "a", "qty": "one"}}, "line.qty", "must be an int"),
        ({"order_id": "o", "qty": 3, "lines": {"sku": "a"}}, "lines", "must be an array, not a JSON object"),
        ({"order_id": "o", "qty": 3, "line": "a"}, "line", "not a JSON string"),
    ],
)
def test_refusals_name_the_field_for_both_formats(
    fmt: str, data: dict[str, Any], field: str, problem: str, converters: dict[str, Converter]
) -> None:
    for mode in ("reject", "drop"):  # drop leaves unknown fields out; a wrong value is refused either way
        if mode == "drop" and "is not in" in problem:
            continue
        with pytest.raises(TransformError) as caught:
            converters[f"{fmt}-{mode}"].apply(event(data), parsed)
        reason = str(caught.value)
        assert f"field {field!r} " in reason, reason
        if fmt == "protobuf" and problem == "must be an int":
            problem = "must be an integer"
        assert problem in reason, reason
        assert "three" not in reason, "a reason names the field, never its value"
        assert "lots" not in reason


def test_avro_required_means_no_default_and_a_nullable_union_takes_absent_as_null(
    converters: dict[str, Converter],
) -> None:
    conv = converters["avro-reject"]
    with pytest.raises(TransformError, match=r"field 'qty' is required by strict.Order \(it has no default\)"):
        conv.apply(event({"order_id": "o"}), parsed)
    with pytest.raises(TransformError, match=r"field 'line.qty' is required by strict.Line"):
        conv.apply(event({"order_id": "o", "qty": 1, "line": {"sku": "a"}}), parsed)
    got = decode(conv, conv.apply(event({"order_id": "o", "qty": 1}), parsed))
    assert got == {
        "order_id": "o",
        "qty": 1,
        "line": None,
        "lines": [],
        "by_sku": {},
        "status": "UNKNOWN",
        "paid": False,
        "total": 0.0,
        "note": None,
    }, "defaults filled, the nullable note absent is null"
    assert decode(conv, conv.apply(event({"order_id": "o", "qty": 1, "note": None}), parsed))["note"] is None
    with pytest.raises(TransformError, match=r"field 'note' must be one of null, string, not a JSON number"):
        conv.apply(event({"order_id": "o", "qty": 1, "note": 5}), parsed)


def test_protobuf_keeps_the_json_mapping_and_its_well_known_types(converters: dict[str, Converter]) -> None:
    conv = converters["protobuf-reject"]
    data = {
        "orderId": "o",  # the JSON name is a name of the field too
        "qty": "3",  # proto3 JSON: integers as strings
        "placed_at": "2024-05-01T12:00:00Z",
        "meta": {"anything": {"goes": [1, "x"]}},  # a Struct takes any keys: not checked as fields
        "status": 1,
        "line": None,  # null is the field's default
    }
    got = decode(conv, conv.apply(event(data), parsed))
    assert got == {
        "order_id": "o",
        "qty": 3,
        "placed_at": "2024-05-01T12:00:00Z",
        "meta": {"anything": {"goes": [1.0, "x"]}},
        "status": "OPEN",
    }
    with pytest.raises(TransformError, match=r"cannot convert to Protobuf strict.Order: .*placed_at"):
        conv.apply(event({"placed_at": "yesterday"}), parsed)  # json_format's own refusal, still naming it


def test_protobuf_proto2_required_fields(tmp_path: Path) -> None:
    compile_proto(tmp_path, "p2", PROTO2)
    conv = Converter(ConvertConfig(to="protobuf", descriptor_set="p2.pb", message="strict2.Order"), tmp_path)
    with pytest.raises(TransformError, match=r"required field 'order_id' missing"):
        conv.apply(event({"lines": []}), parsed)
    with pytest.raises(TransformError, match=r"required field 'lines\[1\].sku' missing"):
        conv.apply(event({"order_id": "o", "lines": [{"sku": "a"}, {"qty": 1}]}), parsed)
    assert conv.apply(event({"order_id": "o", "lines": [{"sku": "a"}]}), parsed).binary_data


def test_the_whole_datum_of_the_wrong_kind(converters: dict[str, Converter]) -> None:
    for fmt in FORMATS:
        with pytest.raises(TransformError, match=r"must be an object .*not a JSON array"):
            converters[f"{fmt}-reject"].apply(event([1, 2]), parsed)


def test_unknown_fields_config() -> None:
    assert ConvertConfig(to="avro", avro_schema="a").unknown_fields == "reject"
    assert ConvertConfig(to="protobuf", descriptor_set="x", message="m", ignore_unknown_fields=True).drops_unknown
    with pytest.raises(ValidationError, match="unknown_fields"):
        ConvertConfig(to="avro", avro_schema="a", unknown_fields="keep")
    with pytest.raises(ValidationError, match="give unknown_fields only"):
        ConvertConfig(to="avro", avro_schema="a", unknown_fields="reject", ignore_unknown_fields=True)
    assert ConvertConfig(to="json", descriptor_set="x", message="m", unknown_fields="drop").drops_unknown


def test_protobuf_bytes_with_fields_the_message_lacks_are_refused_to_json_unless_dropped(tmp_path: Path) -> None:
    """A newer producer's field (here number 11 at the top, 9 inside a line) parses as an unknown field that
    MessageToDict would silently leave out."""
    compile_proto(tmp_path, "p3", PROTO3)
    keys = {"descriptor_set": "p3.pb", "message": "strict.Order"}
    strict = Converter(ConvertConfig(to="json", **keys), tmp_path)
    lenient = Converter(ConvertConfig(to="json", unknown_fields="drop", **keys), tmp_path)
    to_pb = Converter(ConvertConfig(to="protobuf", **keys), tmp_path)
    known = to_pb.apply(event({"order_id": "o", "lines": [{"sku": "a"}]}), parsed).binary_data
    assert orjson.loads(strict.apply(raw(known), parsed).binary_data) == {"order_id": "o", "lines": [{"sku": "a"}]}
    newer_top = known + bytes([11 << 3, 1])  # field 11, varint 1
    line = bytes([1 << 3 | 2, 1]) + b"a" + bytes([9 << 3, 7])  # sku "a", then field 9 = 7
    newer_inner = bytes([1 << 3 | 2, 1]) + b"o" + bytes([4 << 3 | 2, len(line)]) + line
    with pytest.raises(TransformError, match=r"to JSON: field '#11' is not in strict.Order"):
        strict.apply(raw(newer_top), parsed)
    with pytest.raises(TransformError, match=r"field 'lines\[0\].#9' is not in strict.Order"):
        strict.apply(raw(newer_inner), parsed)
    assert orjson.loads(lenient.apply(raw(newer_inner), parsed).binary_data) == {
        "order_id": "o",
        "lines": [{"sku": "a"}],
    }
    with pytest.raises(ValidationError, match="not Avro to JSON"):
        ConvertConfig(to="json", avro_schema="a", unknown_fields="drop")


def raw(body: bytes) -> Envelope:
    return new_event(type="t", source="/s", data=body, content_type="application/protobuf")


def test_a_type_that_contains_itself_is_checked_at_every_depth(tmp_path: Path) -> None:
    compile_proto(tmp_path, "p3", PROTO3)
    node = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"], "default": None}],
    }
    (tmp_path / "n.avsc").write_text(json.dumps(node))
    avro = Converter(ConvertConfig(to="avro", avro_schema="n.avsc"), tmp_path)
    pb = Converter(ConvertConfig(to="protobuf", descriptor_set="p3.pb", message="strict.Node"), tmp_path)
    good = {"v": 1, "next": {"v": 2, "next": {"v": 3}}}
    bad = {"v": 1, "next": {"v": 2, "next": {"v": 3, "w": 4}}}
    datum = fastavro.schemaless_reader(
        io.BytesIO(avro.apply(event(good), parsed).binary_data), fastavro.parse_schema(node), None
    )
    assert datum == {"v": 1, "next": {"v": 2, "next": {"v": 3, "next": None}}}
    assert pb.apply(event(good), parsed).binary_data
    for conv in (avro, pb):
        with pytest.raises(TransformError, match=r"field 'next.next.w' is not in"):
            conv.apply(event(bad), parsed)
