"""Compatibility per schema type and level, as pure logic: each row an old and a new schema, a level, and
whether the new one may follow (the HTTP API's own tests drive the same checker through the daemon)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mediator.schemaregistry.compat import Level, check
from mediator.schemaregistry.schemas import InvalidSchema, SchemaType, parse

B, F, FULL = Level.BACKWARD, Level.FORWARD, Level.FULL


def _avro(*fields: dict[str, Any], name: str = "Order") -> str:
    return json.dumps({"type": "record", "name": name, "namespace": "shop", "fields": list(fields)})


ID = {"name": "id", "type": "string"}
QTY = {"name": "qty", "type": "int"}
QTY_DEFAULT = {"name": "qty", "type": "int", "default": 1}
NOTE = {"name": "note", "type": "string", "default": ""}
STATUS = {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}}
STATUS_RENAMED = {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "SETTLED"]}}
STATUS_MORE = {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID", "SHIPPED"]}}
STATUS_DEFAULT = {
    "name": "status",
    "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "SETTLED"], "default": "NEW"},
}

AVRO = [
    ("add field with default", B, _avro(ID), _avro(ID, NOTE), True),
    ("add field without default", B, _avro(ID), _avro(ID, QTY), False),
    ("add field without default, forward", F, _avro(ID), _avro(ID, QTY), True),
    ("remove field with default", B, _avro(ID, NOTE), _avro(ID), True),
    ("remove field with default, forward", F, _avro(ID, NOTE), _avro(ID), True),
    ("remove field without default", B, _avro(ID, QTY), _avro(ID), True),
    ("remove field without default, forward", F, _avro(ID, QTY), _avro(ID), False),
    ("remove field without default, full", FULL, _avro(ID, QTY), _avro(ID), False),
    ("remove field with default, full", FULL, _avro(ID, NOTE), _avro(ID), True),
    ("add field with default, full", FULL, _avro(ID), _avro(ID, QTY_DEFAULT), True),
    ("type change int to string", B, _avro(ID, QTY), _avro(ID, {"name": "qty", "type": "string"}), False),
    ("type promotion int to long", B, _avro(ID, QTY), _avro(ID, {"name": "qty", "type": "long"}), True),
    ("type promotion int to long, forward", F, _avro(ID, QTY), _avro(ID, {"name": "qty", "type": "long"}), False),
    ("renamed enum symbol", B, _avro(ID, STATUS), _avro(ID, STATUS_RENAMED), False),
    ("renamed enum symbol, reader has an enum default", B, _avro(ID, STATUS), _avro(ID, STATUS_DEFAULT), True),
    ("enum symbol added", B, _avro(ID, STATUS), _avro(ID, STATUS_MORE), True),
    ("enum symbol added, forward", F, _avro(ID, STATUS), _avro(ID, STATUS_MORE), False),
    ("made nullable", B, _avro(ID, QTY), _avro(ID, {"name": "qty", "type": ["null", "int"]}), True),
    ("made nullable, forward", F, _avro(ID, QTY), _avro(ID, {"name": "qty", "type": ["null", "int"]}), False),
    ("record renamed", B, _avro(ID), _avro(ID, name="Purchase"), False),
    ("anything goes under NONE", Level.NONE, _avro(ID), _avro({"name": "x", "type": "bytes"}), True),
]

_OPEN = {"type": "object", "properties": {"id": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["id"]}
_CLOSED = {**_OPEN, "additionalProperties": False}


def _js(base: dict[str, Any], **changes: Any) -> str:
    doc = json.loads(json.dumps(base))
    for key, value in changes.items():
        if key == "drop":
            doc["properties"].pop(value)
        elif key == "props":
            doc["properties"].update(value)
        else:
            doc[key] = value
    return json.dumps(doc)


STATUS_ENUM = {"status": {"enum": ["NEW", "PAID"]}}
JSON = [
    ("property added to an open model", B, _js(_OPEN), _js(_OPEN, props={"note": {"type": "string"}}), False),
    ("optional property added to a closed model", B, _js(_CLOSED), _js(_CLOSED, props={"n": {"type": "string"}}), True),
    (
        "required property without default added to a closed model",
        B,
        _js(_CLOSED),
        _js(_CLOSED, props={"n": {"type": "string"}}, required=["id", "n"]),
        False,
    ),
    (
        "required property with default added to a closed model",
        B,
        _js(_CLOSED),
        _js(_CLOSED, props={"n": {"type": "string", "default": "x"}}, required=["id", "n"]),
        True,
    ),
    ("property removed from an open model", B, _js(_OPEN), _js(_OPEN, drop="qty"), True),
    ("property removed from a closed model", B, _js(_CLOSED), _js(_CLOSED, drop="qty"), False),
    ("property removed from a closed model, forward", F, _js(_CLOSED), _js(_CLOSED, drop="qty"), True),
    (
        "property with a default removed from a closed model",
        B,
        _js(_CLOSED, props={"qty": {"type": "integer", "default": 1}}),
        _js(_CLOSED, drop="qty"),
        False,
    ),
    ("type change integer to string", B, _js(_OPEN), _js(_OPEN, props={"qty": {"type": "string"}}), False),
    ("type widened integer to number", B, _js(_OPEN), _js(_OPEN, props={"qty": {"type": "number"}}), True),
    ("type widened integer to number, forward", F, _js(_OPEN), _js(_OPEN, props={"qty": {"type": "number"}}), False),
    (
        "renamed enum symbol",
        B,
        _js(_OPEN, props=STATUS_ENUM),
        _js(_OPEN, props={"status": {"enum": ["NEW", "SETTLED"]}}),
        False,
    ),
    (
        "enum extended",
        B,
        _js(_OPEN, props=STATUS_ENUM),
        _js(_OPEN, props={"status": {"enum": ["NEW", "PAID", "SHIPPED"]}}),
        True,
    ),
    (
        "enum extended, forward",
        F,
        _js(_OPEN, props=STATUS_ENUM),
        _js(_OPEN, props={"status": {"enum": ["NEW", "PAID", "SHIPPED"]}}),
        False,
    ),
    ("required dropped", B, _js(_OPEN), _js(_OPEN, required=[]), True),
    ("existing property made required", B, _js(_OPEN), _js(_OPEN, required=["id", "qty"]), False),
    ("additionalProperties opened", B, _js(_CLOSED), _js(_OPEN), True),
    ("additionalProperties closed", B, _js(_OPEN), _js(_CLOSED), False),
    ("optional property added to a closed model, full", FULL, _js(_CLOSED), _js(_CLOSED, props={"n": {}}), False),
    ("description changed, full", FULL, _js(_OPEN), _js(_OPEN, description="orders"), True),
    (
        "maxLength increased",
        B,
        _js(_OPEN, props={"id": {"type": "string", "maxLength": 8}}),
        _js(_OPEN, props={"id": {"type": "string", "maxLength": 16}}),
        True,
    ),
    (
        "maxLength decreased",
        B,
        _js(_OPEN, props={"id": {"type": "string", "maxLength": 16}}),
        _js(_OPEN, props={"id": {"type": "string", "maxLength": 8}}),
        False,
    ),
]


def _proto(body: str, package: str = "shop", syntax: str = "proto3") -> str:
    return f'syntax = "{syntax}";\npackage {package};\n{body}\n'


ORDER = "message Order { string id = 1; int32 qty = 2; Status status = 3; enum Status { NEW = 0; PAID = 1; } }"
SECOND = "message Refund { string id = 1; }"
PROTOBUF = [
    ("field added", B, _proto(ORDER), _proto(ORDER.replace("enum Status", "string note = 4; enum Status")), True),
    (
        "field added, full",
        FULL,
        _proto(ORDER),
        _proto(ORDER.replace("enum Status", "string note = 4; enum Status")),
        True,
    ),
    ("field removed", B, _proto(ORDER), _proto(ORDER.replace("int32 qty = 2;", "")), True),
    ("field removed, full", FULL, _proto(ORDER), _proto(ORDER.replace("int32 qty = 2;", "")), True),
    ("field renamed", B, _proto(ORDER), _proto(ORDER.replace("int32 qty", "int32 quantity")), True),
    ("type change int32 to string", B, _proto(ORDER), _proto(ORDER.replace("int32 qty", "string qty")), False),
    ("type change int32 to int64 (one wire group)", B, _proto(ORDER), _proto(ORDER.replace("int32", "int64")), True),
    ("type change int32 to sint32", F, _proto(ORDER), _proto(ORDER.replace("int32", "sint32")), False),
    ("renamed enum symbol (numbers travel)", B, _proto(ORDER), _proto(ORDER.replace("PAID", "SETTLED")), True),
    ("enum constant removed", B, _proto(ORDER), _proto(ORDER.replace(" PAID = 1;", "")), True),
    ("message removed", B, _proto(ORDER + SECOND), _proto(ORDER), False),
    ("message removed, forward", F, _proto(ORDER + SECOND), _proto(ORDER), True),
    ("message removed, full", FULL, _proto(ORDER + SECOND), _proto(ORDER), False),
    (
        "two fields moved into a new oneof",
        B,
        _proto(ORDER),
        _proto(ORDER.replace("string id = 1; int32 qty = 2;", "oneof key { string id = 1; int32 qty = 2; }")),
        False,
    ),
    ("singular int32 made repeated", B, _proto(ORDER), _proto(ORDER.replace("int32 qty", "repeated int32 qty")), False),
    ("singular string made repeated", B, _proto(ORDER), _proto(ORDER.replace("string id", "repeated string id")), True),
    (
        "scalar field made a message",
        B,
        _proto(ORDER + SECOND),
        _proto(ORDER.replace("int32 qty", "Refund qty") + SECOND),
        False,
    ),
    ("package changed", B, _proto(ORDER), _proto(ORDER, package="shop.v2"), True),
    (
        "proto2 field with a default removed",
        B,
        _proto("message Order { required string id = 1; optional int32 qty = 2 [default = 5]; }", syntax="proto2"),
        _proto("message Order { required string id = 1; }", syntax="proto2"),
        True,
    ),
    (
        "proto2 required field removed",
        B,
        _proto("message Order { required string id = 1; optional int32 qty = 2; }", syntax="proto2"),
        _proto("message Order { optional int32 qty = 2; }", syntax="proto2"),
        False,
    ),
]

CASES = [("AVRO", *c) for c in AVRO] + [("JSON", *c) for c in JSON] + [("PROTOBUF", *c) for c in PROTOBUF]


@pytest.mark.parametrize(("kind", "what", "level", "old", "new", "compatible"), CASES, ids=[c[1] for c in CASES])
def test_compatibility(kind: SchemaType, what: str, level: Level, old: str, new: str, compatible: bool) -> None:
    problems = check(level, parse(kind, new), [parse(kind, old)])
    assert (not problems) == compatible, f"{kind} {what} under {level.value}: {problems}"
    if not compatible:
        assert all(isinstance(p, str) and p for p in problems)


def test_at_least_ten_cases_per_type_and_every_level() -> None:
    for kind, rows in (("AVRO", AVRO), ("JSON", JSON), ("PROTOBUF", PROTOBUF)):
        assert len(rows) >= 10, kind
        assert {B, F, FULL} <= {r[1] for r in rows}, kind


def test_transitive_levels_check_every_earlier_version() -> None:
    v1 = parse("AVRO", _avro(ID))
    v2 = parse("AVRO", _avro(ID, QTY_DEFAULT))
    v3 = parse("AVRO", _avro(ID, QTY))  # reads v2's data (qty written), not v1's (qty absent, no default)
    assert check(Level.BACKWARD, v3, [v1, v2]) == []
    assert check(Level.BACKWARD_TRANSITIVE, v3, [v1, v2]) != []
    assert check(Level.FULL_TRANSITIVE, v2, [v1]) == []
    assert check(Level.FORWARD_TRANSITIVE, parse("AVRO", _avro(ID)), [v2, parse("AVRO", _avro(ID, QTY))]) != []


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("AVRO", '{"type": "record", "name": "r"}'),
        ("AVRO", '{"type": "nope"}'),
        ("AVRO", "not json"),
        ("JSON", '{"type": 12}'),
        ("JSON", "[1, 2]"),
        ("PROTOBUF", "message { string a = 1; }"),
        ("PROTOBUF", 'syntax = "proto3"; message M { string a = 1; int32 b = 1; }'),
        ("PROTOBUF", 'syntax = "proto3"; message M { Missing a = 1; }'),
    ],
)
def test_invalid_schemas_are_refused(kind: SchemaType, text: str) -> None:
    with pytest.raises(InvalidSchema):
        parse(kind, text)


def test_identity_ignores_layout_but_not_content() -> None:
    a = parse("AVRO", '{"type":"record","name":"r","fields":[{"name":"a","type":"int"}]}')
    b = parse("AVRO", '{ "name": "r", "type": "record",\n "fields": [ {"type": "int", "name": "a"} ] }')
    c = parse("AVRO", '{"type":"record","name":"r","fields":[{"name":"a","type":"long"}]}')
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert parse("JSON", '{"type":"string"}').fingerprint != parse("AVRO", '"string"').fingerprint
