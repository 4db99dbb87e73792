"""Config models of the content stages: ``[validation]`` (well-formed or refused) and ``[[schemas]]``
(what an event type's data must look like). Schema files are paths relative to the config file."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mediator.core.seams import ConfigModel


class ValidationConfig(ConfigModel):
    """Every inbound event, on every protocol, before routing and commit: data whose ``datacontenttype``
    says JSON must be strict JSON (RFC 8259, UTF-8) nested at most ``max_depth`` deep; ``text/*`` data
    must be UTF-8 (unless a ``charset`` parameter names another encoding); the context attributes must
    be valid CloudEvents 1.0.2 (required ones present, names of lower-case a-z and 0-9, ``time`` RFC 3339,
    ``dataschema`` an absolute URI, ``datacontenttype`` a media type, no control characters) and bounded.
    A refusal is ``Rejected(INVALID)`` (HTTP 400, gRPC INVALID_ARGUMENT, brokers: a dead letter)."""

    enabled: bool = True
    max_depth: int = Field(default=64, ge=1, le=1000, description="JSON nesting, arrays and objects (orjson: 1024)")
    max_data_bytes: int = Field(default=4_194_304, ge=1, description="an event's data; more: 413 / INVALID_ARGUMENT")
    max_attribute_bytes: int = Field(
        default=4096, ge=16, description="one attribute value, the required id, source and type too (UTF-8 bytes)"
    )
    max_attributes: int = Field(default=64, ge=4, description="context attributes per event, the required four too")
    max_context_bytes: int = Field(
        default=16_384, ge=64, description="all the attributes' names and values together (UTF-8 bytes)"
    )
    absent_content_type: Literal["json", "opaque"] = Field(
        default="json",
        description="data without a datacontenttype on HTTP and gRPC: 'json' (as CloudEvents reads it) or "
        "'opaque' (not checked)",
    )
    broker_absent_content_type: Literal["json", "opaque"] = Field(
        default="opaque",
        description="the same on MQTT and AMQP, whose publishers (MQTT 3.1.1 ones always) often send raw "
        "payloads without a content type; an MQTT inbound's content_type fills it in",
    )


class RegistrySubjectConfig(ConfigModel):
    """A subject of the daemon's schema registry (``[registry]``) and the version that applies: an int
    pins one; "latest" is looked up as events arrive (a version registered at run time applies at once)."""

    subject: str = Field(min_length=1)
    version: int | Literal["latest"] = Field(default="latest", description='a version number, or "latest"')

    @field_validator("version")
    @classmethod
    def _version(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value < 2**31:
            raise ValueError("a version is 1 or more")
        return value


class SchemaConfig(ConfigModel):
    """The data of the events it matches must follow a schema.

    Match: ``types`` (globs), ``inbounds`` and ``dataschema`` (the event's CloudEvents ``dataschema``
    attribute, exactly); every key given must match, and at least one is. Every matching schema applies.
    ``kind = "json"``: JSON Schema (draft 7 or 2020-12, by its ``$schema``; 2020-12 without one; no
    remote ``$ref``); ``"protobuf"``: ``file`` is a descriptor set (``protoc --include_imports
    --descriptor_set_out``) and ``message`` a full message name; ``"avro"``: ``file`` is an ``.avsc``,
    the data binary Avro (with ``confluent = true``: after the Confluent wire header, magic byte 0 and a
    4-byte schema id, which must be ``schema_id`` if given).

    Instead of a file, ``schema = { subject = "orders-value", version = "latest" }`` takes the schema from
    the daemon's registry (``[registry]``; JSON or Avro, ``kind`` then optional and checked against the
    registry's type): the event's ``dataschema`` is set to the registry URL of the version that validated
    it, and with ``confluent = true`` the wire header must carry that version's id.
    """

    name: str = Field(min_length=1)
    kind: Literal["json", "protobuf", "avro"] | None = Field(
        default=None, description="required with file; with schema, the registry's type is used"
    )
    file: str | None = Field(default=None, min_length=1, description="relative to the config file")
    registry: RegistrySubjectConfig | None = Field(
        default=None, alias="schema", description="a registry subject and version instead of a file"
    )
    types: list[str] = Field(default_factory=list, description="event types (globs)")
    inbounds: list[str] = Field(default_factory=list)
    dataschema: str | None = Field(default=None, min_length=1, description="the dataschema URI that selects it")
    message: str | None = Field(default=None, description="protobuf: the full message name (pkg.Message)")
    confluent: bool = Field(default=False, description="avro: the Confluent wire header precedes the data")
    schema_id: int | None = Field(default=None, ge=0, description="avro + confluent: the id the header must carry")
    on_invalid: Literal["reject", "dead_letter", "warn"] = Field(
        default="reject",
        description="reject (HTTP 422, gRPC INVALID_ARGUMENT, brokers: a dead letter), dead_letter (accepted, "
        "kept as a dead letter with the reasons), warn (accepted and routed, logged and counted)",
    )
    max_errors: int = Field(default=20, ge=1, le=1000, description="errors reported per event")

    @field_validator("types")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        if any(not t for t in value):
            raise ValueError("an event type glob cannot be empty")
        return value

    @model_validator(mode="after")
    def _shape(self) -> SchemaConfig:
        if (self.file is None) == (self.registry is None):
            raise ValueError("give file (a schema file) or schema (a registry subject), one of them")
        if self.file is not None and self.kind is None:
            raise ValueError("a schema file needs kind ('json', 'protobuf' or 'avro')")
        if self.registry is not None and self.kind == "protobuf":
            raise ValueError("a registry subject validates JSON Schema or Avro data; Protobuf needs a descriptor file")
        if not (self.types or self.inbounds or self.dataschema):
            raise ValueError("say which events it is for: types, inbounds or dataschema")
        if (self.kind == "protobuf") != (self.message is not None):
            raise ValueError("kind = 'protobuf' needs message (a full message name), and only it takes one")
        if self.kind not in ("avro", None) and (self.confluent or self.schema_id is not None):
            raise ValueError("confluent and schema_id are for kind = 'avro'")
        if self.registry is not None and self.schema_id is not None:
            raise ValueError("schema_id comes from the registry with schema = {subject = ...}; leave it out")
        if self.schema_id is not None and not self.confluent:
            raise ValueError("schema_id needs confluent = true")
        return self


class KeyEnvConfig(ConfigModel):
    kid: str = Field(min_length=1, max_length=128, description="the key id written in each JWE's header")
    env: str = Field(min_length=1, description="environment variable holding the key: 32 bytes in base64url")


class EncryptionConfig(ConfigModel):
    """``[encryption.NAME]``: a key ring for the ``encrypt`` and ``decrypt`` transform operations
    (AES-256-GCM, each value a JWE compact serialization, ``alg: dir``, ``enc: A256GCM``, ``kid``).

    Keys come from environment variables (``keys = [{ kid = "2026-02", env = "CARD_KEY_2026_02" }, ...]``)
    or from ``keys_file``, a JWK Set (JSON) of ``kty: "oct"`` keys with ``kid`` and ``k``, relative to the
    config file (re-read on a reload). Several at once for rotation: ``encrypt_kid`` encrypts (default: the
    first listed), any key of the ring decrypts what names its ``kid``."""

    keys: list[KeyEnvConfig] = Field(default_factory=list, description="keys from environment variables")
    keys_file: str | None = Field(default=None, description="a JWK Set file of oct keys (kid, k)")
    encrypt_kid: str | None = Field(default=None, description="the key that encrypts (default: the first)")

    @model_validator(mode="after")
    def _one_source(self) -> EncryptionConfig:
        if bool(self.keys) == (self.keys_file is not None):
            raise ValueError("give exactly one of keys (environment variables) and keys_file")
        kids = [k.kid for k in self.keys]
        dupes = sorted({k for k in kids if kids.count(k) > 1})
        if dupes:
            raise ValueError(f"kid {dupes[0]!r} is listed twice")
        if self.keys and self.encrypt_kid is not None and self.encrypt_kid not in kids:
            raise ValueError(f"encrypt_kid {self.encrypt_kid!r} is none of the keys' kid")
        return self
