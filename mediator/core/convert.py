"""Format conversion of an event's data for one destination: JSON to Protobuf or Avro and back. Pure.

``convert = { to = "protobuf", descriptor_set = "orders.pb", message = "shop.Order" }`` turns JSON data
into the binary Protobuf encoding of ``shop.Order`` (the descriptor set as ``protoc --include_imports
--descriptor_set_out`` writes it); ``to = "json"`` with the same keys turns such bytes back into JSON
(proto3 JSON mapping, field names as in the .proto). ``to = "avro", avro_schema = "order.avsc"`` writes
Avro binary (one datum, no container file); with ``schema_id = N`` it is framed as Confluent's wire
format (magic byte 0, the id as 4 bytes big-endian, then the datum) and ``to = "json"`` expects and
checks that frame.

``to = "avro", subject = "orders-value"`` (``version`` "latest" or a number) takes the Avro schema from
the daemon's schema registry instead of a file, and frames the datum with the Confluent wire header
carrying that version's registry id, as Confluent's serializers do, so Confluent deserializers read it.
The conversion stays pure: it reads the registry's cache (``AvroSource``), which the daemon keeps
current in the background (a version registered here applies at once; through another daemon sharing
the registry, within ``[registry] latest_ttl_s``); a subject the registry does not have dead-letters
the destination with that reason.

JSON to Protobuf or Avro refuses what the target cannot hold, the same way for both (``conform.py``): a
field the target lacks (unless ``unknown_fields = "drop"`` leaves such fields out), a value of the wrong
kind, a required field that is absent (Avro: a field with no default that is not a nullable union;
Protobuf: a proto2 ``required`` field). The refusal is a ``TransformError`` naming the field, so the
destination is dead-lettered with it (``egress.py``).

The converted event's ``datacontenttype`` says what the data is now: ``application/protobuf`` (the
media type IANA registered for the binary encoding), ``application/avro`` or ``application/json``
(``content_type`` overrides it). Its ``dataschema`` becomes the configured ``dataschema``, or is removed
when none is configured (it described the data's earlier form).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mediator.core.conform import (
    AvroConformer,
    Mismatch,
    ProtobufConformer,
    missing_required,
    unknown_binary_fields,
)
from mediator.core.content import NOT_JSON
from mediator.core.envelope import Envelope, data_bytes
from mediator.core.errors import Rejected
from mediator.core.transform import DataGetter, TransformError

PROTOBUF = "application/protobuf"
AVRO = "application/avro"
JSON = "application/json"
_CONFLUENT = struct.Struct(">bI")


class AvroSource(Protocol):
    """Registry versions, from a cache (no I/O): what a ``subject`` conversion encodes with."""

    def current(self, subject: str, version: int | str) -> tuple[int, str] | None:
        """(registry id, Avro schema JSON) of the version; None while it is unknown."""
        ...


class ConvertConfig(BaseModel):
    """``convert = { to = ..., ... }`` on a destination. Files are relative to the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: Literal["protobuf", "avro", "json"]
    descriptor_set: str | None = Field(default=None, description="protoc --descriptor_set_out file")
    message: str | None = Field(default=None, description="full Protobuf message name, e.g. shop.Order")
    avro_schema: str | None = Field(default=None, description="Avro schema file (.avsc, JSON)")
    schema_id: int | None = Field(default=None, ge=0, lt=2**32, description="Confluent wire format schema id")
    subject: str | None = Field(
        default=None, min_length=1, description="to = 'avro': the schema registry subject (instead of avro_schema)"
    )
    version: int | Literal["latest"] = Field(default="latest", description="with subject: a version, or 'latest'")
    unknown_fields: Literal["reject", "drop"] = Field(
        default="reject",
        description="a field the target lacks (JSON to Protobuf or Avro; a field number Protobuf bytes carry that "
        "the message lacks, to JSON) dead-letters the destination (reject) or is left out (drop)",
    )
    ignore_unknown_fields: bool = Field(default=False, description='deprecated: unknown_fields = "drop"')
    content_type: str | None = Field(default=None, description="datacontenttype of the result")
    dataschema: str | None = Field(default=None, description="dataschema of the result (else removed)")

    @model_validator(mode="after")
    def _consistent(self) -> ConvertConfig:
        if self.subject is not None:
            if self.to != "avro" or self.avro_schema is not None or self.schema_id is not None:
                raise ValueError("subject gives to = 'avro' its schema and id; no avro_schema or schema_id with it")
            if self.descriptor_set is not None or self.message is not None:
                raise ValueError("subject is for Avro; descriptor_set and message are for Protobuf")
            return self
        if "version" in self.model_fields_set:
            raise ValueError("version goes with subject")
        proto = self.descriptor_set is not None or self.message is not None
        if proto and (self.descriptor_set is None or self.message is None):
            raise ValueError("Protobuf needs both descriptor_set and message")
        if proto and self.avro_schema is not None:
            raise ValueError("give descriptor_set and message (Protobuf) or avro_schema (Avro), not both")
        if self.to == "protobuf" and not proto:
            raise ValueError("to = 'protobuf' needs descriptor_set and message")
        if self.to == "avro" and self.avro_schema is None:
            raise ValueError("to = 'avro' needs avro_schema")
        if self.to == "json" and not proto and self.avro_schema is None:
            raise ValueError("to = 'json' converts from Protobuf (descriptor_set, message) or Avro (avro_schema)")
        if self.schema_id is not None and self.avro_schema is None:
            raise ValueError("schema_id frames Avro data (Confluent wire format); it needs avro_schema")
        if self.ignore_unknown_fields and "unknown_fields" in self.model_fields_set and self.unknown_fields != "drop":
            raise ValueError('ignore_unknown_fields = true is unknown_fields = "drop"; give unknown_fields only')
        unknown_set = "unknown_fields" in self.model_fields_set or self.ignore_unknown_fields
        if self.to == "json" and self.avro_schema is not None and unknown_set:
            raise ValueError(
                "unknown_fields applies to JSON to Protobuf or Avro, and Protobuf to JSON; not Avro to JSON"
            )
        return self

    @property
    def drops_unknown(self) -> bool:
        return self.unknown_fields == "drop" or self.ignore_unknown_fields


