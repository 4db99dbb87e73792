"""One harness per broker adapter: how the conformance suite drives it over real sockets.

A harness builds the adapter's inbound and outbound exactly as the daemon does (its config model, its
service), publishes into the inbound with an independent client of the protocol (aio-pika, aiomqtt,
nats-py), and reads what the outbound sent back with one. ``caps`` says what the protocol can do at all;
a case needing a capability runs for the harnesses that have it (``capable``), and ``WHY_NOT`` says why
each other lacks it: a capability is left out on purpose, with its reason, never silently.

To add an adapter: write a ``Harness`` subclass here (``inbound``, ``publish``, ``outbound``, ``consume``,
``window_seen``, and ``own_broker`` for the reconnect case), add its name to ``ADAPTERS`` and its
constructor to ``make`` in ``test_conformance.py``, a ``WHY_NOT`` line for each capability the protocol
lacks, and run
``pytest tests/conformance``; the adapter is done when every case it has the capability for passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import nats
from nats.aio.client import Client
from nats.js.api import StreamConfig

from adapters.amqp import AmqpInbound, AmqpOutbound
from adapters.mqtt import MqttInbound, MqttOutbound
from adapters.mqtt.config import MqttOutboundConfig
from adapters.nats import NatsInbound, NatsOutbound
from adapters.nats.config import NatsBrokerConfig, NatsInboundConfig, NatsOutboundConfig
from adapters.nats.connection import broker_access
from mediator.core.envelope import Envelope, attribute, data_bytes, iter_attributes
from mediator.core.formats import JSON_CONTENT_TYPE, to_structured
from mediator.core.health import Health
from mediator.core.seams import Outbound, Runtime, Service
from tests.adapters.test_amqp import broker_config, cleanup, client, inbound_config, outbound_config
from tests.adapters.test_mqtt import access, drop_session, inbound_cfg, publish_props
from tests.support.brokers import BrokerTls, MosquittoInstance, NatsServer
from tests.support.certs import Pki
from tests.support.net import unique

BINARY_ONLY_ATTRS = ("id", "source", "type", "subject", "specversion")

# The capabilities a case may need.
ACK_AFTER_COMMIT = "ack_after_commit"  # an unacknowledged message survives the inbound's stop
UNROUTABLE = "unroutable"  # a publish no one stores is a failure, not a success
RECONNECT = "reconnect"  # an own broker restarts; nothing published meanwhile is lost
BACK_PRESSURE = "back_pressure"  # the outbox's bound is what the broker is told (window)
TLS = "tls"  # an own broker requiring a client certificate the test generates

ALL_CAPS = frozenset({ACK_AFTER_COMMIT, UNROUTABLE, RECONNECT, BACK_PRESSURE, TLS})

WHY_NOT = {
    ("nats-core", ACK_AFTER_COMMIT): "core NATS has no acknowledgement: at most once (JetStream has it)",
    ("nats-core", UNROUTABLE): "core NATS drops a message no one subscribes to without telling the publisher",
    ("nats-core", RECONNECT): "core NATS keeps nothing for a subscriber that is away",
    ("nats-core", BACK_PRESSURE): "core NATS has no flow control: its slow-consumer limit drops",
    ("mqtt", UNROUTABLE): "an MQTT broker accepts a publish to a topic nobody subscribes to",
    ("amqp", RECONNECT): "an own RabbitMQ node takes 10+ s to start: tests/adapters/test_amqp_restart.py has it",
    ("amqp", TLS): "an own RabbitMQ node takes 10+ s to start: tests/security/test_broker_tls.py has amqps",
}


ADAPTERS = ("amqp", "mqtt", "nats-core", "nats-jetstream")


def capable(cap: str) -> list[str]:
    """The harnesses a case needing ``cap`` runs for: every one without a ``WHY_NOT`` for it."""
    return [name for name in ADAPTERS if (name, cap) not in WHY_NOT]


def tls_table(pki: Pki, client_cert: bool) -> dict[str, str]:
    """A ``[brokers.X.tls]`` table trusting ``pki``'s CA, with its client certificate when ``client_cert``."""
    table = {"ca_file": str(pki.ca_file)}
    if client_cert:
        table |= {"cert_file": str(pki.client.cert_file), "key_file": str(pki.client.key_file)}
    return table


@dataclass
class Received:
    """What a peer read from the outbound's message: the CloudEvents attributes and the data."""

    attrs: dict[str, str]
    data: bytes


