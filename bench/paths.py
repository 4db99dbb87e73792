"""The benchmarked paths: each is a daemon config snippet, a producer spec and a consumer spec."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTH_KINDS = ("jwt", "api_key")
"""Ingress authentication variants of the daemon (``Env.auth``): an RS256 JWT or an API key."""
JWT_ISSUER = "https://issuer.bench/"


@dataclass(frozen=True)
class Env:
    """Where everything runs for one path: broker addresses, the daemon's ports, unique names."""

    uid: str
    mqtt_port: int
    amqp_url: str
    http_port: int
    grpc_port: int
    hook_port: int
    workdir: str
    outbox: str = "sqlite"
    auth: str | None = None  # one of AUTH_KINDS: the HTTP listener requires that credential
    jwt_cache_size: int | None = None  # [auth.bench-jwt] cache_size; None: the daemon's default
    content: bool = False  # a JSON Schema check, a CEL route and a field transform (see CONTENT_TOML)
    tracing_endpoint: str | None = None  # [tracing] at 100% sampling, exported to this OTLP/HTTP receiver
    metrics: bool = True  # False: [metrics] enabled = false (nothing counted)
    stalled_port: int | None = None  # the outbound is HTTP to this port, which never answers (bench.intake)
    workers: int = 1  # [daemon] workers: N worker processes sharing the load (mediator/supervisor.py)
    nats_url: str = "nats://127.0.0.1:4222"
    store: bool = False  # [store] retention = "7d" on SQLite: every accepted event kept (mediator/history/)

    @property
    def exchange_out(self) -> str:
        return f"bench-out-{self.uid}"

    @property
    def exchange_in(self) -> str:
        return f"bench-in-{self.uid}"

    @property
    def queue_in(self) -> str:
        return f"bench.in.{self.uid}"

    @property
    def queue_out(self) -> str:
        return f"bench.out.{self.uid}"

    def topic(self, leaf: str) -> str:
        return f"bench/{self.uid}/{leaf}"

    @property
    def token(self) -> str:
        """The uid as one NATS subject token and stream-name part."""
        return "".join(ch if ch.isalnum() else "_" for ch in self.uid)

    @property
    def stream_in(self) -> str:
        return f"BENCH_IN_{self.token}"

    @property
    def stream_out(self) -> str:
        return f"BENCH_OUT_{self.token}"

    def subject(self, leaf: str) -> str:
        return f"bench.{self.token}.{leaf}"


NATS_CEILING = "nats"
"""The direct nats-py client: JetStream publishes with their acks (window 512) into a stream, read back by a
pull consumer; the ceiling of the NATS paths, measured in the same round."""


def nats_producer_spec(env: Env, stream: str, subject: str) -> dict[str, Any]:
    return {"kind": "nats", "url": env.nats_url, "stream": stream, "subject": subject, "window": 512}


def nats_consumer_spec(env: Env, stream: str, subject: str) -> dict[str, Any]:
    return {"kind": "nats", "url": env.nats_url, "stream": stream, "subject": subject}


@dataclass(frozen=True)
class PathDef:
    name: str
    title: str
    producer: str  # http | mqtt | amqp | grpc | nats (JetStream)
    consumer: str  # amqp | mqtt | http | grpc | nats (JetStream)
    ceilings: tuple[str, ...]  # the direct broker round trips the path involves

    def config(self, env: Env) -> str:
        return _config(self, env)

    def producer_spec(self, env: Env) -> dict[str, Any]:
        if self.producer == "http":
            return {"kind": "http", "url": f"http://127.0.0.1:{env.http_port}/bench", "window": 64}
        if self.producer == "mqtt":
            return mqtt_generator_spec(env.mqtt_port, env.topic("in/p1"))
        if self.producer == "amqp":
            return {
                "kind": "amqp",
                "url": env.amqp_url,
                "exchange": env.exchange_in,
                "routing_key": "p1",
                "window": 512,
            }
        if self.producer == "nats":
            return nats_producer_spec(env, env.stream_in, env.subject("in.p1"))
        return {"kind": "grpc", "port": env.grpc_port, "window": 512}

    def consumer_spec(self, env: Env) -> dict[str, Any]:
        if self.consumer == "amqp":
            return {"kind": "amqp", "url": env.amqp_url, "exchange": env.exchange_out, "queue": env.queue_out}
        if self.consumer == "mqtt":
            return {"kind": "mqtt", "host": "127.0.0.1", "port": env.mqtt_port, "topic": env.topic("out/+")}
        if self.consumer == "http":
            return {"kind": "http", "port": env.hook_port}
        if self.consumer == "nats":
            return nats_consumer_spec(env, env.stream_out, env.subject("out.>"))
        return {"kind": "grpc", "port": env.grpc_port, "outbound": "dst"}


GENERATOR_CEILING = "mqtt-gen"
"""The ceiling of the paths fed by the C generator: the same generator straight into mosquitto_sub."""