def _load_message_class(path: Path, name: str) -> type[Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # DecodeError
        raise ValueError(f"{path} is not a FileDescriptorSet (protoc --descriptor_set_out): {exc}") from None
    pool = descriptor_pool.DescriptorPool()
    files = {f.name: f for f in fds.file}
    added: set[str] = set()

    def add(fname: str) -> None:
        if fname in added:
            return
        added.add(fname)
        proto = files.get(fname)
        if proto is None:  # not in the set: a well-known type the runtime has (google/protobuf/*.proto)
            try:
                known = descriptor_pool.Default().FindFileByName(fname)
            except KeyError:
                raise ValueError(f"{path} lacks {fname}; run protoc with --include_imports") from None
            proto = descriptor_pb2.FileDescriptorProto()
            known.CopyToProto(proto)
        for dep in proto.dependency:
            add(dep)
        pool.Add(proto)

    try:
        for fname in files:
            add(fname)
        descriptor = pool.FindMessageTypeByName(name)
    except KeyError:
        known_names = sorted(m for f in fds.file for m in _message_names(f))
        raise ValueError(f"no message {name!r} in {path} (it has {', '.join(known_names) or 'none'})") from None
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return message_factory.GetMessageClass(descriptor)


def _message_names(file: Any) -> list[str]:
    prefix = f"{file.package}." if file.package else ""
    return [prefix + m.name for m in file.message_type]


def _load_avro(path: Path) -> Any:
    import fastavro

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    try:
        return fastavro.parse_schema(raw)
    except Exception as exc:  # SchemaParseException, UnknownType, ...
        raise ValueError(f"{path} is not an Avro schema: {exc}") from None


class Converter:
    """A compiled ``ConvertConfig``; reads its files once (raises ValueError naming the problem)."""

    def __init__(self, cfg: ConvertConfig, base_dir: Path) -> None:
        self.config = cfg
        self._message: type[Any] | None = None
        self._avro: Any = None
        self._conform: ProtobufConformer | AvroConformer | None = None
        self._target = ""
        self.source: AvroSource | None = None  # the registry, for a subject (the daemon sets it)
        self._by_id: dict[int, tuple[Any, AvroConformer, bytes]] = {}
        if cfg.descriptor_set is not None and cfg.message is not None:
            self._message = _load_message_class(base_dir / cfg.descriptor_set, cfg.message)
            self._conform = ProtobufConformer(self._message.DESCRIPTOR, drop=cfg.drops_unknown)
            self._target = f"Protobuf {cfg.message}"
        if cfg.avro_schema is not None:
            self._avro = _load_avro(base_dir / cfg.avro_schema)
            self._conform = AvroConformer(self._avro, drop=cfg.drops_unknown)
            named = self._avro.get("name") if isinstance(self._avro, dict) else None
            self._target = f"Avro {named or cfg.avro_schema}"
        self._header = _CONFLUENT.pack(0, cfg.schema_id) if cfg.schema_id is not None else b""
        default = {"protobuf": PROTOBUF, "avro": AVRO, "json": JSON}[cfg.to]
        self._content_type = cfg.content_type or default
        self._convert: Callable[[Envelope, DataGetter], bytes] = (
            self._to_protobuf if cfg.to == "protobuf" else self._to_avro if cfg.to == "avro" else self._to_json
        )

    def apply(self, env: Envelope, data: DataGetter) -> Envelope:
        body = self._convert(env, data)
        out = Envelope()
        out.CopyFrom(env)
        out.binary_data = body
        out.attributes["datacontenttype"].ce_string = self._content_type
        if self.config.dataschema is not None:
            out.attributes["dataschema"].ce_uri = self.config.dataschema
        elif "dataschema" in out.attributes:
            del out.attributes["dataschema"]
        return out

    @staticmethod
    def _json(env: Envelope, data: DataGetter) -> Any:
        try:
            value = data(env)
        except Rejected as exc:
            raise TransformError(exc.reason) from None
        if value is NOT_JSON:
            raise TransformError("the data is not JSON")
        return value

    def _conformed(self, env: Envelope, data: DataGetter) -> Any:
        """The event's JSON data as the target can hold it (see ``conform``); raises TransformError
        naming the field that does not fit."""
        assert self._conform is not None
        value = self._json(env, data)
        try:
            return self._conform.conform(value)
        except Mismatch as exc:
            raise TransformError(f"cannot convert to {self._target}: {exc}") from None

    def _to_protobuf(self, env: Envelope, data: DataGetter) -> bytes:
        from google.protobuf import json_format

        assert self._message is not None
        value = self._conformed(env, data)
        try:
            msg = json_format.ParseDict(value, self._message())
        except json_format.ParseError as exc:
            raise TransformError(f"cannot convert to {self._target}: {exc}") from None
        missing = missing_required(msg)
        if missing:
            fields = ", ".join(repr(m) for m in missing)
            raise TransformError(f"cannot convert to {self._target}: required field {fields} missing")
        body: bytes = msg.SerializeToString()
        return body

    def _from_registry(self) -> tuple[Any, AvroConformer, bytes]:
        """The parsed schema, conformer and wire header of the subject's version now (cached by id)."""
        import fastavro

        subject, version = self.config.subject, self.config.version
        assert subject is not None
        found = self.source.current(subject, version) if self.source is not None else None
        if found is None:
            raise TransformError(f"the schema registry has no version {version} of subject {subject!r}")
        schema_id, text = found
        hit = self._by_id.get(schema_id)
        if hit is None:
            try:
                schema = fastavro.parse_schema(json.loads(text))
            except Exception as exc:  # a schema the registry took and fastavro does not
                raise TransformError(f"registry schema {schema_id} is not usable: {exc}") from None
            if len(self._by_id) >= 64:
                self._by_id.clear()
            hit = self._by_id[schema_id] = (
                schema,
                AvroConformer(schema, drop=self.config.drops_unknown),
                _CONFLUENT.pack(0, schema_id),
            )
        return hit

    def _to_avro(self, env: Envelope, data: DataGetter) -> bytes:
        import fastavro

        schema, header = self._avro, self._header
        if self.config.subject is not None:
            schema, conformer, header = self._from_registry()
            value = self._json(env, data)
            try:
                value = conformer.conform(value)
            except Mismatch as exc:
                raise TransformError(f"cannot convert to Avro ({self.config.subject}): {exc}") from None
        else:
            value = self._conformed(env, data)
        buf = io.BytesIO()
        buf.write(header)
        try:
            fastavro.schemaless_writer(buf, schema, value)
        except Exception as exc:  # what the checks let through and fastavro refuses (a logical type's value)
            raise TransformError(f"cannot convert to {self._target}: {type(exc).__name__}: {exc}") from None
        return buf.getvalue()

    def _to_json(self, env: Envelope, data: DataGetter) -> bytes:
        raw = data_bytes(env)
        if self._message is not None:
            from google.protobuf import json_format

            msg = self._message()
            try:
                msg.ParseFromString(raw)
            except Exception as exc:  # DecodeError
                raise TransformError(f"the data is not a {self.config.message}: {exc}") from None
            # Fields of a newer schema survive parsing as unknown fields and MessageToDict leaves them out.
            if not self.config.drops_unknown:
                unknown = unknown_binary_fields(msg)
                if unknown:
                    raise TransformError(
                        f"cannot convert {self._target} to JSON: field {unknown[0]!r} is not in"
                        f' {self.config.message} (unknown_fields = "drop" leaves such fields out)'
                    )
            value: Any = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        else:
            import fastavro

            if self._header:
                if len(raw) < 5 or raw[0] != 0:
                    raise TransformError("the data is not in the Confluent wire format (magic byte 0)")
                (_, sid) = _CONFLUENT.unpack_from(raw)
                if sid != self.config.schema_id:
                    raise TransformError(f"the data was written with schema id {sid}, not {self.config.schema_id}")
                raw = raw[5:]
            stream = io.BytesIO(raw)
            try:
                value = fastavro.schemaless_reader(stream, self._avro, None)
            except Exception as exc:  # EOFError, ValueError, ... for bytes that are not such a datum
                raise TransformError(f"the data is not Avro of this schema: {type(exc).__name__}: {exc}") from None
            if stream.tell() != len(raw):
                raise TransformError(f"the data has {len(raw) - stream.tell()} bytes after the Avro datum")
        try:
            return orjson.dumps(value)
        except TypeError as exc:
            raise TransformError(f"the converted data is not JSON: {exc}") from None
