"""Schemas as the registry keeps them: parsed, validated and given a canonical text per type.

``parse(kind, text, references)`` is what ``POST /subjects/{subject}/versions`` runs: it refuses what is
not a schema of that type (``InvalidSchema``, the registry's 42201) and returns a ``ParsedSchema`` whose
``canonical`` text is what is stored and served, and whose ``fingerprint`` decides identity: the same
schema registered again, under any subject, gets the same id (as Confluent's registry does).

- AVRO (the default when ``schemaType`` is absent, as in Confluent's API): parsed by the Apache ``avro``
  package, whose ``ReaderWriterCompatibilityChecker`` the compatibility rules then use; named types of
  referenced schemas are known while parsing. Canonical text: the parsed schema's JSON, compact.
- JSON: JSON Schema, compiled by jsonschema-rs (draft by its ``$schema``); canonical: the document's JSON,
  compact, keys in their order.
- PROTOBUF: ``.proto`` text parsed by ``proto-schema-parser`` (a pure-Python parser of the language; the
  daemon has no protoc at run time), then checked: field numbers unique per message, every named type
  resolvable in the file (or qualified from an import). Canonical: the text, line endings normalised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

SchemaType = Literal["AVRO", "JSON", "PROTOBUF"]
SCHEMA_TYPES: tuple[SchemaType, ...] = ("AVRO", "JSON", "PROTOBUF")

PROTO_SCALARS = frozenset(
    [
        "double",
        "float",
        "int32",
        "int64",
        "uint32",
        "uint64",
        "sint32",
        "sint64",
        "fixed32",
        "fixed64",
        "sfixed32",
        "sfixed64",
        "bool",
        "string",
        "bytes",
    ]
)


class InvalidSchema(ValueError):
    """The text is not a schema of its type (42201); the message says why."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A schema this one uses: ``name`` as the schema says it (an Avro full name, an import path, a
    $ref URL), found under ``subject`` at ``version``."""

    name: str
    subject: str
    version: int

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "subject": self.subject, "version": self.version}


@dataclass(frozen=True, slots=True)
class ParsedSchema:
    type: SchemaType
    canonical: str
    references: tuple[Reference, ...]
    parsed: Any  # avro.schema.Schema | the JSON document | proto_schema_parser's ast.File

    @property
    def fingerprint(self) -> str:
        refs = json.dumps([r.to_json() for r in self.references], separators=(",", ":"))
        return hashlib.sha256(f"{self.type}\n{refs}\n{self.canonical}".encode()).hexdigest()


def parse(
    kind: SchemaType,
    text: str,
    references: Sequence[Reference] = (),
    resolved: Mapping[str, ParsedSchema] | None = None,
) -> ParsedSchema:
    """Parse ``text`` as a schema of ``kind``; ``resolved`` maps each reference's name to its parsed
    schema (the caller looked them up). Raises ``InvalidSchema``."""
    refs = tuple(references)
    if kind == "AVRO":
        return _avro(text, refs, resolved or {})
    if kind == "JSON":
        return _json(text, refs)
    return _protobuf(text, refs)


def _avro(text: str, refs: tuple[Reference, ...], resolved: Mapping[str, ParsedSchema]) -> ParsedSchema:
    import avro.errors
    import avro.name
    import avro.schema

    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidSchema(f"Invalid schema: not JSON: {exc}") from None
    names = avro.name.Names()
    try:
        for ref in refs:
            dep = resolved.get(ref.name)
            if dep is None or dep.type != "AVRO":
                raise InvalidSchema(f"Invalid schema: reference {ref.name!r} is not an Avro schema")
            avro.schema.make_avsc_object(dep.parsed.to_json(), names)
        schema = avro.schema.make_avsc_object(doc, names)
    except InvalidSchema:
        raise
    except (avro.errors.AvroException, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise InvalidSchema(f"Invalid schema: {exc}") from None
    canonical = json.dumps(schema.to_json(), separators=(",", ":"), ensure_ascii=False)
    return ParsedSchema("AVRO", canonical, refs, schema)


def _json(text: str, refs: tuple[Reference, ...]) -> ParsedSchema:
    import jsonschema_rs

    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidSchema(f"Invalid schema: not JSON: {exc}") from None
    if not isinstance(doc, dict | bool):
        raise InvalidSchema("Invalid schema: a JSON Schema is an object or a boolean")
    try:
        if not jsonschema_rs.meta.is_valid(doc):
            jsonschema_rs.meta.validate(doc)  # raises with the reason
        jsonschema_rs.validator_for(doc, offline=True)
    except Exception as exc:  # ValidationError, ReferencingError, ValueError (an unknown $schema)
        if refs and "Unresolvable" in str(exc):
            pass  # a $ref to a referenced schema: not resolvable offline, and not ours to fetch
        else:
            raise InvalidSchema(f"Invalid schema: {exc}") from None
    canonical = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return ParsedSchema("JSON", canonical, refs, doc)


def _protobuf(text: str, refs: tuple[Reference, ...]) -> ParsedSchema:
    from proto_schema_parser import ast
    from proto_schema_parser.parser import Parser

    normalised = text.replace("\r\n", "\n").strip() + "\n"
    try:
        # ANTLR recovers from syntax errors and prints them: a listener that raises makes them refusals.
        file = Parser(setup_lexer=_strict, setup_parser=_strict).parse(normalised)
    except InvalidSchema:
        raise
    except Exception as exc:  # what the AST builder raises for what the grammar let through
        raise InvalidSchema(f"Invalid schema: {type(exc).__name__}: {exc}") from None
    if not isinstance(file, ast.File):
        raise InvalidSchema("Invalid schema: not a .proto file")
    ProtoIndex(file).validate()
    return ParsedSchema("PROTOBUF", normalised, refs, file)


def _strict(recognizer: Any) -> None:
    from antlr4.error.ErrorListener import ErrorListener

    class Refuse(ErrorListener):  # type: ignore[misc]  # antlr4 ships no type hints
        def syntaxError(self, recognizer: Any, symbol: Any, line: int, column: int, msg: str, e: Any) -> None:
            raise InvalidSchema(f"Invalid schema: line {line}:{column}: {msg}")

    recognizer.removeErrorListeners()
    recognizer.addErrorListener(Refuse())


class ProtoIndex:
    """The messages and enums of a parsed ``.proto`` by their names within the package
    (``Outer.Inner``), and name resolution as protoc does it: innermost scope first."""

    def __init__(self, file: Any) -> None:
        from proto_schema_parser import ast

        self.file = file
        self.package = next((e.name for e in file.file_elements if isinstance(e, ast.Package)), "")
        self.imports = [e.name for e in file.file_elements if isinstance(e, ast.Import)]
        self.types: dict[str, Any] = {}
        self._collect(file.file_elements, "")

    def _collect(self, elements: Sequence[Any], prefix: str) -> None:
        from proto_schema_parser import ast

        for el in elements:
            if isinstance(el, ast.Message | ast.Enum):
                name = prefix + el.name
                self.types[name] = el
                if isinstance(el, ast.Message):
                    self._collect(el.elements, name + ".")

    def resolve(self, type_name: str, scope: str) -> str | None:
        """The local name of the type ``type_name`` means inside message ``scope``; None if not here."""
        name = type_name
        if name.startswith("."):
            name = name[1:]
            if self.package and name.startswith(self.package + "."):
                name = name[len(self.package) + 1 :]
            return name if name in self.types else None
        if self.package and name.startswith(self.package + ".") and name[len(self.package) + 1 :] in self.types:
            return name[len(self.package) + 1 :]
        parts = scope.split(".") if scope else []
        while True:
            candidate = ".".join([*parts, name])
            if candidate in self.types:
                return candidate
            if not parts:
                return None
            parts.pop()

    def validate(self) -> None:
        from proto_schema_parser import ast

        for name, el in self.types.items():
            if not isinstance(el, ast.Message):
                continue
            numbers: dict[int, str] = {}
            for f in message_fields(el):
                if f.number in numbers:
                    used = f"field number {f.number} is used by {numbers[f.number]!r} and {f.name!r}"
                    raise InvalidSchema(f"Invalid schema: {name}: {used}")
                numbers[f.number] = f.name
                for t in field_types(f):
                    if t in PROTO_SCALARS or self.resolve(t, name) is not None:
                        continue
                    if self.imports and "." in t.lstrip("."):
                        continue  # from an imported file (a reference, or a well-known type)
                    raise InvalidSchema(f"Invalid schema: {name}.{f.name}: type {t!r} is not defined")


def message_fields(message: Any) -> list[Any]:
    """Every field of a message, those inside its oneofs too (Field and MapField nodes)."""
    from proto_schema_parser import ast

    out: list[Any] = []
    for el in message.elements:
        if isinstance(el, ast.Field | ast.MapField):
            out.append(el)
        elif isinstance(el, ast.OneOf):
            out.extend(e for e in el.elements if isinstance(e, ast.Field | ast.MapField))
    return out


def field_types(field: Any) -> list[str]:
    from proto_schema_parser import ast

    if isinstance(field, ast.MapField):
        return [field.key_type, field.value_type]
    return [field.type]
