"""Schema validation per event type, inbound or ``dataschema`` (``[[schemas]]``): JSON Schema
(jsonschema-rs), Protobuf (a descriptor set) and Avro (fastavro).

Schemas are read and compiled once, by ``load_schemas``: at start-up before the loop serves (a few
small files, like the API key files), and on a config reload inside the reload's thread
(``mediator.daemon``), so the loop never waits on a file. Validating is pure CPU: a compiled
jsonschema-rs validator checks a small document in well under a microsecond, and the JSON it checks
is the batch's shared parse (``batch.data``).

``on_invalid``: ``reject`` refuses (``Rejected(UNPROCESSABLE)`` with every error and its JSON pointer:
HTTP 422, gRPC INVALID_ARGUMENT, a dead letter on the brokers); ``dead_letter`` accepts the event but
commits it as a dead letter with the reasons instead of routing it; ``warn`` routes it, logs
``schema.invalid`` (once a second per schema, with the count in between) and counts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import fastavro
import jsonschema_rs
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from mediator.core.content import NOT_JSON, DataCache, content_type
from mediator.core.envelope import Envelope, data_bytes
from mediator.core.errors import ConfigError, ContentError, NotReady, RejectCode, Rejected
from mediator.core.ingress import Batch
from mediator.core.patterns import compile_glob
from mediator.core.transform import Transform, TransformError
from mediator.stages.content_config import SchemaConfig

log = structlog.get_logger(__name__)

_MATCH_CACHE_SIZE = 4096


def json_pointer(path: Sequence[str | int]) -> str:
    """RFC 6901: ``["items", 0, "a/b"]`` -> ``/items/0/a~1b``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


class Checker(Protocol):
    def errors(self, env: Envelope, data: DataCache, limit: int) -> list[ContentError]:
        """Every problem (at most ``limit``) with ``env``'s data; [] when it is valid."""
        ...


class JsonSchemaChecker:
    def __init__(self, schema: Any) -> None:
        # offline: a $ref to another document is never fetched (no network from a stage).
        self._validator = jsonschema_rs.validator_for(schema, validate_formats=True, offline=True)

    def errors(self, env: Envelope, data: DataCache, limit: int) -> list[ContentError]:
        value = data.get(env)
        if value is NOT_JSON:
            return [ContentError(f"data is not JSON (datacontenttype {content_type(env)!r})", pointer="")]
        if self._validator.is_valid(value):
            return []
        out: list[ContentError] = []
        for err in self._validator.iter_errors(value):
            out.append(ContentError(err.message, pointer=json_pointer(err.instance_path)))
            if len(out) >= limit:
                break
        return out


class ProtobufChecker:
    def __init__(self, descriptor_set: bytes, message: str) -> None:
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
        pool = descriptor_pool.DescriptorPool()
        for file in fds.file:
            pool.Add(file)
        try:
            descriptor = pool.FindMessageTypeByName(message)
        except KeyError:
            raise ValueError(f"the descriptor set has no message {message!r}") from None
        self.full_name = descriptor.full_name
        self._cls: type[Message] = message_factory.GetMessageClass(descriptor)

    def errors(self, env: Envelope, data: DataCache, limit: int) -> list[ContentError]:
        if env.WhichOneof("data") == "proto_data":
            type_url = env.proto_data.type_url
            if type_url.rsplit("/", 1)[-1] != self.full_name:
                return [ContentError(f"data is a {type_url!r}, expected {self.full_name}", pointer="")]
        try:
            msg = self._cls.FromString(data_bytes(env))
        except DecodeError:
            return [ContentError(f"data does not parse as {self.full_name}", pointer="")]
        out = [
            ContentError(f"{e}: required field missing", pointer=_dotted_pointer(e))
            for e in msg.FindInitializationErrors()  # type: ignore[attr-defined]  # (not in the stubs)
        ]
        _unknown_fields(msg, [], out, limit)
        return out[:limit]