def structured_attrs(body: bytes) -> Received:
    doc = json.loads(body)
    data = doc.pop("data", None)
    data_bytes_ = json.dumps(data, separators=(",", ":")).encode() if not isinstance(data, str) else data.encode()
    return Received({k: str(v) for k, v in doc.items()}, data_bytes_)


class Harness:
    name: str
    address: str  # where the outbound sends and the inbound listens
    unroutable: str = ""  # an address no queue or stream takes (UNROUTABLE)

    async def start(self, tmp: Path) -> None:
        """Prepare names (and an own broker for ``own_broker``)."""

    async def stop(self) -> None:
        """Remove what ``start`` and the cases left on the shared broker."""

    def inbound(self, rt: Runtime) -> Service:
        raise NotImplementedError

    async def publish(self, event: Envelope, mode: str) -> None:
        """Publish ``event`` into the inbound with an independent client: binary, structured, or
        ``poison`` (a body its content type says is a CloudEvent, and is not)."""
        raise NotImplementedError

    def outbound(self, health: Health) -> tuple[Outbound, Service]:
        raise NotImplementedError

    def consume(self) -> contextlib.AbstractAsyncContextManager[Callable[[], Any]]:
        """An independent consumer of ``address``; yields an awaitable reader of one ``Received``."""
        raise NotImplementedError

    async def window_seen(self, service: Service) -> int:
        """What the broker was told: the most unacknowledged messages it may send the inbound."""
        raise NotImplementedError

    async def own_broker(self, tmp: Path) -> Any:
        """Switch the harness to an own broker instance (started) it may restart; returns it."""
        raise NotImplementedError

    async def own_tls_broker(self, tmp: Path, pki: Pki, client_cert: bool) -> Any:
        """Switch the adapter to an own broker that requires TLS with a client certificate signed by
        ``pki``'s CA, presenting ``pki``'s client certificate when ``client_cert``; the peer client still
        gets through. Returns the broker (started)."""
        raise NotImplementedError


# ---------------------------------------------------------------- AMQP


class AmqpHarness(Harness):
    name = "amqp"

    def __init__(self, url: str) -> None:
        self.url = url

    async def start(self, tmp: Path) -> None:
        self.queue, self.exchange, self.out_queue = unique("c.in"), unique("c.ex"), unique("c.out")
        self.address = "conf.key"
        self.unroutable = "conf.nobody.bound"

    async def stop(self) -> None:
        await cleanup(self.url, [self.queue, self.out_queue], [self.exchange])

    def inbound(self, rt: Runtime) -> Service:
        cfg = inbound_config(self.queue, self.exchange)
        return AmqpInbound("conf", cfg, broker_config(self.url), self.url, rt)

    async def publish(self, event: Envelope, mode: str) -> None:
        async with client(self.url) as ch:
            ex = await ch.declare_exchange(self.exchange, "topic", durable=True)
            if mode == "binary":
                headers: dict[str, Any] = {
                    f"cloudEvents_{k}": v for k, v in iter_attributes(event) if k != "datacontenttype"
                }
                msg = aio_pika.Message(
                    data_bytes(event), headers=headers, content_type=attribute(event, "datacontenttype")
                )
            elif mode == "structured":
                msg = aio_pika.Message(to_structured(event), content_type=JSON_CONTENT_TYPE)
            else:
                msg = aio_pika.Message(b"{not json", content_type=JSON_CONTENT_TYPE)
            await ex.publish(msg, routing_key=self.address)

    def outbound(self, health: Health) -> tuple[Outbound, Service]:
        out = AmqpOutbound("conf", outbound_config(self.exchange), broker_config(self.url), self.url, health)
        return out, out.link

    @contextlib.asynccontextmanager
    async def consume(self) -> AsyncIterator[Callable[[], Any]]:
        async with client(self.url) as ch:
            ex = await ch.declare_exchange(self.exchange, "topic", durable=True)
            queue = await ch.declare_queue(self.out_queue, durable=False, auto_delete=True)
            await queue.bind(ex, routing_key=self.address)
            messages: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(messages.put, no_ack=True)

            async def read() -> Received:
                m = await messages.get()
                if m.content_type == JSON_CONTENT_TYPE:
                    return structured_attrs(m.body)
                attrs = {k.removeprefix("cloudEvents_"): str(v) for k, v in (m.headers or {}).items()}
                if m.content_type:
                    attrs["datacontenttype"] = m.content_type
                return Received(attrs, m.body)

            yield read

    async def window_seen(self, service: Service) -> int:
        assert isinstance(service, AmqpInbound)
        return service.prefetch  # basic.qos prefetch_count, as sent at set-up


