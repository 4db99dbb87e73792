"""Schema compatibility, per type, as Confluent's registry decides it. Pure: no I/O.

``can_read(reader, writer)`` lists why data written with ``writer`` cannot be read with ``reader`` ([]
when it can). The levels (``check``) combine it: BACKWARD means the new schema reads what the latest
version wrote (``_TRANSITIVE``: what every version wrote), FORWARD the reverse, FULL both.

- Avro: the Avro specification's schema resolution rules, by the Apache ``avro`` package's
  ``ReaderWriterCompatibilityChecker`` (the same rules Confluent's Java registry applies with Avro's
  ``SchemaCompatibility``): promotions (int to long, float, double; string and bytes), a reader field
  absent from the writer needs a default, a writer enum symbol the reader lacks needs the reader's
  enum default, unions branch by branch, named types by name or alias.
- JSON Schema: Confluent's ``SchemaDiff`` model. The writer's schema is the "original", the reader's the
  "update"; every difference has a type, and only those in Confluent's ``COMPATIBLE_CHANGES_STRICT`` set
  are compatible. The content model matters: an object is *open* (``additionalProperties`` absent or
  true, no ``patternProperties``), *partially open* (a schema for additional or pattern properties) or
  *closed* (``additionalProperties: false``). Adding a property to an open model is incompatible (old
  data may hold anything under that name); removing one from a closed model is incompatible (old data
  holds it and the new model refuses it). Narrowed types, enums and bounds, and newly required
  properties without a default, are incompatible; widened ones are not.
- Protobuf: Confluent's protobuf ``SchemaDiff``: fields by number; adding or removing a field,
  renaming one, changing the package, adding a message, enum constants added, renamed or removed
  (their numbers are what travels), and string/bytes label changes are compatible; a removed message,
  a field whose kind (scalar, message, map) or wire-compatible scalar group changes, a field that changes
  message type, a numeric label change, required fields added or removed, a oneof losing a field, and
  fields moved into a oneof are not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from mediator.schemaregistry.schemas import PROTO_SCALARS, ParsedSchema, ProtoIndex, message_fields


class Level(StrEnum):
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"


def check(level: Level, new: ParsedSchema, previous: Sequence[ParsedSchema]) -> list[str]:
    """Why ``new`` may not follow ``previous`` (oldest first) under ``level``; [] when it may."""
    if level is Level.NONE or not previous:
        return []
    against = previous if level.value.endswith("_TRANSITIVE") else previous[-1:]
    backward = level.value.startswith(("BACKWARD", "FULL"))
    forward = level.value.startswith(("FORWARD", "FULL"))
    out: list[str] = []
    for old in reversed(against):  # the newest first: its messages are the most useful
        if backward:
            out += can_read(new, old)
        if forward:
            out += can_read(old, new)
    return out


def can_read(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    if reader.type != writer.type:
        return [f"the schema types differ: a {reader.type} reader, a {writer.type} writer"]
    if reader.type == "AVRO":
        return _avro(reader.parsed, writer.parsed)
    if reader.type == "JSON":
        diffs = JsonDiff(writer.parsed, reader.parsed).run()
        return [
            f"Found incompatible change: Difference{{jsonPath='{path}', type={kind}}}"
            for kind, path in diffs
            if kind not in JSON_COMPATIBLE
        ]
    diffs = ProtoDiff(ProtoIndex(writer.parsed), ProtoIndex(reader.parsed)).run()
    return [
        f"Found incompatible change: Difference{{fullPath='{path}', type={kind}}}"
        for kind, path in diffs
        if kind not in PROTO_COMPATIBLE
    ]


# ---------------------------------------------------------------------------------------------- Avro


def _avro(reader: Any, writer: Any) -> list[str]:
    from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]  # avro ships no hints
    result = checker.get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    kinds = ", ".join(sorted(i.value.upper() for i in result.incompatibilities)) or "INCOMPATIBLE"
    where = ", ".join(sorted(result.locations))
    detail = "; ".join(sorted(result.messages))
    return [f"{{errorType:'{kinds}', location:'{where}', description:'{detail}'}}"]


# --------------------------------------------------------------------------------------- JSON Schema

JSON_COMPATIBLE = frozenset(
    [
        "ID_CHANGED",
        "DESCRIPTION_CHANGED",
        "TITLE_CHANGED",
        "DEFAULT_CHANGED",
        "SCHEMA_REMOVED",
        "TYPE_EXTENDED",
        "MAX_LENGTH_INCREASED",
        "MAX_LENGTH_REMOVED",
        "MIN_LENGTH_DECREASED",
        "MIN_LENGTH_REMOVED",
        "PATTERN_REMOVED",
        "MAXIMUM_INCREASED",
        "MAXIMUM_REMOVED",
        "MINIMUM_DECREASED",
        "MINIMUM_REMOVED",
        "EXCLUSIVE_MAXIMUM_INCREASED",
        "EXCLUSIVE_MAXIMUM_REMOVED",
        "EXCLUSIVE_MINIMUM_DECREASED",
        "EXCLUSIVE_MINIMUM_REMOVED",
        "MULTIPLE_OF_REDUCED",
        "MULTIPLE_OF_REMOVED",
        "REQUIRED_ATTRIBUTE_WITH_DEFAULT_ADDED",
        "REQUIRED_ATTRIBUTE_REMOVED",
        "DEPENDENCY_ARRAY_NARROWED",
        "DEPENDENCY_ARRAY_REMOVED",
        "DEPENDENCY_SCHEMA_REMOVED",
        "MAX_PROPERTIES_INCREASED",
        "MAX_PROPERTIES_REMOVED",
        "MIN_PROPERTIES_DECREASED",
        "MIN_PROPERTIES_REMOVED",
        "ADDITIONAL_PROPERTIES_ADDED",
        "ADDITIONAL_PROPERTIES_EXTENDED",
        "PROPERTY_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL",
        "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_UNOPEN_CONTENT_MODEL",
        "OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL",
        "PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL",
        "PROPERTY_ADDED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
        "PROPERTY_REMOVED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
        "MAX_ITEMS_INCREASED",
        "MAX_ITEMS_REMOVED",
        "MIN_ITEMS_DECREASED",
        "MIN_ITEMS_REMOVED",
        "UNIQUE_ITEMS_REMOVED",
        "ADDITIONAL_ITEMS_ADDED",
        "ADDITIONAL_ITEMS_EXTENDED",
        "ITEM_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL",
        "ITEM_ADDED_TO_CLOSED_CONTENT_MODEL",
        "ITEM_REMOVED_FROM_OPEN_CONTENT_MODEL",
        "ENUM_ARRAY_EXTENDED",
        "COMBINED_TYPE_EXTENDED",
        "PRODUCT_TYPE_NARROWED",
        "SUM_TYPE_EXTENDED",
        "NOT_TYPE_NARROWED",
    ]
)
"""Confluent's ``SchemaDiff.COMPATIBLE_CHANGES_STRICT`` (json-schema-provider): the difference types
a reader ("update") tolerates in data its writer ("original") produced."""

_UPPER: tuple[tuple[str, str], ...] = (
    *(("maxLength", "MAX_LENGTH"), ("maximum", "MAXIMUM"), ("exclusiveMaximum", "EXCLUSIVE_MAXIMUM")),
    *(("maxProperties", "MAX_PROPERTIES"), ("maxItems", "MAX_ITEMS")),
)
_LOWER: tuple[tuple[str, str], ...] = (
    *(("minLength", "MIN_LENGTH"), ("minimum", "MINIMUM"), ("exclusiveMinimum", "EXCLUSIVE_MINIMUM")),
    *(("minProperties", "MIN_PROPERTIES"), ("minItems", "MIN_ITEMS")),
)
_COMBINERS = ("allOf", "anyOf", "oneOf")
_JSON_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")


class JsonDiff:
    """The differences from ``original`` (the writer's schema) to ``update`` (the reader's)."""

    def __init__(self, original: Any, update: Any) -> None:
        self._roots = (original, update)
        self._seen: set[tuple[int, int]] = set()
        self.out: list[tuple[str, str]] = []

    def run(self) -> list[tuple[str, str]]:
        self._compare(self._roots[0], self._roots[1], "#/")
        return self.out

    def compatible(self, original: Any, update: Any) -> bool:
        sub = JsonDiff(original, update)
        sub._roots = self._roots
        sub._compare(original, update, "#/")
        return all(kind in JSON_COMPATIBLE for kind, _ in sub.out)

    def _add(self, kind: str, path: str) -> None:
        self.out.append((kind, path))

    def _deref(self, schema: Any, root: Any) -> Any:
        for _ in range(32):  # a chain of $ref to $ref, bounded
            if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str)):
                return schema
            ref: str = schema["$ref"]
            if not ref.startswith("#"):
                return {}  # another document (a reference): its content is not known here, anything goes
            target: Any = root
            for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    return {}
                target = target[part]
            schema = target
        return schema

    def _compare(self, original: Any, update: Any, path: str) -> None:
        original = self._deref(original, self._roots[0])
        update = self._deref(update, self._roots[1])
        key = (id(original), id(update))
        if key in self._seen:  # a recursive schema compared with itself further down
            return
        self._seen.add(key)
        if original is True:
            original = {}
        if update is True:
            update = {}
        if original == update:
            return
        if update is False:
            self._add("TYPE_NARROWED", path)
            return
        if original is False:
            return  # the writer wrote nothing here
        if not isinstance(original, dict) or not isinstance(update, dict):
            self._add("TYPE_CHANGED", path)
            return
        if not _constraining(update):
            self._add("SCHEMA_REMOVED", path)
            return
        if not _constraining(original):
            self._add("SCHEMA_ADDED", path)
            return
        for name, kind in (("$id", "ID"), ("id", "ID"), ("title", "TITLE"), ("description", "DESCRIPTION")):
            if original.get(name) != update.get(name):
                self._add(f"{kind}_CHANGED", path)
        if original.get("default") != update.get("default"):
            self._add("DEFAULT_CHANGED", path)
        if self._combined(original, update, path):
            return
        if "not" in original or "not" in update:
            # a reader's "not" refuses what it names: narrowing what it names widens the reader.
            if "not" in original and "not" in update:
                sub = JsonDiff(update["not"], original["not"])
                sub._roots = (self._roots[1], self._roots[0])
                sub._compare(update["not"], original["not"], path + "not/")
                fine = all(k in JSON_COMPATIBLE for k, _ in sub.out)
                self._add("NOT_TYPE_NARROWED" if fine else "NOT_TYPE_EXTENDED", path + "not")
            else:
                self._add("TYPE_CHANGED", path + "not")
        self._types(original, update, path)
        self._enum(original, update, path)
        for name, kind in _UPPER:
            self._bound(original.get(name), update.get(name), path + name, kind, upper=True)
        for name, kind in _LOWER:
            self._bound(original.get(name), update.get(name), path + name, kind, upper=False)
        self._pattern(original.get("pattern"), update.get("pattern"), path)
        self._multiple(original.get("multipleOf"), update.get("multipleOf"), path)
        if _has_object(original) or _has_object(update):
            self._object(original, update, path)
        if _has_array(original) or _has_array(update):
            self._array(original, update, path)

    def _combined(self, original: dict[str, Any], update: dict[str, Any], path: str) -> bool:
        o = next((c for c in _COMBINERS if c in original), None)
        u = next((c for c in _COMBINERS if c in update), None)
        if o is None and u is None:
            return False
        if o is None:
            assert u is not None
            branches = update[u]
            if u != "allOf" and any(self.compatible(original, b) for b in branches):
                self._add("COMBINED_TYPE_EXTENDED", path)
            else:
                self._add("COMBINED_TYPE_CHANGED", path)
            return True
        if u is None:
            assert o is not None
            branches = original[o]
            if o == "allOf" and any(self.compatible(b, update) for b in branches):
                self._add("PRODUCT_TYPE_NARROWED", path)
            elif o != "allOf" and len(branches) == 1 and self.compatible(branches[0], update):
                pass  # a single-branch anyOf or oneOf is its branch
            else:
                self._add("COMBINED_TYPE_CHANGED", path)
            return True
        if o != u:
            self._add("COMBINED_TYPE_CHANGED", path)
            return True
        ob, ub = list(original[o]), list(update[u])
        if len(ub) > len(ob):
            self._add("PRODUCT_TYPE_EXTENDED" if o == "allOf" else "SUM_TYPE_EXTENDED", path + o)
        elif len(ub) < len(ob):
            self._add("PRODUCT_TYPE_NARROWED" if o == "allOf" else "SUM_TYPE_NARROWED", path + o)
        # every writer branch must be read by a distinct reader branch (allOf: the reverse), greedily
        needles, hay = (ob, ub) if o != "allOf" else (ub, ob)
        free = list(range(len(hay)))
        for i, branch in enumerate(needles):
            match = next(
                (
                    j
                    for j in free
                    if (self.compatible(branch, hay[j]) if o != "allOf" else self.compatible(hay[j], branch))
                ),
                None,
            )
            if match is None:
                self._add("COMBINED_TYPE_SUBSCHEMAS_CHANGED", f"{path}{o}/{i}")
            else:
                free.remove(match)
        return True

    def _types(self, original: dict[str, Any], update: dict[str, Any], path: str) -> None:
        ot, ut = _types(original), _types(update)
        if ot == ut:
            return
        if ut >= ot or all(t in ut or (t == "integer" and "number" in ut) for t in ot):
            self._add("TYPE_EXTENDED", path)
        elif ot >= ut or all(t in ot or (t == "integer" and "number" in ot) for t in ut):
            self._add("TYPE_NARROWED", path)
        else:
            self._add("TYPE_CHANGED", path)

    def _enum(self, original: dict[str, Any], update: dict[str, Any], path: str) -> None:
        oe = _enum_values(original)
        ue = _enum_values(update)
        if oe is None and ue is None:
            return
        if ue is None:
            self._add("ENUM_ARRAY_EXTENDED", path + "enum")
        elif oe is None:
            self._add("ENUM_ARRAY_NARROWED", path + "enum")
        elif all(v in ue for v in oe) and not all(v in oe for v in ue):
            self._add("ENUM_ARRAY_EXTENDED", path + "enum")
        elif all(v in oe for v in ue) and not all(v in ue for v in oe):
            self._add("ENUM_ARRAY_NARROWED", path + "enum")
        elif not (all(v in ue for v in oe) and all(v in oe for v in ue)):
            self._add("ENUM_ARRAY_CHANGED", path + "enum")

    def _bound(self, o: Any, u: Any, path: str, kind: str, *, upper: bool) -> None:
        if o == u or isinstance(o, bool) or isinstance(u, bool):
            return  # draft 4's boolean exclusiveMaximum: a modifier of maximum, not a bound
        if o is None:
            self._add(f"{kind}_ADDED", path)
        elif u is None:
            self._add(f"{kind}_REMOVED", path)
        elif (u > o) == upper:
            self._add(f"{kind}_INCREASED" if upper else f"{kind}_DECREASED", path)
        else:
            self._add(f"{kind}_DECREASED" if upper else f"{kind}_INCREASED", path)

    def _pattern(self, o: Any, u: Any, path: str) -> None:
        if o == u:
            return
        self._add("PATTERN_ADDED" if o is None else "PATTERN_REMOVED" if u is None else "PATTERN_CHANGED", path)

    def _multiple(self, o: Any, u: Any, path: str) -> None:
        if o == u:
            return
        if o is None:
            self._add("MULTIPLE_OF_ADDED", path)
        elif u is None:
            self._add("MULTIPLE_OF_REMOVED", path)
        else:
            ratio = o / u
            whole = math.isclose(ratio, round(ratio)) and round(ratio) >= 1
            self._add("MULTIPLE_OF_REDUCED" if whole else "MULTIPLE_OF_CHANGED", path + "multipleOf")

    def _object(self, original: dict[str, Any], update: dict[str, Any], path: str) -> None:
        o_props: dict[str, Any] = original.get("properties") or {}
        u_props: dict[str, Any] = update.get("properties") or {}
        o_required = set(original.get("required") or ())
        u_required = set(update.get("required") or ())
        oa, ua = original.get("additionalProperties", True), update.get("additionalProperties", True)
        if oa != ua:
            if ua is True or ua == {}:
                self._add("ADDITIONAL_PROPERTIES_ADDED", path + "additionalProperties")
            elif oa is True or oa == {}:
                self._add("ADDITIONAL_PROPERTIES_REMOVED", path + "additionalProperties")
            elif oa is False:
                self._add("ADDITIONAL_PROPERTIES_EXTENDED", path + "additionalProperties")
            elif ua is False:
                self._add("ADDITIONAL_PROPERTIES_NARROWED", path + "additionalProperties")
            else:
                fine = self.compatible(oa, ua)
                kind = "ADDITIONAL_PROPERTIES_EXTENDED" if fine else "ADDITIONAL_PROPERTIES_NARROWED"
                self._add(kind, path + "additionalProperties")
        o_model, u_model = _content_model(original), _content_model(update)
        for name, schema in u_props.items():
            if name in o_props:
                continue
            where = f"{path}properties/{name}"
            if o_model == "open":
                empty = not _constraining(self._deref(schema, self._roots[1]))
                kind = "PROPERTY_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL" if empty else ""
                self._add(kind or "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL", where)
                continue
            if o_model == "partial":
                covered = self.compatible(_extra_schema(original, name), schema)
                state = "IS_COVERED" if covered else "NOT_COVERED"
                self._add(f"PROPERTY_ADDED_{state}_BY_PARTIALLY_OPEN_CONTENT_MODEL", where)
            if name in u_required:
                has_default = isinstance(schema, dict) and "default" in schema
                self._add(
                    "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_UNOPEN_CONTENT_MODEL"
                    if has_default
                    else "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL",
                    where,
                )
            else:
                self._add("OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL", where)
        for name, schema in o_props.items():
            where = f"{path}properties/{name}"
            if name in u_props:
                self._compare(schema, u_props[name], where + "/")
            elif u_model == "open":
                self._add("PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL", where)
            elif u_model == "partial":
                covered = self.compatible(schema, _extra_schema(update, name))
                state = "IS_COVERED" if covered else "NOT_COVERED"
                self._add(f"PROPERTY_REMOVED_{state}_BY_PARTIALLY_OPEN_CONTENT_MODEL", where)
            else:
                self._add("PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL", where)
        for name in sorted(u_required - o_required):
            if name not in o_props and name in u_props:
                continue  # a new property: judged above
            schema = u_props.get(name)
            has_default = isinstance(schema, dict) and "default" in schema
            kind = "REQUIRED_ATTRIBUTE_WITH_DEFAULT_ADDED" if has_default else "REQUIRED_ATTRIBUTE_ADDED"
            self._add(kind, f"{path}required/{name}")
        for name in sorted(o_required - u_required):
            self._add("REQUIRED_ATTRIBUTE_REMOVED", f"{path}required/{name}")
        od, ud = original.get("dependentRequired") or {}, update.get("dependentRequired") or {}
        for name in set(od) | set(ud):
            if name not in ud:
                self._add("DEPENDENCY_ARRAY_REMOVED", f"{path}dependentRequired/{name}")
            elif name not in od:
                self._add("DEPENDENCY_ARRAY_ADDED", f"{path}dependentRequired/{name}")
            elif set(ud[name]) < set(od[name]):
                self._add("DEPENDENCY_ARRAY_NARROWED", f"{path}dependentRequired/{name}")
            elif set(ud[name]) != set(od[name]):
                self._add("DEPENDENCY_ARRAY_EXTENDED", f"{path}dependentRequired/{name}")

    def _array(self, original: dict[str, Any], update: dict[str, Any], path: str) -> None:
        oi, ui = original.get("items", {}), update.get("items", {})
        if isinstance(oi, list) or isinstance(ui, list):  # tuples (draft 7): position by position
            ol = oi if isinstance(oi, list) else []
            ul = ui if isinstance(ui, list) else []
            for i in range(max(len(ol), len(ul))):
                where = f"{path}items/{i}"
                if i < len(ol) and i < len(ul):
                    self._compare(ol[i], ul[i], where + "/")
                elif i < len(ul):
                    self._add("ITEM_ADDED_TO_OPEN_CONTENT_MODEL", where)
                else:
                    self._add("ITEM_REMOVED_FROM_CLOSED_CONTENT_MODEL", where)
        else:
            self._compare(oi, ui, path + "items/")
        if original.get("uniqueItems", False) != update.get("uniqueItems", False):
            kind = "UNIQUE_ITEMS_ADDED" if update.get("uniqueItems") else "UNIQUE_ITEMS_REMOVED"
            self._add(kind, path + "uniqueItems")


def _constraining(schema: Any) -> bool:
    """False for a schema that takes anything ({} or one with annotations only)."""
    if schema is True:
        return False
    if not isinstance(schema, dict):
        return True
    quiet = {"$schema", "$id", "id", "title", "description", "default", "examples", "$comment", "definitions"}
    return any(k not in quiet and k != "$defs" for k in schema)


def _types(schema: dict[str, Any]) -> frozenset[str]:
    t = schema.get("type")
    if isinstance(t, str):
        return frozenset({t})
    if isinstance(t, list):
        return frozenset(str(x) for x in t)
    return frozenset(_JSON_TYPES)  # absent: any type


def _enum_values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    values = schema.get("enum")
    return list(values) if isinstance(values, list) else None


def _has_object(schema: dict[str, Any]) -> bool:
    keys = ("properties", "required", "additionalProperties", "patternProperties", "dependentRequired")
    return schema.get("type") == "object" or any(k in schema for k in keys)


def _has_array(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "array" or "items" in schema


def _content_model(schema: dict[str, Any]) -> str:
    extra = schema.get("additionalProperties", True)
    if schema.get("patternProperties") or (extra is not True and extra is not False and extra != {}):
        return "partial"
    return "closed" if extra is False else "open"


def _extra_schema(schema: dict[str, Any], name: str) -> Any:
    """The schema a partially open model gives an undeclared property ``name``."""
    import re

    for pattern, sub in (schema.get("patternProperties") or {}).items():
        try:
            if re.search(pattern, name):
                return sub
        except re.error:
            continue
    extra = schema.get("additionalProperties", True)
    return {} if extra is True else extra


# ------------------------------------------------------------------------------------------ Protobuf

PROTO_COMPATIBLE = frozenset(
    [
        "PACKAGE_CHANGED",
        "MESSAGE_ADDED",
        "MESSAGE_MOVED",
        "ENUM_ADDED",
        "ENUM_REMOVED",
        "ENUM_CONST_ADDED",
        "ENUM_CONST_CHANGED",
        "ENUM_CONST_REMOVED",
        "FIELD_ADDED",
        "FIELD_REMOVED",
        "FIELD_NAME_CHANGED",
        "FIELD_STRING_OR_BYTES_LABEL_CHANGED",
        "ONEOF_ADDED",
        "ONEOF_REMOVED",
        "ONEOF_FIELD_ADDED",
    ]
)
"""Confluent's protobuf ``SchemaDiff.COMPATIBLE_CHANGES``."""

