"""Whether JSON data fits a Protobuf message or an Avro schema, checked before it is encoded. Pure.

The encoders alone disagree on what they refuse: ``json_format.ParseDict`` refuses a field the message
lacks, while fastavro writes the fields its schema names and silently leaves out the rest. The checks
here give both formats one rule set, so a conversion never loses data without being told to:

- a field the target lacks is refused (``unknown_fields = "reject"``), or left out on purpose
  (``"drop"``), at any depth (nested records and messages, their arrays and maps);
- a value of the wrong kind is refused (``"qty": "three"`` for an int);
- a required field that is absent is refused: for Avro a field with no ``default`` (a nullable union,
  ``["null", ...]``, takes an absent value as null), for Protobuf a proto2 ``required`` field (proto3 has
  none: an absent field is its default).

Each refusal is a ``Mismatch`` naming the field by its path (``lines[1].sku``, ``attrs["k"]``) and what
was wrong with it, by kind, never by value (a reason is logged and stored; the data may be private).
The encoders stay the last word on what they take (the Protobuf JSON mapping's string forms of
numbers, Timestamps, ...): these checks only refuse what the encoder would refuse or silently lose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_INT32 = (-(2**31), 2**31)
_INT64 = (-(2**63), 2**63)


class Mismatch(Exception):
    """The data does not fit: ``path`` names the field ("" for the whole datum), ``problem`` says why."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"field {path!r} {problem}" if path else problem)