def mqtt_generator_spec(port: int, topic: str) -> dict[str, Any]:
    """The MQTT producer of the MQTT paths, their ceiling and their peers: saturation runs through the C
    generator (``mosquitto_pub -l``, 100 QoS 1 publishes in flight, ``clients.generator_run``), so that the
    load generator is never the limit of the system it drives; the warm-up and the fixed-load runs through
    paho (window 1,000), which stamps each message with its send time for the end-to-end latency."""
    return {
        "kind": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "topic": topic,
        "window": 1000,
        "generator": "mosquitto_pub",
        "max_inflight": 100,
    }


PATHS: dict[str, PathDef] = {
    p.name: p
    for p in (
        PathDef("http-amqp", "HTTP -> AMQP", "http", "amqp", ("amqp",)),
        PathDef("http-mqtt", "HTTP -> MQTT", "http", "mqtt", ("mqtt",)),
        PathDef("mqtt-amqp", "MQTT QoS 1 -> AMQP", "mqtt", "amqp", (GENERATOR_CEILING, "amqp")),
        PathDef("mqtt-mqtt", "MQTT -> MQTT (topic rewrite)", "mqtt", "mqtt", (GENERATOR_CEILING,)),
        PathDef("amqp-mqtt", "AMQP -> MQTT", "amqp", "mqtt", ("amqp", "mqtt")),
        PathDef("grpc-amqp", "gRPC PublishStream -> AMQP", "grpc", "amqp", ("amqp",)),
        PathDef("mqtt-http", "MQTT -> HTTP webhook", "mqtt", "http", (GENERATOR_CEILING,)),
        PathDef("amqp-grpc", "AMQP -> gRPC Subscribe", "amqp", "grpc", ("amqp",)),
        PathDef("nats-amqp", "NATS JetStream -> AMQP", "nats", "amqp", (NATS_CEILING, "amqp")),
        PathDef("mqtt-nats", "MQTT QoS 1 -> NATS JetStream", "mqtt", "nats", (GENERATOR_CEILING, NATS_CEILING)),
    )
}


def credentials(env: Env) -> dict[str, str]:
    """Write the files ``env.auth`` needs into the daemon's directory (a JWK Set with a fresh RSA public
    key, or a keys file with a fresh key's SHA-256) and return the header that carries the credential.
    One token (or key) for the whole cell, as a client would send: with the JWT cache, the signature is
    checked once; with ``cache_size = 0``, on every event."""
    if env.auth is None:
        return {}
    workdir = Path(env.workdir)
    if env.auth == "api_key":
        from mediator.stages.authn import new_api_key

        key, digest = new_api_key()  # what `mediator hash-key` prints
        (workdir / "api-keys.toml").write_text(f'[[keys]]\nprincipal = "bench"\nsha256 = "{digest}"\n')
        return {"X-API-Key": key}
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    private = rsa.generate_private_key(65537, 2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(private.public_key())), "kid": "bench", "use": "sig", "alg": "RS256"}
    (workdir / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {"iss": JWT_ISSUER, "aud": "mediator", "sub": "bench", "iat": now, "exp": now + 3600}
    token = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "bench"})
    return {"Authorization": f"Bearer {token}"}


BENCH_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["s", "t", "p"],
    "properties": {
        "s": {"type": "string", "pattern": "^[0-9]{16}$"},
        "t": {"type": "string", "pattern": "^[0-9]{19}$"},
        "p": {"type": "string"},
    },
}
CONTENT_TOML = """
[[schemas]]
name = "bench"
kind = "json"
file = "bench.schema.json"
types = ["com.example.bench"]
"""
"""The content variant (``Env.content``): every event checked against ``BENCH_SCHEMA``, routed by a CEL
predicate over its data, and its data reshaped by field operations on the way out (the consumer still
finds ``s`` and ``t``)."""
CONTENT_ROUTE = (
    "when = \"size(data.s) == 16 && data.p != ''\"\n",
    ', transform = { rename = { "data.p" = "data.pad" }, add = { "data.via" = "mediator" } }',
)


def content_files(env: Env) -> None:
    """Write the JSON Schema the content variant's config names."""
    if env.content:
        (Path(env.workdir) / "bench.schema.json").write_text(json.dumps(BENCH_SCHEMA))


def _auth(env: Env) -> str:
    if env.auth == "jwt":
        cache = "" if env.jwt_cache_size is None else f"cache_size = {env.jwt_cache_size}\n"
        return f"""auth = ["bench-jwt"]

[auth.bench-jwt]
kind = "jwt"
issuer = "{JWT_ISSUER}"
audience = ["mediator"]
algorithms = ["RS256"]
jwks_file = "jwks.json"
{cache}"""
    if env.auth == "api_key":
        return """auth = ["bench-keys"]

[auth.bench-keys]
kind = "api_key"
keys_file = "api-keys.toml"
"""
    return ""