# ---------------------------------------------------------------- MQTT


class MqttHarness(Harness):
    name = "mqtt"

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def start(self, tmp: Path) -> None:
        self.access = access(self.host, self.port)
        self.address = unique("conf/topic")
        self.own: MosquittoInstance | None = None

    async def stop(self) -> None:
        if self.own is not None:
            await self.own.stop()
        else:
            await drop_session(self.access, f"{self.access.config.client_id}-conf")

    def inbound(self, rt: Runtime) -> Service:
        return MqttInbound("conf", inbound_cfg([self.address]), self.access, rt)

    async def publish(self, event: Envelope, mode: str) -> None:
        async with aiomqtt.Client(self.host, self.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            if mode == "binary":
                user = [(k, v) for k, v in iter_attributes(event) if k != "datacontenttype"]
                props = publish_props(attribute(event, "datacontenttype"), user)
                await c.publish(self.address, data_bytes(event), qos=1, properties=props)
            elif mode == "structured":
                await c.publish(self.address, to_structured(event), qos=1, properties=publish_props(JSON_CONTENT_TYPE))
            else:
                await c.publish(self.address, b"{not json", qos=1, properties=publish_props(JSON_CONTENT_TYPE))

    def outbound(self, health: Health) -> tuple[Outbound, Service]:
        cfg = MqttOutboundConfig.model_validate({"kind": "mqtt", "broker": "test-broker"})
        out = MqttOutbound("conf-out", cfg, self.access, health)  # a client id of its own beside the inbound's
        return out, out.service

    @contextlib.asynccontextmanager
    async def consume(self) -> AsyncIterator[Callable[[], Any]]:
        async with aiomqtt.Client(self.host, self.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(self.address, qos=1)

            async def read() -> Received:
                m = await anext(aiter(c.messages))
                props = m.properties
                content_type = getattr(props, "ContentType", None)
                payload = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else str(m.payload).encode()
                if content_type == JSON_CONTENT_TYPE:
                    return structured_attrs(payload)
                attrs = dict(getattr(props, "UserProperty", []))
                if content_type:
                    attrs["datacontenttype"] = content_type
                return Received(attrs, payload)

            yield read

    async def window_seen(self, service: Service) -> int:
        assert isinstance(service, MqttInbound)
        client, _ = service._client()  # what CONNECT carries
        return int(getattr(client._properties, "ReceiveMaximum", 0))

    async def own_broker(self, tmp: Path) -> Any:
        self.own = MosquittoInstance(tmp / "mosquitto")
        await self.own.start()
        self.port = self.own.port
        self.access = access(self.host, self.port)
        return self.own

    async def own_tls_broker(self, tmp: Path, pki: Pki, client_cert: bool) -> Any:
        self.own = MosquittoInstance(
            tmp / "mosquitto", tls=BrokerTls(pki.ca_file, pki.server.cert_file, pki.server.key_file)
        )
        await self.own.start()
        assert self.own.tls_port is not None
        self.port = self.own.port  # the peer publishes on the plain listener
        self.access = access(self.host, self.own.tls_port, tls=tls_table(pki, client_cert))
        return self.own


# ---------------------------------------------------------------- NATS


class NatsHarness(Harness):
    """Core NATS (``jetstream = False``) or a JetStream stream and durable pull consumer."""

    def __init__(self, url: str, jetstream: bool) -> None:
        self.url = url
        self.peer_tls: ssl.SSLContext | None = None
        self.jetstream = jetstream
        self.name = "nats-jetstream" if jetstream else "nats-core"

    async def start(self, tmp: Path) -> None:
        token = unique("c").replace("-", "")
        self.address = f"conf.{token}.events"
        self.stream = f"CONF_{token}"
        self.own: NatsServer | None = None
        self.broker = NatsBrokerConfig.model_validate({"servers": [self.url], "reconnect_wait_s": 0.1})
        self.unroutable = f"conf.{token}.nostream"
        if self.jetstream:
            await self._ensure_stream()  # required to exist: the inbound does not declare it

    async def stop(self) -> None:
        if self.own is not None:
            await self.own.stop()
            return
        if self.jetstream:
            nc = await self._peer()
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(self.stream)
            await nc.close()

    async def _ensure_stream(self) -> None:
        nc = await self._peer()
        try:
            with contextlib.suppress(Exception):
                await nc.jetstream().add_stream(StreamConfig(name=self.stream, subjects=[self.address]))
        finally:
            await nc.close()

    def inbound(self, rt: Runtime) -> Service:
        section: dict[str, Any] = {"kind": "nats", "broker": "n", "subjects": [self.address.rsplit(".", 1)[0] + ".*"]}
        if self.jetstream:
            section |= {"jetstream": True, "stream": self.stream, "ack_wait_s": 2.0}
        cfg = NatsInboundConfig.model_validate(section)
        return NatsInbound("conf", cfg, broker_access("n", self.broker), rt)

    async def publish(self, event: Envelope, mode: str) -> None:
        if mode == "binary":
            headers = {f"ce-{k}": v for k, v in iter_attributes(event) if k != "datacontenttype"}
            headers["Content-Type"] = attribute(event, "datacontenttype") or ""
            body = data_bytes(event)
        elif mode == "structured":
            headers, body = {"Content-Type": JSON_CONTENT_TYPE}, to_structured(event)
        else:
            headers, body = {"Content-Type": JSON_CONTENT_TYPE}, b"{not json"
        nc = await self._peer()
        try:
            if self.jetstream:
                await self._ensure_stream()
                await nc.jetstream().publish(self.address, body, headers=headers)
            else:
                await nc.publish(self.address, body, headers=headers)
                await nc.flush()
        finally:
            await nc.close()

    def outbound(self, health: Health) -> tuple[Outbound, Service]:
        cfg = NatsOutboundConfig.model_validate({"kind": "nats", "broker": "n", "jetstream": self.jetstream})
        out = NatsOutbound("conf", cfg, broker_access("n", self.broker), health)
        return out, out.link

    @contextlib.asynccontextmanager
    async def consume(self) -> AsyncIterator[Callable[[], Any]]:
        nc = await self._peer()
        try:
            if self.jetstream:
                await self._ensure_stream()
                sub = await nc.jetstream().pull_subscribe(self.address, stream=self.stream)

                async def next_msg() -> Any:
                    while True:
                        with contextlib.suppress(nats.errors.TimeoutError):
                            (m,) = await sub.fetch(1, timeout=1)
                            await m.ack()
                            return m
            else:
                core = await nc.subscribe(self.address)
                await nc.flush()  # the server has the subscription before the outbound publishes

                async def next_msg() -> Any:
                    return await core.next_msg(timeout=10)

            async def read() -> Received:
                m = await next_msg()
                headers = m.headers or {}
                if headers.get("Content-Type") == JSON_CONTENT_TYPE:
                    return structured_attrs(m.data)
                attrs = {k.removeprefix("ce-"): v for k, v in headers.items() if k.startswith("ce-")}
                if headers.get("Content-Type"):
                    attrs["datacontenttype"] = headers["Content-Type"]
                return Received(attrs, m.data)

            yield read
        finally:
            await nc.close()

    async def window_seen(self, service: Service) -> int:
        assert isinstance(service, NatsInbound)
        nc = await self._peer()
        try:
            info = await nc.jetstream().consumer_info(self.stream, service.durable)
            return int(info.config.max_ack_pending or 0)
        finally:
            await nc.close()

    async def own_broker(self, tmp: Path) -> Any:
        self.own = NatsServer(tmp / "nats")
        await self.own.start()
        self.url = self.own.url
        self.broker = NatsBrokerConfig.model_validate({"servers": [self.url], "reconnect_wait_s": 0.1})
        await self._ensure_stream()
        return self.own

    async def own_tls_broker(self, tmp: Path, pki: Pki, client_cert: bool) -> Any:
        self.own = NatsServer(tmp / "nats", tls=BrokerTls(pki.ca_file, pki.server.cert_file, pki.server.key_file))
        await self.own.start()
        self.url = self.own.url
        self.peer_tls = ssl.create_default_context(cafile=str(pki.ca_file))
        self.peer_tls.load_cert_chain(pki.client.cert_file, pki.client.key_file)
        self.broker = NatsBrokerConfig.model_validate(
            {
                "servers": [self.url],
                "reconnect_wait_s": 0.1,
                "connect_timeout_s": 1.0,
                "tls": tls_table(pki, client_cert),
            }
        )
        await self._ensure_stream()
        return self.own

    async def _peer(self) -> Client:
        return await nats.connect(self.url, tls=self.peer_tls)