def _dotted_pointer(path: str) -> str:
    # FindInitializationErrors: "a.b[2].c" -> /a/b/2/c
    return json_pointer([p for p in path.replace("[", ".").replace("]", "").split(".") if p])


def _unknown_fields(msg: Message, path: list[str | int], out: list[ContentError], limit: int) -> None:
    """Fields the message does not declare, or declares with another wire type (upb keeps both as unknown
    fields): data meant for some other message, or not Protobuf at all."""
    for unknown in UnknownFieldSet(msg):  # type: ignore[attr-defined]  # iterable; the stubs say not
        if len(out) >= limit:
            return
        out.append(
            ContentError(
                f"field number {unknown.field_number} (wire type {unknown.wire_type}) is not one of "
                f"{msg.DESCRIPTOR.full_name}'s",
                pointer=json_pointer(path),
            )
        )
    for fd, value in msg.ListFields():
        if fd.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if _is_map(fd):
            entry_value = fd.message_type.fields_by_name["value"]  # type: ignore[union-attr]  # _is_map checked it
            if entry_value.type == FieldDescriptor.TYPE_MESSAGE:
                for key, item in value.items():
                    _unknown_fields(item, [*path, fd.name, key], out, limit)
        elif fd.is_repeated:
            for i, item in enumerate(value):
                _unknown_fields(item, [*path, fd.name, i], out, limit)
        else:
            _unknown_fields(value, [*path, fd.name], out, limit)


def _is_map(fd: FieldDescriptor) -> bool:
    message_type: Descriptor | None = fd.message_type
    return message_type is not None and message_type.GetOptions().map_entry


class AvroChecker:
    def __init__(self, schema: Any, *, confluent: bool, schema_id: int | None) -> None:
        self._schema = fastavro.parse_schema(schema)
        unbounded = _zero_size_array(self._schema, set())
        if unbounded:
            raise ValueError(
                f"{unbounded}: an array whose items can take zero bytes lets a few bytes claim billions of items"
            )
        self._confluent = confluent
        self._schema_id = schema_id

    def errors(self, env: Envelope, data: DataCache, limit: int) -> list[ContentError]:
        raw = data_bytes(env)
        if self._confluent:
            if len(raw) < 5 or raw[0] != 0:
                return [ContentError("data has no Confluent wire header (magic byte 0, 4-byte schema id)", pointer="")]
            sid = int.from_bytes(raw[1:5], "big")
            if self._schema_id is not None and sid != self._schema_id:
                return [ContentError(f"the wire header names schema id {sid}, expected {self._schema_id}", pointer="")]
            raw = raw[5:]
        buffer = io.BytesIO(raw)
        try:
            fastavro.schemaless_reader(buffer, self._schema, None)
        except EOFError:
            return [ContentError("data ends before the record does", pointer="")]
        except Exception as exc:  # fastavro raises whatever the bytes provoke (IndexError, UnicodeDecodeError...)
            return [ContentError(f"data does not decode as the Avro schema: {type(exc).__name__}: {exc}", pointer="")]
        rest = len(raw) - buffer.tell()
        if rest:
            return [ContentError(f"{rest} bytes after the end of the record", pointer="")]
        return []


def _zero_size(schema: Any, seen: set[str]) -> bool:
    if isinstance(schema, str):
        return schema == "null"
    if isinstance(schema, list):
        return False  # a union's branch index takes a byte
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "fixed":
            return schema.get("size") == 0
        if kind == "record" or kind == "error":
            name = str(schema.get("name"))
            if name in seen:
                return False
            seen.add(name)
            return all(_zero_size(f["type"], seen) for f in schema.get("fields", ()))
        if isinstance(kind, dict | list) or kind == "null":
            return _zero_size(kind, seen)
    return False


