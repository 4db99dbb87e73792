"""The fuzz targets: every decoder that takes bytes from outside, called as the daemon calls it.

Each target is a one-input function: it returns when the input was decoded, or refused the documented
way (``Target.refusal`` says which exception, and the function catches exactly that); any other
exception, a crash or a hang is a finding. Each decoded event then goes on as the daemon sends it on:
through the ``wellformed`` checks (the first pipeline stage, same refusal) and, once accepted, through
every outbound encoding (which must never fail on an accepted event, and whose JSON must be strict JSON).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiormq.abc
import orjson
from aio_pika.message import IncomingMessage
from aiomqtt import Message as AiomqttMessage
from multidict import CIMultiDict, CIMultiDictProxy
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pamqp import commands as pamqp_commands
from pamqp.header import ContentHeader

from adapters.amqp import codec as amqp_codec
from adapters.amqp.inbound import wire_message as amqp_wire
from adapters.grpc import codec as grpc_codec
from adapters.http import codec as http_codec
from adapters.http.outbound import parse_consent
from adapters.mqtt import codec as mqtt_codec
from adapters.mqtt import speedups as mqtt_speedups
from adapters.mqtt.inbound import wire_message as mqtt_wire
from mediator.config import load as load_config
from mediator.core import formats
from mediator.core.content import DataCache
from mediator.core.envelope import Envelope
from mediator.core.errors import ConfigError, Rejected
from mediator.core.patterns import Template
from mediator.core.prefer import applied, prefer_wait
from mediator.core.signatures import decode_standard_secret, standard_candidates
from mediator.core.tracecontext import valid_traceparent
from mediator.registry import load_specs
from mediator.stages.authn import JwtAuthenticator, looks_like_jwt, parse_key_file, unverified_issuer
from mediator.stages.config import JwtAuthConfig, WebhookAuthConfig
from mediator.stages.content_config import ValidationConfig
from mediator.stages.webhooks import WebhookAuthenticator
from mediator.stages.wellformed import WellFormed, rfc3339_problem
from mediator.v1.envelope_pb2 import Envelope as PbEnvelope

from .inputs import join_fields, join_head, split_fields, split_head

OneInput = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    one_input: OneInput
    refusal: str  # the documented refusal, in words (docs/fuzzing.md lists them)
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096


# ---------------------------------------------------------------- what every decoded event goes through

_WELLFORMED = WellFormed(ValidationConfig())


def _onward(events: list[Envelope], *, broker: bool) -> None:
    """The wellformed stage on the decoded events (``Rejected`` is its refusal), then every outbound
    encoding of each accepted one: an event the gateway accepted must be deliverable in every format, and
    its structured and batch JSON must parse as strict JSON."""
    cache = DataCache()
    for env in events:
        try:
            _WELLFORMED.check(env, cache, absent_json=not broker)
        except Rejected:
            return
    for env in events:
        for fmt in formats.FORMATS:
            http_codec.from_envelope(env, fmt)
            mqtt_codec.from_envelope(env, "t/x", fmt, v5=True)
            mqtt_codec.from_envelope(env, "t/x", fmt, v5=False)
            amqp_codec.from_envelope(env, fmt)
        grpc_codec.from_envelope(env)
        # What a consumer parses must be JSON by RFC 8259 (orjson is strict: no NaN, no Infinity).
        orjson.loads(formats.to_structured(env))
        orjson.loads(formats.to_batch([env]))


# ------------------------------------------------------------ HTTP CloudEvents (binary, structured, batch, Protobuf)

_HTTP_MAX_BATCH = 8


def http_cloudevents(data: bytes) -> None:
    """Headers and body of a request to an HTTP inbound, as ``HttpInbound.decode`` reads them: the
    codec's ``Rejected``, and the ``ValueError``/``TypeError`` that ``decode`` turns into
    ``Rejected(INVALID)`` (protobuf refusing a surrogate-escaped string), are the refusal."""
    pairs, body = split_head(data)
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    try:
        events = http_codec.to_envelopes(headers, body, max_batch=_HTTP_MAX_BATCH)
    except (Rejected, ValueError, TypeError):
        return
    _onward(events, broker=False)


def _http_seeds() -> list[bytes]:
    ce = [("ce-specversion", "1.0"), ("ce-id", "a%20b"), ("ce-source", "/s"), ("ce-type", "t")]
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": {"a": [1, 2.5, None]}}
    b64 = {
        "specversion": "1.0",
        "id": "2",
        "source": "/s",
        "type": "t",
        "data_base64": "AAEC",
        "time": "2026-01-01T00:00:00Z",
    }
    pb = PbEnvelope(id="3", source="/s", spec_version="1.0", type="t", text_data="hi")
    pb.attributes["subject"].ce_string = "x"
    return [
        join_head([*ce, ("Content-Type", "application/json")], b'{"x": 1}'),
        join_head([*ce, ("ce-time", '"2026-12-08T01:02:03.5+01:00"'), ("ce-dataschema", "https://x/y")], b"raw"),
        join_head([("Content-Type", "application/cloudevents+json; charset=utf-8")], json.dumps(event).encode()),
        join_head([("Content-Type", "application/cloudevents-batch+json")], json.dumps([event, b64]).encode()),
        join_head([("Content-Type", "application/cloudevents+protobuf")], pb.SerializeToString()),
        join_head([("Content-Type", "text/plain")], b"no cloudevent"),
    ]


# ---------------------------------------------------------------- MQTT inbound (payload + MQTT 5 properties)

mqtt_speedups.install()  # as the daemon does: the patched Properties are what decodes a PUBLISH
_MQTT_RULES = [
    mqtt_codec.InboundRules("in", Template.compile("io.mediator.mqtt.message"), Template.compile("mqtt://{inbound}")),
    mqtt_codec.InboundRules(
        "in", Template.compile("t.{topic.1}"), Template.compile("/{topic.-1}/{subject}"), "text/plain", "raw"
    ),
    mqtt_codec.InboundRules("in", Template.compile("t"), Template.compile("s"), None, "structured"),
]


def mqtt_inbound(data: bytes) -> None:
    """One MQTT 5 PUBLISH as the inbound reads it: a rules byte, the topic, the properties in their wire
    form (decoded by paho, as the connection does), the payload; ``wire_message`` then ``to_envelope``.
    The refusal is ``Rejected`` (the inbound dead-letters it). Bytes paho cannot decode as properties
    (its MQTTException, or the struct/index errors of a short buffer) are the broker's business: mosquitto
    refuses such a packet before it is forwarded, so they never reach the codec."""
    if not data:
        return
    rules = _MQTT_RULES[data[0] % len(_MQTT_RULES)]
    topic_raw, props_raw, payload = split_fields(data[1:], 3)
    try:
        topic = topic_raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # paho refuses a topic that is not UTF-8 (MQTT 5 section 1.5.4)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    try:
        props.unpack(props_raw)  # type: ignore[no-untyped-call]
    except Exception:
        return
    try:
        message = AiomqttMessage(topic, payload, 1, False, 1, props)
    except ValueError:
        return  # aiomqtt's Topic refuses an empty topic or a wildcard: no broker forwards such a PUBLISH
    try:
        events = mqtt_codec.to_envelope(mqtt_wire(message), rules)
    except Rejected:
        return
    _onward(events, broker=True)


def _mqtt_props(content_type: str | None, user: list[tuple[str, str]]) -> bytes:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if content_type is not None:
        props.ContentType = content_type
    if user:
        props.UserProperty = user
    return bytes(props.pack())  # type: ignore[no-untyped-call]


def _mqtt_seeds() -> list[bytes]:
    event = json.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": "x"}).encode()
    binary = [("specversion", "1.0"), ("id", "9"), ("source", "/d"), ("type", "t"), ("subject", "s")]
    trace = ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    return [
        b"\x00" + join_fields(b"sensors/1/temp", _mqtt_props(None, []), b"21.5"),
        b"\x00" + join_fields(b"a/b", _mqtt_props("application/cloudevents+json", []), event),
        b"\x00" + join_fields(b"a/b", _mqtt_props("application/json", [*binary, trace]), b'{"v": 1}'),
        b"\x01" + join_fields(b"x/y/z", _mqtt_props("text/plain", [("subject", "q")]), b"hello"),
        b"\x02" + join_fields(b"x", _mqtt_props(None, []), event),
        b"\x00" + join_fields(b"b", _mqtt_props("application/cloudevents-batch+json", []), b"[" + event + b"]"),
    ]


# ---------------------------------------------------------------- AMQP inbound (body + properties/headers)

_AMQP_RULES: list[tuple[Template, Template, amqp_codec.Decode]] = [
    (Template.compile("io.mediator.amqp.message"), Template.compile("amqp://{inbound}"), "auto"),
    (Template.compile("t.{topic.0}"), Template.compile("/{topic.-1}"), "raw"),
    (Template.compile("t"), Template.compile("s"), "structured"),
]


def amqp_inbound(data: bytes) -> None:
    """One delivery as the inbound reads it: a rules byte, the routing key, the content header's property
    list in its wire form (decoded by pamqp, as aiormq does, into aio-pika's ``IncomingMessage``), the
    body; ``wire_message`` then ``to_envelope``. The refusal is ``Rejected`` (the inbound dead-letters
    it). pamqp's own refusal of bytes that are no property list (its ``ValueError``) ends the input: RabbitMQ
    never forwards such a frame; nor a message whose ``expiration`` is not whole milliseconds (RabbitMQ refuses
    the publish), which aio-pika would fail to read. Anything else pamqp or aio-pika raise on a property list RabbitMQ
    would forward is a finding too: it is raised inside the daemon's connection."""
    if not data:
        return
    type_t, source_t, decode = _AMQP_RULES[data[0] % len(_AMQP_RULES)]
    key_raw, props_raw, body = split_fields(data[1:], 3)
    header = ContentHeader()
    try:
        header.unmarshal(struct.pack(">HHQ", 60, 0, len(body)) + props_raw)
    except ValueError:
        return
    expiration = header.properties.expiration
    if expiration is not None and not (expiration.isascii() and expiration.isdigit()):
        return  # RabbitMQ refuses the publish (PRECONDITION_FAILED): no such delivery exists
    if header.properties.delivery_mode not in (None, 1, 2):
        # aio-pika's IncomingMessage raises ValueError on any other delivery mode, before the inbound's code
        # runs (found by atheris; RabbitMQ forwards the property as published): a limit of the client
        # library, reported in docs/fuzzing.md, not the codec's to refuse.
        return
    deliver = pamqp_commands.Basic.Deliver(routing_key=key_raw.decode("utf-8", "replace"))
    message = IncomingMessage(aiormq.abc.DeliveredMessage(deliver, header, body, None))  # type: ignore[arg-type]
    try:
        env = amqp_codec.to_envelope(
            amqp_wire(message), inbound="in", type_template=type_t, source_template=source_t, decode=decode
        )
    except Rejected:
        return
    _onward([env], broker=True)


def _amqp_props(**kwargs: object) -> bytes:
    return bytes(pamqp_commands.Basic.Properties(**kwargs).marshal())  # type: ignore[arg-type]


def _amqp_seeds() -> list[bytes]:
    event = json.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": [1]}).encode()
    ce = {"cloudEvents_specversion": "1.0", "cloudEvents_id": "7", "cloudEvents_source": "/x", "ce-type": "t"}
    when = datetime(2026, 12, 8, 1, 2, 3, tzinfo=UTC)
    return [
        b"\x00" + join_fields(b"orders.eu", _amqp_props(content_type="application/json"), b'{"n": 1}'),
        b"\x00" + join_fields(b"k", _amqp_props(content_type="application/cloudevents+json"), event),
        b"\x00"
        + join_fields(
            b"k",
            _amqp_props(
                content_type="text/plain",
                headers={**ce, "cloudEvents_n": 5, "cloudEvents_b": True, "traceparent": "00-x", "tracestate": 1.5},
                message_id="m1",
                timestamp=when,
                user_id="guest",
            ),
            b"hi",
        ),
        b"\x01" + join_fields(b"a.b.c", _amqp_props(message_id="m2", timestamp=when, message_type="x"), b"\xff\x00"),
        b"\x02" + join_fields(b"k", _amqp_props(), event),
    ]


# ------------------------------------------------------------ Protobuf envelope (gRPC Publish, CloudEvents Protobuf)


def protobuf_envelope(data: bytes) -> None:
    """The canonical envelope (mediator.v1.Envelope) from bytes, both ways it arrives: a gRPC
    Publish/PublishStream request (the server's ``lenient`` deserializer, then ``to_envelope``) and a
    CloudEvents Protobuf body (``formats.from_protobuf``). The refusal is ``Rejected``."""
    request = grpc_codec.lenient(PbEnvelope)(data)
    try:
        env = grpc_codec.to_envelope(request, inbound="in", method="Publish", received_ns=1_765_000_000_000_000_000)
    except Rejected:
        pass
    else:
        _onward([env], broker=False)
    try:
        formats.from_protobuf(data)
    except Rejected:
        return


def _protobuf_seeds() -> list[bytes]:
    full = PbEnvelope(id="1", source="/s", spec_version="1.0", type="t", binary_data=b"\x00\x01")
    full.attributes["time"].ce_timestamp.FromSeconds(1_765_000_000)
    full.attributes["dataschema"].ce_uri = "https://x/y"
    full.attributes["datacontenttype"].ce_string = "application/octet-stream"
    full.attributes["n"].ce_integer = -5
    full.attributes["b"].ce_boolean = True
    full.provenance.inbound = "forged"
    json_data = PbEnvelope(id="2", source="/s", spec_version="1.0", type="t", text_data='{"a": {"b": [1]}}')
    json_data.attributes["datacontenttype"].ce_string = "application/json"
    return [full.SerializeToString(), json_data.SerializeToString(), b"", b"\x0a\x01"]


# ---------------------------------------------------------------- well-formedness checks


def wellformed(data: bytes) -> None:
    """``WellFormed.check`` on any envelope the Protobuf wire format can express (so every field, every
    attribute type, every data kind, unvalidated), under the default and the smallest limits, with JSON
    data both with and without a datacontenttype. The refusal is ``Rejected``."""
    env = PbEnvelope()
    try:
        env.ParseFromString(data)
    except Exception:  # upb's DecodeError: no envelope at all, nothing to check
        return
    for stage in _WELLFORMED_STAGES:
        for absent_json in (True, False):
            try:
                stage.check(env, DataCache(stage.cfg.max_depth), absent_json)
            except Rejected:
                continue
    rfc3339_problem(env.id)


_WELLFORMED_STAGES = [
    _WELLFORMED,
    WellFormed(
        ValidationConfig(max_attribute_bytes=16, max_attributes=5, max_context_bytes=80, max_data_bytes=32, max_depth=2)
    ),
]


# ---------------------------------------------------------------- JWT, before and after the signature check

_JWT_SECRET = b"fuzz-secret-of-at-least-32-bytes-for-hs256"
_JWT_ENV = "MEDIATOR_FUZZ_JWT_SECRET"
_JWT: JwtAuthenticator | None = None
_LOOP: asyncio.AbstractEventLoop | None = None


def _jwt() -> tuple[JwtAuthenticator, asyncio.AbstractEventLoop]:
    global _JWT, _LOOP
    if _JWT is None or _LOOP is None:
        os.environ[_JWT_ENV] = _JWT_SECRET.decode()
        cfg = JwtAuthConfig.model_validate(
            {
                "kind": "jwt",
                "issuer": "https://issuer.example",
                "audience": ["mediator"],
                "algorithms": ["HS256"],
                "secret_env": _JWT_ENV,
                "roles_claim": "roles",
                "claims": ["tenant", "exp"],
                "cache_size": 16,
            }
        )
        _JWT = JwtAuthenticator("jwt", cfg, Path("."))
        _JWT.load_sync()
        _LOOP = asyncio.new_event_loop()
    return _JWT, _LOOP


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _signed(header: bytes, claims: bytes) -> str:
    signing_input = f"{_b64(header)}.{_b64(claims)}"
    signature = hmac.digest(_JWT_SECRET, signing_input.encode("ascii"), hashlib.sha256)
    return f"{signing_input}.{_b64(signature)}"


def jwt_token(data: bytes) -> None:
    """A bearer token as ``JwtAuthenticator.verify`` and the issuer pick (``unverified_issuer``) read it.
    Mode byte 0: the input is the token itself (UTF-8, surrogate-escaped as an HTTP header arrives);
    otherwise it is a JOSE header and a claims set, each any bytes, signed with the right key, so the
    claims are decoded and checked after a valid signature. The refusal is ``Rejected(UNAUTHENTICATED)``."""
    if not data:
        return
    auth, loop = _jwt()
    if data[0] % 2 == 0:
        token = data[1:].decode("utf-8", "surrogateescape")
    else:
        header, claims = split_fields(data[1:], 2)
        token = _signed(header, claims)
    looks_like_jwt(token)
    unverified_issuer(token)
    try:
        loop.run_until_complete(auth.verify(token))
    except Rejected:
        return


def _jwt_seeds() -> list[bytes]:
    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    claims = {"iss": "https://issuer.example", "aud": "mediator", "sub": "u1", "exp": 4_000_000_000}
    good = json.dumps({**claims, "roles": ["a", "b"], "tenant": {"id": 1}}).encode()
    return [
        b"\x01" + join_fields(header, good),
        b"\x01" + join_fields(header, json.dumps({**claims, "exp": 1}).encode()),
        b"\x01" + join_fields(json.dumps({"alg": "HS256", "crit": ["x"]}).encode(), good),
        b"\x01" + join_fields(header, json.dumps({**claims, "aud": ["x", "mediator"], "nbf": 1, "iat": 2}).encode()),
        b"\x00" + _signed(header, good).encode(),
        b"\x00eyJhbGciOiJub25lIn0.e30.",
    ]


# ---------------------------------------------------------------- config loader on mutated TOML

_SPECS = load_specs()
_CONFIG_FILE: list[Path] = []
_REPO = Path(__file__).resolve().parent.parent


def _config_file() -> Path:
    if not _CONFIG_FILE:
        folder = tempfile.mkdtemp(prefix="mediator-fuzz-config-")
        atexit.register(shutil.rmtree, folder, True)
        _CONFIG_FILE.append(Path(folder) / "config.toml")
    return _CONFIG_FILE[0]


def config_toml(data: bytes) -> None:
    """A config file as ``mediator check``, start-up and ``mediator.config.load`` read it (from a file in
    a directory of its own). The refusal is ``ConfigError`` (naming the file and every problem)."""
    path = _config_file()
    path.write_bytes(data)
    try:
        load_config(path, _SPECS)
    except ConfigError:
        return


def _config_seeds() -> list[bytes]:
    seeds = [(_REPO / "config.toml").read_bytes()] if (_REPO / "config.toml").is_file() else []
    return [
        *seeds,
        b'[listeners.web]\nkind = "http"\nport = 8080\n\n[inbound.in]\nkind = "http"\nlistener = "web"\npath = "/e"\n'
        b'\n[brokers.r]\nkind = "amqp"\nurl = "amqp://guest:guest@127.0.0.1/"\n\n[outbound.out]\nkind = "amqp"\n'
        b'broker = "r"\nexchange = "x"\n\n[[routes]]\nname = "all"\nmatch = { inbound = ["in"], type = ["a.*"] }\n'
        b'to = [{ outbound = "out", address = "{topic.1}" }]\n',
        b"[daemon]\nlog_level = 5\n[outbox]\nmax_pending = -1\n",
        b"[[routes]]\nmatch = {}\n",
    ]


# ---------------------------------------------------------------- the small parsers of header values

_WEBHOOK_ENV = {"S1": "whsec_" + base64.b64encode(b"k" * 32).decode(), "S2": "a-raw-secret-of-32-bytes-at-least!!"}


def _webhook(cfg: dict[str, object]) -> WebhookAuthenticator:
    auth = WebhookAuthenticator("hook", WebhookAuthConfig.model_validate({"kind": "webhook", "principal": "p", **cfg}))
    auth.load_sync(_WEBHOOK_ENV)
    return auth


_WEBHOOKS = [
    _webhook({"scheme": "standard-webhooks", "secrets_env": ["S1"]}),
    _webhook({"scheme": "github", "secrets_env": ["S2"]}),
    _webhook({"scheme": "hmac", "secrets_env": ["S2"], "header": "x-sig", "encoding": "base64", "prefix": "v1="}),
]


def header_values(data: bytes) -> None:
    """Every other parser of a value a peer sends: ``Prefer`` (``prefer_wait``), ``traceparent``,
    ``Retry-After`` (``parse_retry_after``), ``ce-`` header percent-decoding, the webhook-subscription
    consent headers (``parse_consent``), webhook signatures (all three schemes: headers and body), the
    Standard Webhooks secret and an API key file. Refusals: ``Rejected`` (from the header decoding and the
    webhook verifiers), ``ValueError`` from ``decode_standard_secret`` (its documented refusal; the
    caller reports it as a config problem), ``ConfigError`` from the key file; the others return None or
    a refusal tuple for anything."""
    pairs, body = split_head(data)
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    for _name, value in pairs:
        wait = prefer_wait(value)
        if wait is not None:
            applied(wait)
        valid_traceparent(value)
        http_codec.parse_retry_after(value, 1_765_000_000.0)
        parse_consent(200, [value], [value], "https://origin.example", 5)
        standard_candidates(value)
        with contextlib.suppress(Rejected):
            http_codec.decode_header_value(value)
        with contextlib.suppress(ValueError):
            decode_standard_secret(value)
    for hook in _WEBHOOKS:
        if not hook.offered(headers):
            continue
        try:
            hook.check_headers(headers)
            hook.verify(headers, body)
        except Rejected:
            pass
    try:
        parse_key_file(body.decode("utf-8", "replace"), "keys.toml", "keys", "user")
    except ConfigError:
        return


def _header_seeds() -> list[bytes]:
    key_file = (
        b'[[keys]]\nprincipal = "svc"\nsha256 = "' + b"ab" * 32 + b'"\nroles = ["r"]\nexpires = 2027-01-01T00:00:00Z\n'
    )
    return [
        join_head(
            [("Prefer", "respond-async, wait=5"), ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")], b""
        ),
        join_head([("Retry-After", "120"), ("Retry-After", "Wed, 21 Oct 2026 07:28:00 GMT")], key_file),
        join_head(
            [("webhook-id", "msg_1"), ("webhook-timestamp", "1765000000"), ("webhook-signature", "v1,AAAA v1a,x")],
            b"{}",
        ),
        join_head([("X-Hub-Signature-256", "sha256=" + "00" * 32), ("x-sig", "v1=AAAA")], b"body"),
        join_head([("ce-id", "%E2%82%AC%zz"), ("WebHook-Allowed-Rate", "*")], b"[[keys]]\nprincipal = 1\n"),
    ]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "http_cloudevents",
            http_cloudevents,
            "Rejected; ValueError/TypeError (HttpInbound.decode: 400)",
            _http_seeds,
        ),
        Target("mqtt_inbound", mqtt_inbound, "Rejected (dead letter)", _mqtt_seeds),
        Target("amqp_inbound", amqp_inbound, "Rejected (dead letter)", _amqp_seeds),
        Target("protobuf_envelope", protobuf_envelope, "Rejected (INVALID_ARGUMENT / 400)", _protobuf_seeds),
        Target("wellformed", wellformed, "Rejected (INVALID / TOO_LARGE)", _protobuf_seeds),
        Target("jwt_token", jwt_token, "Rejected(UNAUTHENTICATED) (401)", _jwt_seeds),
        Target("config_toml", config_toml, "ConfigError", _config_seeds, max_len=16384),
        Target("header_values", header_values, "Rejected; ValueError (secret); ConfigError (key file)", _header_seeds),
    )
}