def _config(path: PathDef, env: Env) -> str:
    parts = [
        f"""
[daemon]
log_level = "warning"
drain_timeout_s = 5.0
workers = {env.workers}

[outbox]
kind = "{env.outbox}"
path = "{env.workdir}/outbox.sqlite"
max_pending = 100000

[listeners.http]
kind = "http"
host = "127.0.0.1"
port = {env.http_port}
{_auth(env)}
[brokers.mosquitto]
kind = "mqtt"
host = "127.0.0.1"
port = {env.mqtt_port}
protocol = "5"
client_id = "bench-{env.uid}"

[brokers.rabbit]
kind = "amqp"
url = "{env.amqp_url}"
"""
    ]
    if "nats" in (path.producer, path.consumer):
        parts.append(
            f"""
[brokers.nats]
kind = "nats"
servers = ["{env.nats_url}"]

[[brokers.nats.streams]]
name = "{env.stream_in}"
subjects = ["{env.subject("in.>")}"]

[[brokers.nats.streams]]
name = "{env.stream_out}"
subjects = ["{env.subject("out.>")}"]
"""
        )
    if "grpc" in (path.producer, path.consumer):
        parts.append(
            f"""
[listeners.grpc]
kind = "grpc"
host = "127.0.0.1"
port = {env.grpc_port}
"""
        )
    # ------------------------------------------------------------------ inbound
    if path.producer == "http":
        parts.append(
            """
[inbound.src]
kind = "http"
listener = "http"
path = "/bench"
type = "com.example.bench"
source = "/bench"
"""
        )
    elif path.producer == "mqtt":
        parts.append(
            f"""
[inbound.src]
kind = "mqtt"
broker = "mosquitto"
topics = ["{env.topic("in/+")}"]
qos = 1
type = "com.example.bench"
source = "mqtt://bench/{{topic.3}}"
"""
        )
    elif path.producer == "amqp":
        parts.append(
            f"""
[inbound.src]
kind = "amqp"
broker = "rabbit"
queue = "{env.queue_in}"
bindings = [{{ exchange = "{env.exchange_in}", routing_key = "#" }}]
prefetch = 256
type = "com.example.bench"
source = "amqp://bench"
"""
        )
    elif path.producer == "nats":
        parts.append(
            f"""
[inbound.src]
kind = "nats"
broker = "nats"
jetstream = true
stream = "{env.stream_in}"
subjects = ["{env.subject("in.>")}"]
type = "com.example.bench"
source = "nats://bench"
"""
        )
    else:
        parts.append(
            """
[inbound.src]
kind = "grpc"
listener = "grpc"
"""
        )
    # ------------------------------------------------------------------ outbound + route
    when, transform = CONTENT_ROUTE if env.content else ("", "")
    if env.stalled_port is not None:
        out, address = f'kind = "http"\nurl = "http://127.0.0.1:{env.stalled_port}/hang"', ""
    elif path.consumer == "amqp":
        out, address = (
            f'kind = "amqp"\nbroker = "rabbit"\nexchange = "{env.exchange_out}"\nexchange_type = "topic"',
            "bench.out",
        )
    elif path.consumer == "mqtt":
        leaf = {"mqtt": "{topic.3}", "amqp": "{topic}"}.get(path.producer, "p1")
        out, address = 'kind = "mqtt"\nbroker = "mosquitto"\nqos = 1', env.topic(f"out/{leaf}")
    elif path.consumer == "http":
        out, address = f'kind = "http"\nurl = "http://127.0.0.1:{env.hook_port}/hook"', ""
    elif path.consumer == "nats":
        out = f'kind = "nats"\nbroker = "nats"\njetstream = true\nstream = "{env.stream_out}"'
        address = env.subject("out.{topic.3}" if path.producer == "mqtt" else "out.p1")
    else:
        # A live stream: the default queue (1,024) would disconnect the benchmark's Python subscriber at
        # saturation; the benchmark measures the daemon, so it gives the subscriber room.
        out, address = 'kind = "grpc"\nlistener = "grpc"\nsubscriber_queue = 100000', "bench"
    parts.append(
        f"""
[outbound.dst]
{out}

[[routes]]
name = "bench"
match = {{ inbound = ["src"] }}
{when}to = [{{ outbound = "dst", address = "{address}"{transform} }}]
"""
    )
    if env.content:
        parts.append(CONTENT_TOML)
    if env.tracing_endpoint is not None:
        parts.append(f'\n[tracing]\nenabled = true\nsample_ratio = 1.0\nendpoint = "{env.tracing_endpoint}"\n')
    if not env.metrics:
        parts.append("\n[metrics]\nenabled = false\n")
    if env.store:
        parts.append('\n[store]\nbackend = "sqlite"\nretention = "7d"\n')
    return "".join(parts)