def _zero_size_array(schema: Any, seen: set[int]) -> str | None:
    """The name of an array whose items may take no bytes, anywhere in ``schema``; None if there is none."""
    if id(schema) in seen:
        return None
    seen.add(id(schema))
    if isinstance(schema, list):
        return next((n for s in schema if (n := _zero_size_array(s, seen))), None)
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "array":
        if _zero_size(schema.get("items"), set()):
            return "array"
        return _zero_size_array(schema.get("items"), seen)
    if schema.get("type") == "map":
        return _zero_size_array(schema.get("values"), seen)
    if schema.get("type") in ("record", "error"):
        for f in schema.get("fields", ()):
            found = _zero_size_array(f["type"], seen)
            if found:
                return f"{schema.get('name')}.{f['name']}"
    return None


class ResolvedSchema(Protocol):
    """A registry version, as ``mediator.schemaregistry.service.Resolved`` gives it."""

    @property
    def id(self) -> int: ...

    @property
    def url(self) -> str: ...

    @property
    def parsed(self) -> Any: ...  # ParsedSchema: .type ("AVRO", "JSON", ...) and .canonical


class SchemaResolver(Protocol):
    """The daemon's schema registry, as the stage uses it (``mediator.schemaregistry.service.Registry``)."""

    async def resolve(self, subject: str, version: int | str) -> ResolvedSchema:
        """The version (an int or "latest"); raises ``LookupError`` when the subject or version does not
        exist, and any other exception when the registry cannot answer."""
        ...


@dataclass(frozen=True, slots=True)
class RegistrySource:
    subject: str
    version: int | str
    kind: str | None  # the kind the config says, checked against the registry's type
    confluent: bool


class _FromRegistry:
    """The placeholder checker of a schema that comes from the registry (the stage resolves it per event)."""

    def errors(self, env: Envelope, data: DataCache, limit: int) -> list[ContentError]:
        raise AssertionError("resolved by SchemaStage")


_REGISTRY_KINDS = {"JSON": "json", "AVRO": "avro", "PROTOBUF": "protobuf"}


@dataclass(slots=True)
class CompiledSchema:
    name: str
    kind: str
    on_invalid: str
    max_errors: int
    checker: Checker
    types: tuple[Callable[[str], bool], ...]
    inbounds: frozenset[str]
    dataschema: str | None
    digest: str = ""  # SHA-256 of the file: a reload rebuilds the stages when a schema file changed
    registry: RegistrySource | None = None  # schema = { subject = ..., version = ... }

    def matches(self, inbound: str, type_: str, dataschema: str | None) -> bool:
        if self.dataschema is not None and dataschema != self.dataschema:
            return False
        if self.inbounds and inbound not in self.inbounds:
            return False
        return not self.types or any(m(type_) for m in self.types)