_SCALAR_KIND = {
    **dict.fromkeys(("int32", "int64", "uint32", "uint64", "bool"), "GENERAL_NUMBER"),
    **dict.fromkeys(("sint32", "sint64"), "SIGNED_NUMBER"),
    **dict.fromkeys(("string", "bytes"), "STRING_OR_BYTES"),
    **dict.fromkeys(("fixed32", "sfixed32"), "FIXED32"),
    **dict.fromkeys(("fixed64", "sfixed64"), "FIXED64"),
    "float": "FLOAT",
    "double": "DOUBLE",
}
"""The wire-compatible groups of scalar types (protobuf's "Updating A Message Type")."""


class ProtoDiff:
    """The differences from ``original`` (the writer's file) to ``update`` (the reader's)."""

    def __init__(self, original: ProtoIndex, update: ProtoIndex) -> None:
        self.o, self.u = original, update
        self.out: list[tuple[str, str]] = []
        self._seen: set[tuple[str, str]] = set()

    def run(self) -> list[tuple[str, str]]:
        if self.o.package != self.u.package:
            self._add("PACKAGE_CHANGED", "#/")
        self._types(self._top(self.o), self._top(self.u), "#/")
        return self.out

    def _add(self, kind: str, path: str) -> None:
        self.out.append((kind, path))

    @staticmethod
    def _top(index: ProtoIndex) -> dict[str, str]:
        return {n: n for n in index.types if "." not in n}

    def _types(self, original: dict[str, str], update: dict[str, str], path: str) -> None:
        """Compare the messages and enums declared in one scope (by simple name -> local full name)."""
        from proto_schema_parser import ast

        o_msgs = [n for n, full in original.items() if isinstance(self.o.types[full], ast.Message)]
        u_msgs = [n for n, full in update.items() if isinstance(self.u.types[full], ast.Message)]
        for name in sorted(set(original) | set(update)):
            where = path + name
            o_full, u_full = original.get(name), update.get(name)
            o_el = self.o.types[o_full] if o_full else None
            u_el = self.u.types[u_full] if u_full else None
            is_enum = isinstance(o_el or u_el, ast.Enum)
            if u_el is None:
                self._add("ENUM_REMOVED" if is_enum else "MESSAGE_REMOVED", where)
            elif o_el is None:
                self._add("ENUM_ADDED" if is_enum else "MESSAGE_ADDED", where)
            elif isinstance(o_el, ast.Enum) and isinstance(u_el, ast.Enum):
                self._enum(o_el, u_el, where)
            elif isinstance(o_el, ast.Message) and isinstance(u_el, ast.Message):
                assert o_full is not None
                assert u_full is not None
                self._message(o_full, u_full, where)
                if name in o_msgs and name in u_msgs and o_msgs.index(name) != u_msgs.index(name):
                    self._add("MESSAGE_MOVED", where)
            else:
                self._add("MESSAGE_REMOVED" if isinstance(o_el, ast.Message) else "ENUM_REMOVED", where)

    def _enum(self, original: Any, update: Any, path: str) -> None:
        from proto_schema_parser import ast

        o = {v.number: v.name for v in original.elements if isinstance(v, ast.EnumValue)}
        u = {v.number: v.name for v in update.elements if isinstance(v, ast.EnumValue)}
        for number in sorted(set(o) | set(u)):
            where = f"{path}.{number}"
            if number not in u:
                self._add("ENUM_CONST_REMOVED", where)
            elif number not in o:
                self._add("ENUM_CONST_ADDED", where)
            elif o[number] != u[number]:
                self._add("ENUM_CONST_CHANGED", where)

    def _message(self, o_full: str, u_full: str, path: str) -> None:
        from proto_schema_parser import ast

        if (o_full, u_full) in self._seen:
            return
        self._seen.add((o_full, u_full))
        om, um = self.o.types[o_full], self.u.types[u_full]
        o_fields = {f.number: f for f in message_fields(om)}
        u_fields = {f.number: f for f in message_fields(um)}
        o_oneof = _oneof_of(om)
        u_oneof = _oneof_of(um)
        for number in sorted(set(o_fields) | set(u_fields)):
            where = f"{path}.{number}"
            of, uf = o_fields.get(number), u_fields.get(number)
            if uf is None:
                assert of is not None
                if _label(of) == "REQUIRED":
                    self._add("REQUIRED_FIELD_REMOVED", where)
                elif number in o_oneof:
                    self._add("ONEOF_FIELD_REMOVED", where)
                else:
                    self._add("FIELD_REMOVED", where)
            elif of is None:
                if _label(uf) == "REQUIRED":
                    self._add("REQUIRED_FIELD_ADDED", where)
                elif number in u_oneof:
                    self._add("ONEOF_FIELD_ADDED", where)
                else:
                    self._add("FIELD_ADDED", where)
            else:
                if of.name != uf.name:
                    self._add("FIELD_NAME_CHANGED", where)
                self._field(of, uf, o_full, u_full, where)
        o_groups = {name: {n for n, g in o_oneof.items() if g == name} for name in set(o_oneof.values())}
        u_groups = {name: {n for n, g in u_oneof.items() if g == name} for name in set(u_oneof.values())}
        for name in sorted(set(o_groups) | set(u_groups)):
            where = f"{path}.{name}"
            if name not in u_groups:
                self._add("ONEOF_REMOVED", where)
                continue
            moved = {n for n in u_groups[name] if n in o_fields and n not in o_oneof}
            if name not in o_groups:
                self._add("ONEOF_ADDED", where)
                if len(moved) > 1:
                    self._add("MULTIPLE_FIELDS_MOVED_TO_ONEOF", where)
            elif moved:
                self._add("FIELD_MOVED_TO_EXISTING_ONEOF", where)
        o_nested = {e.name: f"{o_full}.{e.name}" for e in om.elements if isinstance(e, ast.Message | ast.Enum)}
        u_nested = {e.name: f"{u_full}.{e.name}" for e in um.elements if isinstance(e, ast.Message | ast.Enum)}
        self._types(o_nested, u_nested, path + ".")

    def _field(self, of: Any, uf: Any, o_scope: str, u_scope: str, path: str) -> None:
        from proto_schema_parser import ast

        o_map, u_map = isinstance(of, ast.MapField), isinstance(uf, ast.MapField)
        if o_map != u_map:
            self._add("FIELD_KIND_CHANGED", path)
            return
        if o_map:
            self._types_of(of.key_type, uf.key_type, None, None, o_scope, u_scope, path)
            self._types_of(of.value_type, uf.value_type, None, None, o_scope, u_scope, path)
            return
        self._types_of(of.type, uf.type, _label(of), _label(uf), o_scope, u_scope, path)

    def _types_of(
        self, ot: str, ut: str, o_label: str | None, u_label: str | None, o_scope: str, u_scope: str, path: str
    ) -> None:
        from proto_schema_parser import ast

        o_kind, o_name = self._kind(self.o, ot, o_scope)
        u_kind, u_name = self._kind(self.u, ut, u_scope)
        if o_kind != u_kind:
            self._add("FIELD_KIND_CHANGED", path)
            return
        if o_kind == "SCALAR":
            osk = _SCALAR_KIND.get(ot, "GENERAL_NUMBER")  # an enum is a varint
            usk = _SCALAR_KIND.get(ut, "GENERAL_NUMBER")
            if osk != usk:
                self._add("FIELD_SCALAR_KIND_CHANGED", path)
            elif o_label is not None and u_label is not None and o_label != u_label:
                self._add(
                    "FIELD_STRING_OR_BYTES_LABEL_CHANGED"
                    if osk == "STRING_OR_BYTES"
                    else "FIELD_NUMERIC_LABEL_CHANGED",
                    path,
                )
            return
        if o_name is None or u_name is None:  # from an import: compared by name
            if ot.lstrip(".").split(".")[-1] != ut.lstrip(".").split(".")[-1]:
                self._add("FIELD_NAMED_TYPE_CHANGED", path)
            return
        if o_name != u_name:
            self._add("FIELD_NAMED_TYPE_CHANGED", path)
            return
        if isinstance(self.o.types[o_name], ast.Message):
            sub = ProtoDiff(self.o, self.u)
            sub._seen = self._seen
            sub._message(o_name, u_name, "#/" + o_name)
            self.out += sub.out
            if any(k not in PROTO_COMPATIBLE for k, _ in sub.out):
                self._add("FIELD_NAMED_TYPE_CHANGED", path)

    @staticmethod
    def _kind(index: ProtoIndex, type_name: str, scope: str) -> tuple[str, str | None]:
        from proto_schema_parser import ast

        if type_name in PROTO_SCALARS:
            return "SCALAR", None
        local = index.resolve(type_name, scope)
        if local is not None and isinstance(index.types[local], ast.Enum):
            return "SCALAR", local
        return "MESSAGE", local


def _label(field: Any) -> str:
    card = getattr(field, "cardinality", None)
    return card.value if card is not None else "OPTIONAL"


def _oneof_of(message: Any) -> dict[int, str]:
    from proto_schema_parser import ast

    return {
        f.number: el.name
        for el in message.elements
        if isinstance(el, ast.OneOf)
        for f in el.elements
        if isinstance(f, ast.Field | ast.MapField)
    }