def kind(value: Any) -> str:
    """The JSON kind of a value, for a reason that must not quote the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, int | float):
        return "a JSON number"
    if isinstance(value, str):
        return "a JSON string"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, dict):
        return "a JSON object"
    return f"a {type(value).__name__}"


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unknown(path: str, key: str, target: str) -> Mismatch:
    return Mismatch(_at(path, key), f'is not in {target} (unknown_fields = "drop" leaves such fields out)')


# ---------------------------------------------------------------------------------------------- Avro


class AvroConformer:
    """Checks (and, with ``drop``, trims) JSON data for a schema ``fastavro.parse_schema`` returned."""

    def __init__(self, schema: Any, *, drop: bool) -> None:
        self._schema = schema
        self._named: Mapping[str, Any] = schema.get("__named_schemas", {}) if isinstance(schema, dict) else {}
        self._drop = drop

    def conform(self, value: Any) -> Any:
        """``value`` as fastavro should write it (unknown fields left out with ``drop``); raises Mismatch."""
        return self._value(value, self._schema, "")

    def _resolve(self, schema: Any) -> Any:
        while isinstance(schema, str) and schema in self._named:
            schema = self._named[schema]
        return schema

    def _value(self, value: Any, schema: Any, path: str) -> Any:
        schema = self._resolve(schema)
        if isinstance(schema, list):
            return self._union(value, schema, path)
        kind_ = schema["type"] if isinstance(schema, dict) else schema
        if isinstance(kind_, dict | list):  # {"type": {"type": "array", ...}}: a wrapped schema
            return self._value(value, kind_, path)
        if kind_ == "record" or kind_ == "error":
            return self._record(value, schema, path)
        if kind_ == "array":
            if not isinstance(value, list):
                raise Mismatch(path, f"must be an array, not {kind(value)}")
            items = schema["items"]
            return [self._value(v, items, f"{path}[{i}]") for i, v in enumerate(value)]
        if kind_ == "map":
            if not isinstance(value, dict):
                raise Mismatch(path, f"must be an object (an Avro map), not {kind(value)}")
            values = schema["values"]
            return {k: self._value(v, values, f"{path}[{k!r}]") for k, v in value.items()}
        if kind_ == "enum":
            if not isinstance(value, str):
                raise Mismatch(path, f"must be a string (an enum symbol), not {kind(value)}")
            if value not in schema["symbols"]:
                raise Mismatch(path, f"is not a symbol of enum {schema.get('name', '')}")
            return value
        if kind_ == "fixed":
            if not isinstance(value, str | bytes):
                raise Mismatch(path, f"must be a string (Avro fixed), not {kind(value)}")
            return value
        if isinstance(kind_, str) and kind_ in self._named:  # {"type": "shop.Line"}
            return self._value(value, kind_, path)
        return _avro_primitive(value, kind_, path)

    def _record(self, value: Any, schema: Mapping[str, Any], path: str) -> Any:
        name = schema.get("name", "the record")
        if not isinstance(value, dict):
            raise Mismatch(path, f"must be an object (record {name}), not {kind(value)}")
        out: dict[str, Any] = {}
        fields = schema["fields"]
        for field in fields:
            fname = field["name"]
            if fname in value:
                out[fname] = self._value(value[fname], field["type"], _at(path, fname))
            elif "default" in field:
                continue  # fastavro writes the default
            elif _nullable(self._resolve(field["type"])):
                out[fname] = None
            else:
                raise Mismatch(_at(path, fname), f"is required by {name} (it has no default) and missing")
        if not self._drop:
            for key in value:
                if key not in out and all(f["name"] != key for f in fields):
                    raise _unknown(path, key, name)
        return out

    def _union(self, value: Any, branches: list[Any], path: str) -> Any:
        deep: list[Mismatch] = []
        for branch in branches:
            try:
                return self._value(value, branch, path)
            except Mismatch as exc:
                if exc.path != path:  # of this branch's kind, wrong inside: that reason says which field
                    deep.append(exc)
        if len(deep) == 1:
            raise deep[0]
        names = ", ".join(_type_name(self._resolve(b)) for b in branches)
        raise Mismatch(path, f"must be one of {names}, not {kind(value)}")


def _nullable(schema: Any) -> bool:
    return isinstance(schema, list) and any(
        b == "null" or (isinstance(b, dict) and b.get("type") == "null") for b in schema
    )


def _type_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return str(schema.get("name") or schema.get("logicalType") or schema.get("type"))
    return "union"


def _integral(value: Any, bounds: tuple[int, int], name: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Mismatch(path, f"must be an {name}, not {kind(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise Mismatch(path, f"must be an {name}, not a fractional number")
        value = int(value)
    number = int(value)
    if not bounds[0] <= number < bounds[1]:
        raise Mismatch(path, f"is out of the range of an {name}")
    return number


def _avro_primitive(value: Any, name: Any, path: str) -> Any:
    if name == "null":
        if value is not None:
            raise Mismatch(path, f"must be null, not {kind(value)}")
        return None
    if name == "boolean":
        if not isinstance(value, bool):
            raise Mismatch(path, f"must be a boolean, not {kind(value)}")
        return value
    if name == "int":
        return _integral(value, _INT32, "int", path)
    if name == "long":
        return _integral(value, _INT64, "long", path)
    if name in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Mismatch(path, f"must be a {name}, not {kind(value)}")
        return value
    if name == "string":
        if not isinstance(value, str):
            raise Mismatch(path, f"must be a string, not {kind(value)}")
        return value
    if name == "bytes":
        if not isinstance(value, str | bytes):
            raise Mismatch(path, f"must be a string (Avro bytes), not {kind(value)}")
        return value
    return value  # a type fastavro parsed and these checks do not know: fastavro decides


# ------------------------------------------------------------------------------------------ Protobuf


class ProtobufConformer:
    """Checks (and, with ``drop``, trims) JSON data for a message descriptor, by the proto3 JSON mapping's
    names (the .proto name or its lowerCamelCase JSON name). The well-known types (``google.protobuf.*``:
    Timestamp, Struct, wrappers, Any, ...) have JSON forms of their own and are left to json_format."""

    def __init__(self, descriptor: Any, *, drop: bool) -> None:
        self._descriptor = descriptor
        self._drop = drop
        self._fields: dict[str, dict[str, Any]] = {}

    def conform(self, value: Any) -> Any:
        return self._message(value, self._descriptor, "")

    def _names(self, descriptor: Any) -> dict[str, Any]:
        names = self._fields.get(descriptor.full_name)
        if names is None:
            names = {}
            for field in descriptor.fields:
                names[field.name] = field
                names[field.json_name] = field
            self._fields[descriptor.full_name] = names
        return names

    def _message(self, value: Any, descriptor: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise Mismatch(path, f"must be an object (message {descriptor.full_name}), not {kind(value)}")
        names = self._names(descriptor)
        out: dict[str, Any] = {}
        for key, item in value.items():
            field = names.get(key)
            if field is None:
                if self._drop:
                    continue
                raise _unknown(path, key, descriptor.full_name)
            out[key] = self._field(item, field, _at(path, key))
        return out

    def _field(self, value: Any, field: Any, path: str) -> Any:
        if value is None:  # the JSON mapping: null is the field's default (json_format decides for Value)
            return value
        message = field.message_type
        if field.is_repeated and message is not None and message.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise Mismatch(path, f"must be an object (a map), not {kind(value)}")
            inner = message.fields_by_name["value"]
            return {k: self._single(v, inner, f"{path}[{k!r}]") for k, v in value.items()}
        if field.is_repeated:
            if not isinstance(value, list):
                raise Mismatch(path, f"must be an array, not {kind(value)}")
            return [self._single(v, field, f"{path}[{i}]") for i, v in enumerate(value)]
        return self._single(value, field, path)

    def _single(self, value: Any, field: Any, path: str) -> Any:
        if value is None:
            return value
        cpp = field.cpp_type
        if cpp == field.CPPTYPE_MESSAGE:
            if field.message_type.full_name.startswith("google.protobuf."):
                return value
            return self._message(value, field.message_type, path)
        if cpp in (field.CPPTYPE_INT32, field.CPPTYPE_UINT32, field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            if isinstance(value, str):  # the JSON mapping takes integers as strings too (int64 always)
                if not _parses(value, integral=True):
                    raise Mismatch(path, "must be an integer, not a string that is not one")
                return value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Mismatch(path, f"must be an integer, not {kind(value)}")
            if isinstance(value, float) and not value.is_integer():
                raise Mismatch(path, "must be an integer, not a fractional number")
            return value
        if cpp in (field.CPPTYPE_DOUBLE, field.CPPTYPE_FLOAT):
            if isinstance(value, str):
                if not _parses(value, integral=False):
                    raise Mismatch(path, "must be a number, not a string that is not one")
                return value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Mismatch(path, f"must be a number, not {kind(value)}")
            return value
        if cpp == field.CPPTYPE_BOOL:
            if not isinstance(value, bool):
                raise Mismatch(path, f"must be a boolean, not {kind(value)}")
            return value
        if cpp == field.CPPTYPE_ENUM:
            if isinstance(value, str):
                if value not in field.enum_type.values_by_name:
                    raise Mismatch(path, f"is not a value of enum {field.enum_type.full_name}")
                return value
            if isinstance(value, bool) or not isinstance(value, int):
                raise Mismatch(path, f"must be an enum name or number, not {kind(value)}")
            return value
        # CPPTYPE_STRING: string, or bytes as base64 (json_format checks the base64)
        if not isinstance(value, str):
            what = "base64 bytes" if field.type == field.TYPE_BYTES else "a string"
            raise Mismatch(path, f"must be {what}, not {kind(value)}")
        return value


def _parses(text: str, *, integral: bool) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    if integral:
        return math.isfinite(number) and number.is_integer()
    return True


def missing_required(message: Any) -> list[str]:
    """The proto2 ``required`` fields a parsed message lacks, as paths (``qty``, ``lines[0].sku``)."""
    errors: list[str] = message.FindInitializationErrors()
    return errors


def unknown_binary_fields(message: Any, path: str = "") -> list[str]:
    """The fields a parsed message's bytes carried that its descriptor lacks (a newer schema's), at any
    depth, as paths ending in the field number (``#9``, ``lines[0].#5``)."""
    from google.protobuf import unknown_fields

    unknown = unknown_fields.UnknownFieldSet(message)
    found = [_at(path, f"#{unknown[i].field_number}") for i in range(len(unknown))]
    for field, value in message.ListFields():
        message_type = field.message_type
        if message_type is None:
            continue
        at = _at(path, field.name)
        if field.is_repeated and message_type.GetOptions().map_entry:
            if message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    found += unknown_binary_fields(item, f"{at}[{key!r}]")
        elif field.is_repeated:
            for i, item in enumerate(value):
                found += unknown_binary_fields(item, f"{at}[{i}]")
        else:
            found += unknown_binary_fields(value, at)
    return found