def load_schemas(schemas: Sequence[SchemaConfig], base_dir: Path, file: str = "config") -> list[CompiledSchema]:
    """Read and compile every schema (blocking: at start-up or in the reload's thread). Raises
    ``ConfigError(file, ...)`` naming each schema that cannot be read or compiled by its key path."""
    out: list[CompiledSchema] = []
    problems: list[str] = []
    for i, cfg in enumerate(schemas):
        where = f"schemas[{i}].file"
        if cfg.registry is not None:
            ref = cfg.registry
            out.append(
                CompiledSchema(
                    cfg.name,
                    cfg.kind or "registry",
                    cfg.on_invalid,
                    cfg.max_errors,
                    _FromRegistry(),
                    tuple(compile_glob(t) for t in cfg.types),
                    frozenset(cfg.inbounds),
                    cfg.dataschema,
                    f"registry:{ref.subject}:{ref.version}",
                    RegistrySource(ref.subject, ref.version, cfg.kind, cfg.confluent),
                )
            )
            continue
        assert cfg.file is not None  # the model insists, and on kind too
        assert cfg.kind is not None
        path = base_dir / cfg.file
        try:
            raw = path.read_bytes()
        except OSError as exc:
            problems.append(f"{where}: cannot read {str(path)!r}: {exc.strerror or exc}")
            continue
        checker: Checker
        try:
            if cfg.kind == "json":
                checker = JsonSchemaChecker(json.loads(raw))
            elif cfg.kind == "protobuf":
                assert cfg.message is not None  # the config model insists
                checker = ProtobufChecker(raw, cfg.message)
            else:
                checker = AvroChecker(json.loads(raw), confluent=cfg.confluent, schema_id=cfg.schema_id)
        except ValueError as exc:  # json.JSONDecodeError, jsonschema_rs.ValidationError, DecodeError, ...
            problems.append(f"{where}: {cfg.file!r} is not a usable {cfg.kind} schema: {exc}")
            continue
        except Exception as exc:  # the libraries' own errors (fastavro's SchemaParseException, protobuf's TypeError)
            problems.append(f"{where}: {cfg.file!r} is not a usable {cfg.kind} schema: {type(exc).__name__}: {exc}")
            continue
        out.append(
            CompiledSchema(
                cfg.name,
                cfg.kind,
                cfg.on_invalid,
                cfg.max_errors,
                checker,
                tuple(compile_glob(t) for t in cfg.types),
                frozenset(cfg.inbounds),
                cfg.dataschema,
                hashlib.sha256(raw).hexdigest(),
            )
        )
    names = [s.name for s in schemas]
    problems += [f"schemas: name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise ConfigError(file, problems)
    return out


WITHHELD = "(withheld: an encrypted field)"


def withheld(errors: Sequence[ContentError], pointers: Sequence[str]) -> list[ContentError]:
    """``errors`` with the message of each at or under one of ``pointers`` replaced: a validator's message
    may quote the value (``'4111...' is not of type 'integer'``)."""
    out = []
    for e in errors:
        p = e.pointer
        hidden = p is not None and any(p == q or p.startswith(q + "/") for q in pointers)
        out.append(dataclasses.replace(e, message=WITHHELD) if hidden else e)
    return out


def _reason(schema: CompiledSchema, errors: Sequence[ContentError]) -> str:
    listed = "; ".join(f"{e.pointer or '/'}: {e.message}" if e.pointer is not None else e.message for e in errors)
    return f"data does not match schema {schema.name!r} ({schema.kind}): {listed}"


@dataclass(slots=True)
class _WarnLog:
    last: float = 0.0
    suppressed: int = 0


@dataclass(slots=True)
class SchemaStage:
    """The ``schema`` stage: after ``wellformed``, before transforms and routing."""

    schemas: tuple[CompiledSchema, ...]
    # Inbounds whose transform encrypts fields: their errors under those fields quote no value, and a
    # dead-lettered event is kept with those fields encrypted (it is kept before the transform runs).
    sealed: Mapping[str, Transform] = field(default_factory=dict)
    name: str = "schema"
    resolver: SchemaResolver | None = None  # the daemon's registry, for schemas that name a subject
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (schema, outcome) -> events
    _compiled: dict[tuple[int, bool], Checker] = field(default_factory=dict)  # registry id, confluent
    _match: dict[tuple[str, str, str | None], tuple[CompiledSchema, ...]] = field(default_factory=dict)
    _warned: dict[str, _WarnLog] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.schemas)

    def matching(self, env: Envelope) -> tuple[CompiledSchema, ...]:
        ds = env.attributes.get("dataschema")
        dataschema = (ds.ce_uri or ds.ce_string) if ds is not None else None
        key = (env.provenance.inbound, env.type, dataschema)
        found = self._match.get(key)
        if found is None:
            found = tuple(s for s in self.schemas if s.matches(*key))
            if len(self._match) >= _MATCH_CACHE_SIZE:
                self._match.clear()  # types come from senders: bounded, and rebuilt cheaply
            self._match[key] = found
        return found

    async def run(self, batch: Batch) -> None:
        dead: list[tuple[int, str]] = []
        events = batch.events
        for i, env in enumerate(events):
            for schema in self.matching(env):
                url: str | None = None
                if schema.registry is None:
                    errors = schema.checker.errors(env, batch.data, schema.max_errors)
                else:
                    checker, url, errors = await self._from_registry(schema.registry)
                    if checker is not None:
                        errors = checker.errors(env, batch.data, schema.max_errors)
                if not errors:
                    if url is not None:  # the version that validated it (CloudEvents dataschema)
                        env.attributes["dataschema"].ce_uri = url
                    continue
                self._count(schema.name, schema.on_invalid)
                sealing = self.sealed.get(env.provenance.inbound)
                if sealing is not None:
                    errors = withheld(errors, sealing.encrypted_pointers)
                reason = _reason(schema, errors)
                if schema.on_invalid == "reject":
                    where = f"event [{i}]: " if len(events) > 1 else ""
                    raise Rejected(RejectCode.UNPROCESSABLE, where + reason, rule=schema.name, errors=tuple(errors))
                if schema.on_invalid == "dead_letter":
                    dead.append((i, reason))
                    break
                self._warn(schema, env, reason, len(errors))
        if dead:
            # Out of the routed events, into the batch's dead letters (committed with the rest, the
            # sender answered as for the others); the principals stay aligned with the events.
            for i, reason in reversed(dead):
                batch.dead_letters.append((self._sealed(events[i], batch), reason))
                del events[i]
                if len(batch.principals) > i:
                    del batch.principals[i]

    def _sealed(self, env: Envelope, batch: Batch) -> Envelope:
        sealing = self.sealed.get(env.provenance.inbound)
        if sealing is None:
            return env
        try:
            return sealing.seal(env, batch.data.get)
        except TransformError:
            kept = Envelope()
            kept.CopyFrom(env)
            kept.ClearField("data")  # cannot be encrypted (not a JSON object): kept without its data
            return kept

    async def _from_registry(self, src: RegistrySource) -> tuple[Checker | None, str | None, list[ContentError]]:
        """The checker of the version ``src`` names now, and its URL; or the errors that say why there is
        none (no such subject or version, another type). Raises ``NotReady`` when the registry cannot
        answer (its database is down): the sender retries, nothing is refused for the registry's fault."""
        if self.resolver is None:
            return None, None, [ContentError("the schema registry is not running in this daemon", pointer="")]
        try:
            found = await self.resolver.resolve(src.subject, src.version)
        except LookupError as exc:
            return None, None, [ContentError(f"registry subject {src.subject!r}: {exc}", pointer="")]
        except Exception as exc:
            raise NotReady(f"the schema registry cannot answer: {exc}") from exc
        key = (found.id, src.confluent)
        checker = self._compiled.get(key)
        if checker is None:
            kind = _REGISTRY_KINDS.get(found.parsed.type, "")
            if src.kind is not None and kind != src.kind:
                return None, None, [ContentError(f"registry subject {src.subject!r} holds {kind}, not {src.kind}", "")]
            try:
                document = json.loads(found.parsed.canonical)
                if kind == "json":
                    checker = JsonSchemaChecker(document)
                elif kind == "avro":
                    checker = AvroChecker(document, confluent=src.confluent, schema_id=found.id)
                else:
                    return None, None, [ContentError(f"registry subject {src.subject!r} holds {kind}", pointer="")]
            except Exception as exc:  # a schema the registry took and the validator cannot compile
                return None, None, [ContentError(f"registry schema {found.id} cannot be used: {exc}", pointer="")]
            if len(self._compiled) >= _MATCH_CACHE_SIZE:
                self._compiled.clear()
            self._compiled[key] = checker
        return checker, found.url, []

    def _count(self, name: str, outcome: str) -> None:
        key = (name, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _warn(self, schema: CompiledSchema, env: Envelope, reason: str, errors: int) -> None:
        state = self._warned.setdefault(schema.name, _WarnLog())
        now = time.monotonic()
        if now - state.last < 1.0:
            state.suppressed += 1
            return
        log.warning(
            "schema.invalid",
            schema=schema.name,
            event_id=env.id,
            type=env.type,
            inbound=env.provenance.inbound,
            errors=errors,
            reason=reason[:1000],
            total=self.counts.get((schema.name, "warn"), 0),
            suppressed=state.suppressed or None,
        )
        state.last, state.suppressed = now, 0
