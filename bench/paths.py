"""The eight benchmarked paths: each is a daemon config snippet, a producer spec and a consumer spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True)
class PathDef:
    name: str
    title: str
    producer: str  # http | mqtt | amqp | grpc
    consumer: str  # amqp | mqtt | http | grpc
    ceilings: tuple[str, ...]  # the direct broker round trips the path involves

    def config(self, env: Env) -> str:
        return _config(self, env)

    def producer_spec(self, env: Env) -> dict[str, Any]:
        if self.producer == "http":
            return {"kind": "http", "url": f"http://127.0.0.1:{env.http_port}/bench", "window": 64}
        if self.producer == "mqtt":
            return {
                "kind": "mqtt",
                "host": "127.0.0.1",
                "port": env.mqtt_port,
                "topic": env.topic("in/p1"),
                "window": 1000,
            }
        if self.producer == "amqp":
            return {
                "kind": "amqp",
                "url": env.amqp_url,
                "exchange": env.exchange_in,
                "routing_key": "p1",
                "window": 512,
            }
        return {"kind": "grpc", "port": env.grpc_port, "window": 512}

    def consumer_spec(self, env: Env) -> dict[str, Any]:
        if self.consumer == "amqp":
            return {"kind": "amqp", "url": env.amqp_url, "exchange": env.exchange_out, "queue": env.queue_out}
        if self.consumer == "mqtt":
            return {"kind": "mqtt", "host": "127.0.0.1", "port": env.mqtt_port, "topic": env.topic("out/+")}
        if self.consumer == "http":
            return {"kind": "http", "port": env.hook_port}
        return {"kind": "grpc", "port": env.grpc_port, "outbound": "dst"}


PATHS: dict[str, PathDef] = {
    p.name: p
    for p in (
        PathDef("http-amqp", "HTTP -> AMQP", "http", "amqp", ("amqp",)),
        PathDef("http-mqtt", "HTTP -> MQTT", "http", "mqtt", ("mqtt",)),
        PathDef("mqtt-amqp", "MQTT QoS 1 -> AMQP", "mqtt", "amqp", ("mqtt", "amqp")),
        PathDef("mqtt-mqtt", "MQTT -> MQTT (topic rewrite)", "mqtt", "mqtt", ("mqtt",)),
        PathDef("amqp-mqtt", "AMQP -> MQTT", "amqp", "mqtt", ("amqp", "mqtt")),
        PathDef("grpc-amqp", "gRPC PublishStream -> AMQP", "grpc", "amqp", ("amqp",)),
        PathDef("mqtt-http", "MQTT -> HTTP webhook", "mqtt", "http", ("mqtt",)),
        PathDef("amqp-grpc", "AMQP -> gRPC Subscribe", "amqp", "grpc", ("amqp",)),
    )
}


def _config(path: PathDef, env: Env) -> str:
    parts = [
        f"""
[daemon]
log_level = "warning"
drain_timeout_s = 5.0

[outbox]
kind = "{env.outbox}"
path = "{env.workdir}/outbox.sqlite"
max_pending = 100000

[listeners.http]
kind = "http"
host = "127.0.0.1"
port = {env.http_port}

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
    else:
        parts.append(
            """
[inbound.src]
kind = "grpc"
listener = "grpc"
"""
        )
    # ------------------------------------------------------------------ outbound + route
    if path.consumer == "amqp":
        out, address = (
            f'kind = "amqp"\nbroker = "rabbit"\nexchange = "{env.exchange_out}"\nexchange_type = "topic"',
            "bench.out",
        )
    elif path.consumer == "mqtt":
        leaf = {"mqtt": "{topic.3}", "amqp": "{topic}"}.get(path.producer, "p1")
        out, address = 'kind = "mqtt"\nbroker = "mosquitto"\nqos = 1', env.topic(f"out/{leaf}")
    elif path.consumer == "http":
        out, address = f'kind = "http"\nurl = "http://127.0.0.1:{env.hook_port}/hook"', ""
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
to = [{{ outbound = "dst", address = "{address}" }}]
"""
    )
    return "".join(parts)
