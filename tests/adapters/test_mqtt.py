"""MQTT adapter against the real shared Mosquitto: config, inbound, outbound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import tomllib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from adapters.mqtt import ADAPTER, MqttInbound, MqttOutbound, broker_access, build
from adapters.mqtt.config import MqttBrokerConfig, MqttInboundConfig, MqttOutboundConfig
from adapters.mqtt.connection import BrokerAccess, _BufferedSocket
from mediator.core import formats
from mediator.core.envelope import Envelope, attribute, new_event
from mediator.core.errors import (
    ConfigError,
    NotReady,
    RejectCode,
    Rejected,
    RetryableDeliveryError,
    TerminalDeliveryError,
)
from mediator.core.health import Health
from mediator.core.ingress import Origin
from mediator.core.seams import AdapterConfig, Runtime
from tests.support.fakes import ListSink
from tests.support.net import unique, wait_until

pytestmark = pytest.mark.timeout(60)

CONFIG_TOML = Path(__file__).resolve().parents[2] / "config.toml"


# ---------------------------------------------------------------- helpers (also used by test_mqtt_reconnect)


def access(host: str, port: int, protocol: str = "5", **extra: Any) -> BrokerAccess:
    cfg = MqttBrokerConfig(
        host=host,
        port=port,
        protocol=protocol,
        client_id=unique("t"),
        reconnect_initial_s=0.05,
        reconnect_max_s=0.5,
        session_expiry_s=60,  # sessions the tests leave on the shared broker expire quickly
        **extra,
    )
    return BrokerAccess(name="test-broker", config=cfg, password=None)


def inbound_cfg(topics: Sequence[str], **extra: Any) -> MqttInboundConfig:
    return MqttInboundConfig.model_validate({"kind": "mqtt", "broker": "test-broker", "topics": topics, **extra})


@contextlib.asynccontextmanager
async def running(service: Any, health: Health, component: str) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(service.run(), name=component)
    try:
        await wait_until(lambda: health.is_ready(component) or task.done())
        if task.done():
            task.result()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert health.snapshot()[component]["ready"] is False


@contextlib.asynccontextmanager
async def inbound(
    broker: BrokerAccess, cfg: MqttInboundConfig, sink: Any, name: str = "devices"
) -> AsyncIterator[MqttInbound]:
    health = Health()
    service = MqttInbound(name, cfg, broker, Runtime(sink=sink, health=health))
    async with running(service, health, service.name):
        yield service


async def drop_session(broker: BrokerAccess, client_id: str) -> None:
    """Remove a persistent session a test made on the shared broker."""
    if broker.v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        async with aiomqtt.Client(
            broker.config.host,
            broker.config.port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            properties=props,
        ):
            pass
    else:
        async with aiomqtt.Client(broker.config.host, broker.config.port, identifier=client_id, clean_session=True):
            pass


def publisher(host: str, port: int, v5: bool = True) -> aiomqtt.Client:
    return aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311)


def publish_props(content_type: str | None = None, user: Sequence[tuple[str, str]] = ()) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if content_type:
        props.ContentType = content_type
    if user:
        props.UserProperty = list(user)
    return props


def sample_event(id: str = "evt-1") -> Envelope:
    env = new_event(
        type="com.example.order.created",
        source="/orders",
        data=b'{"order":42}',
        content_type="application/json",
        id=id,
        subject="order-42",
    )
    env.attributes["traceparent"].ce_string = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    env.provenance.inbound = "secret-gateway-fact"
    return env


class GatedSink(ListSink):
    """Holds every accept until ``gate`` opens, records each call's size; refuses batches holding a
    payload in ``refuse`` (as an ingress stage would refuse one event)."""

    def __init__(self, refuse: frozenset[bytes] = frozenset()) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.sizes: list[int] = []
        self.refuse = refuse

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        await self.gate.wait()
        self.sizes.append(len(events))
        if any(e.binary_data in self.refuse for e in events):
            raise Rejected(RejectCode.FORBIDDEN, "not allowed")
        await super().accept(events, origin)


# ---------------------------------------------------------------- config


def test_config_toml_sections_are_accepted() -> None:
    doc = tomllib.loads(CONFIG_TOML.read_text())
    broker = MqttBrokerConfig.model_validate(doc["brokers"]["mosquitto"])
    assert (broker.protocol, broker.client_id, broker.port) == ("5", "mediator", 1883)
    devices = MqttInboundConfig.model_validate(doc["inbound"]["devices"])
    assert devices.topics == ["devices/+/telemetry"]
    assert devices.connection() == "mosquitto"
    assert devices.source.text == "mqtt://127.0.0.1/devices/{topic.1}"
    out = MqttOutboundConfig.model_validate(doc["outbound"]["mqtt"])
    assert (out.qos, out.retain, out.format, out.connection()) == (1, False, "binary", "mosquitto")
    assert ADAPTER.kind == "mqtt"
    assert ADAPTER.inbound_model is MqttInboundConfig


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("", "empty"),
        ("a/#/b", "'#'"),
        ("a/b#", "'#'"),
        ("a/x+/b", "whole level"),
        ("$share/g", "shared"),
        ("$share//a", "shared"),
        ("$share/g+/a", "group"),
    ],
)
def test_bad_topic_filters_are_refused(topic: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        inbound_cfg([topic])


def test_good_topic_filters_and_defaults() -> None:
    cfg = inbound_cfg(["a/+/b", "#", "$share/workers/devices/#", "+"])
    assert cfg.qos == 1
    assert cfg.decode == "auto"
    assert cfg.max_in_flight == 256
    assert cfg.type.text == "io.mediator.mqtt.message"
    env = new_event(type="t", source="s", data=b"")
    env.provenance.inbound = "x"
    assert cfg.source.render(env) == "mqtt://x"


def test_bad_templates_and_unknown_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown placeholder"):
        inbound_cfg(["a"], source="mqtt://{nope.x}")
    with pytest.raises(ValidationError, match="extra"):
        inbound_cfg(["a"], qos_level=1)
    with pytest.raises(ValidationError):
        MqttBrokerConfig(protocol="4")


def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = MqttBrokerConfig(username="u", password_env="MEDIATOR_TEST_MQTT_PW")
    monkeypatch.delenv("MEDIATOR_TEST_MQTT_PW", raising=False)
    with pytest.raises(ConfigError, match="MEDIATOR_TEST_MQTT_PW"):
        broker_access("b", cfg)
    monkeypatch.setenv("MEDIATOR_TEST_MQTT_PW", "s3cret")
    assert broker_access("b", cfg).password == "s3cret"


async def test_build_registers_services_outbounds_and_health() -> None:
    health = Health()
    cfg = AdapterConfig(
        brokers={"b": MqttBrokerConfig()},
        inbounds={"devices": MqttInboundConfig(kind="mqtt", broker="b", topics=["d/#"])},
        outbounds={"mqtt": MqttOutboundConfig(kind="mqtt", broker="b")},
    )
    built = build(cfg, Runtime(sink=ListSink(), health=health))
    assert sorted(s.name for s in built.services) == ["inbound:devices", "outbound:mqtt"]
    assert list(built.outbounds) == ["mqtt"]
    assert health.snapshot() == {
        "inbound:devices": {"ready": False, "detail": "starting"},
        "outbound:mqtt": {"ready": False, "detail": "starting"},
    }


def test_build_refuses_unknown_broker_and_client_id_clash() -> None:
    rt = Runtime(sink=ListSink(), health=Health())
    with pytest.raises(ConfigError, match="no MQTT broker named 'nope'"):
        build(AdapterConfig(inbounds={"a": MqttInboundConfig(kind="mqtt", broker="nope", topics=["x"])}), rt)
    clash = AdapterConfig(
        brokers={"b": MqttBrokerConfig()},
        inbounds={"x": MqttInboundConfig(kind="mqtt", broker="b", topics=["x"])},
        outbounds={"x": MqttOutboundConfig(kind="mqtt", broker="b")},
    )
    with pytest.raises(ConfigError, match="client id 'mediator-x'"):
        build(clash, rt)


def test_buffered_socket_reads_once_and_hands_out_what_paho_asks_for() -> None:
    """paho asks for a packet in pieces; one read serves them, pending() tells aiomqtt more is buffered,
    and an empty socket (BlockingIOError) and a closed one (b"") still reach paho as they are."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    wrapped = _BufferedSocket(ours)
    try:
        peer.sendall(b"\x30\x05hello\x40\x02")
        assert wrapped.recv(1) == b"\x30"
        assert wrapped.pending() == 8
        assert wrapped.recv(1) == b"\x05"
        assert wrapped.recv(5) == b"hello"
        assert wrapped.recv(10) == b"\x40\x02"  # never more than is buffered
        assert wrapped.pending() == 0
        with pytest.raises(BlockingIOError):
            wrapped.recv(1)
        assert wrapped.send(b"\x40\x02\x00\x01") == 4
        assert peer.recv(16) == b"\x40\x02\x00\x01"
        peer.close()
        assert wrapped.recv(1) == b""
    finally:
        wrapped.close()


def test_buffered_socket_read_by_its_thread_wakes_serves_and_ends() -> None:
    """With ``start_reading``, a thread drains the socket and wakes the loop; what it read is served in
    order; it stops reading at ``limit`` until paho takes some; it ends at the peer's close (served
    after the data) and on ``close``, which then closes the descriptor."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    wrapped = _BufferedSocket(ours, limit=8)
    woken = threading.Semaphore(0)
    wrapped.start_reading(woken.release, "mqtt-reader:test")
    thread = next(t for t in threading.enumerate() if t.name == "mqtt-reader:test")
    try:
        peer.sendall(b"0123456789")
        while wrapped.pending() < 10:  # in one read or more
            assert woken.acquire(timeout=5)
        while woken.acquire(timeout=0.05):  # a wake of a read that the loop above did not need to wait for
            pass
        peer.sendall(b"abcdefghij")  # 10 buffered, past the limit: left in the kernel until paho takes some
        assert not woken.acquire(timeout=0.2)
        assert wrapped.pending() == 10
        assert wrapped.recv(4) == b"0123"
        assert woken.acquire(timeout=5)  # room again: the thread read on
        got = b""
        while got != b"456789abcdefghij":
            with contextlib.suppress(BlockingIOError):
                got += wrapped.recv(10)
            woken.acquire(timeout=0.05)
        peer.sendall(b"last")
        peer.close()
        thread.join(5)
        assert not thread.is_alive()  # the peer closed: the thread is gone, the data is not
        assert wrapped.recv(10) == b"last"
        assert wrapped.recv(10) == b""
    finally:
        wrapped.close()
    assert ours.fileno() == -1

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    wrapped = _BufferedSocket(ours)
    wrapped.start_reading(lambda: None, "mqtt-reader:closed")
    thread = next(t for t in threading.enumerate() if t.name == "mqtt-reader:closed")
    wrapped.close()  # on the loop, while the thread waits in poll: it must not block
    thread.join(5)
    assert not thread.is_alive()
    assert ours.fileno() == -1
    peer.close()


# ---------------------------------------------------------------- inbound


async def test_inbound_raw_message(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    broker = access(host, port)
    prefix = unique("raw")
    sink = ListSink()
    cfg = inbound_cfg([f"{prefix}/+/telemetry"], type="com.example.telemetry", source="mqtt://test/devices/{topic.1}")
    async with inbound(broker, cfg, sink) as service, publisher(host, port) as pub:
        await pub.publish(
            f"{prefix}/dev-7/telemetry", b'{"t":21.5}', qos=1, properties=publish_props("application/json")
        )
        await pub.publish(f"{prefix}/dev-8/telemetry", b"\x00\x01", qos=0)
        await sink.wait_for(2)
    await drop_session(broker, service.client_id)
    first, second = sink.events
    assert first.type == "com.example.telemetry"
    assert first.source == "mqtt://test/devices/dev-7"
    assert attribute(first, "datacontenttype") == "application/json"
    assert first.binary_data == b'{"t":21.5}'
    assert first.provenance.inbound == "devices"
    assert first.provenance.protocol == "mqtt"
    assert first.provenance.topic == f"{prefix}/dev-7/telemetry"
    assert first.provenance.topic_separator == "/"
    assert first.provenance.received.seconds > 0
    assert second.source == "mqtt://test/devices/dev-8"
    assert attribute(second, "datacontenttype") is None
    assert first.id != second.id
    assert first.provenance.id_minted
    assert second.provenance.id_minted


async def test_inbound_binary_structured_and_protobuf_cloudevents_v5(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    broker = access(host, port)
    topic = unique("ce")
    sink = ListSink()
    async with inbound(broker, inbound_cfg([topic]), sink) as service, publisher(host, port) as pub:
        user = [
            ("specversion", "1.0"),
            ("id", "bin-1"),
            ("source", "urn:dev:1"),
            ("type", "com.example.binary"),
            ("time", "2024-01-02T03:04:05Z"),
            ("myext", "v"),
        ]
        await pub.publish(topic, b"\x01\x02", qos=1, properties=publish_props("application/octet-stream", user))
        await pub.publish(
            topic,
            formats.to_structured(sample_event("json-1")),
            qos=1,
            properties=publish_props(formats.JSON_CONTENT_TYPE),
        )
        await pub.publish(
            topic,
            formats.to_protobuf(sample_event("pb-1")),
            qos=1,
            properties=publish_props(formats.PROTOBUF_CONTENT_TYPE),
        )
        await sink.wait_for(3)
    await drop_session(broker, service.client_id)
    binary, structured, protobuf = sink.events
    assert (binary.id, binary.source, binary.type) == ("bin-1", "urn:dev:1", "com.example.binary")
    assert attribute(binary, "time") == "2024-01-02T03:04:05Z"
    assert attribute(binary, "myext") == "v"
    assert attribute(binary, "datacontenttype") == "application/octet-stream"
    assert binary.binary_data == b"\x01\x02"
    assert structured.id == "json-1"
    assert attribute(structured, "traceparent") == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert structured.binary_data == b'{"order":42}'
    assert protobuf.id == "pb-1"
    for env in sink.events:
        assert env.provenance.inbound == "devices"
        assert env.provenance.topic == topic


async def test_inbound_v311_raw_and_structured(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    broker = access(host, port, protocol="3.1.1")
    prefix = unique("v311")
    raw_sink, ce_sink = ListSink(), ListSink()
    raw_cfg = inbound_cfg([f"{prefix}/raw/#"], content_type="text/plain", source="mqtt://x/{topic.-1}")
    ce_cfg = inbound_cfg([f"{prefix}/ce"], decode="structured")
    async with (
        inbound(broker, raw_cfg, raw_sink, name="raw") as raw_in,
        inbound(broker, ce_cfg, ce_sink, name="ce") as ce_in,
        publisher(host, port, v5=False) as pub,
    ):
        await pub.publish(f"{prefix}/raw/a/b", b"hello", qos=1)
        await pub.publish(f"{prefix}/ce", formats.to_structured(sample_event("s-1")), qos=1)
        await raw_sink.wait_for(1)
        await ce_sink.wait_for(1)
    await drop_session(broker, raw_in.client_id)
    await drop_session(broker, ce_in.client_id)
    [raw] = raw_sink.events
    assert raw.source == "mqtt://x/b"
    assert raw.type == "io.mediator.mqtt.message"
    assert attribute(raw, "datacontenttype") == "text/plain"
    assert raw.binary_data == b"hello"
    [ce] = ce_sink.events
    assert ce.id == "s-1"
    assert ce.type == "com.example.order.created"
    assert ce.provenance.inbound == "ce"


async def test_inbound_holds_the_ack_until_accept_returns(mosquitto: tuple[str, int]) -> None:
    """While the sink says NotReady the message stays unacknowledged: stopping the inbound then
    (a crash, a restart) must not lose it; the persistent session redelivers it to the next run."""
    host, port = mosquitto
    broker = access(host, port)
    topic = unique("ack")
    sink = ListSink()
    sink.fail_with = NotReady("outbox full", retry_after_s=0.02)
    cfg = inbound_cfg([topic])
    async with inbound(broker, cfg, sink) as first, publisher(host, port) as pub:
        await pub.publish(topic, b"precious", qos=1)
        await wait_until(lambda: sink.calls >= 2)  # refused, and retried: the message is being held
    assert sink.events == []
    sink.fail_with = None
    async with inbound(broker, cfg, sink) as second:
        assert second.client_id == first.client_id
        await sink.wait_for(1)
    await drop_session(broker, second.client_id)
    assert [e.binary_data for e in sink.events] == [b"precious"]


async def test_inbound_retries_not_ready_then_accepts(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    broker = access(host, port)
    topic = unique("retry")
    sink = ListSink()
    sink.fail_with = NotReady("draining", retry_after_s=0.02)
    async with inbound(broker, inbound_cfg([topic]), sink) as service, publisher(host, port) as pub:
        await pub.publish(topic, b"later", qos=1)
        await wait_until(lambda: sink.calls >= 3)
        sink.fail_with = None
        await sink.wait_for(1)
    await drop_session(broker, service.client_id)
    assert sink.events[0].binary_data == b"later"


async def test_inbound_acks_in_order_and_loses_nothing_under_concurrency(mosquitto: tuple[str, int]) -> None:
    """Many messages in flight at once, a small in-flight window: all arrive exactly once, and a restart
    afterwards redelivers nothing (every one was acknowledged)."""
    host, port = mosquitto
    broker = access(host, port)
    topic = unique("many")
    sink = ListSink()
    cfg = inbound_cfg([topic], max_in_flight=8)
    count = 300
    async with inbound(broker, cfg, sink), publisher(host, port) as pub:
        for i in range(count):
            await pub.publish(topic, str(i).encode(), qos=1)
        await sink.wait_for(count)
    async with inbound(broker, cfg, sink) as again, publisher(host, port) as pub:
        await pub.publish(topic, b"marker", qos=1)
        await sink.wait_for(count + 1)
    await drop_session(broker, again.client_id)
    payloads = [e.binary_data for e in sink.events]
    assert sorted(payloads[:count], key=int) == [str(i).encode() for i in range(count)]
    assert payloads[count:] == [b"marker"]  # no redelivery of anything acknowledged


async def test_inbound_takes_queued_messages_together(mosquitto: tuple[str, int]) -> None:
    """While every slot waits on a commit, messages queue up; once the commits return, what queued is
    taken as batches (one accept each), not one accept per message, and nothing is lost or repeated."""
    host, port = mosquitto
    broker = access(host, port)
    topic = unique("batch")
    sink = GatedSink()
    count = 200
    async with inbound(broker, inbound_cfg([topic], max_in_flight=8), sink) as service, publisher(host, port) as pub:
        for i in range(count):
            await pub.publish(topic, str(i).encode(), qos=0)  # QoS 0: not held back by Receive Maximum
        await asyncio.sleep(0.3)  # the first messages wait at the gate, the rest queue in the client
        assert sink.sizes == []
        sink.gate.set()
        await sink.wait_for(count)
    await drop_session(broker, service.client_id)
    assert sorted(int(e.binary_data) for e in sink.events) == list(range(count))
    assert sum(sink.sizes) == count
    assert max(sink.sizes) > 1
    assert len(sink.sizes) <= count // 4, sink.sizes


async def test_inbound_one_refused_event_does_not_dead_letter_its_batch(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    broker = access(host, port)
    topic = unique("batchrej")
    sink = GatedSink(refuse=frozenset({b"5"}))
    async with inbound(broker, inbound_cfg([topic], max_in_flight=4), sink) as service, publisher(host, port) as pub:
        for i in range(12):
            await pub.publish(topic, str(i).encode(), qos=0)
        await asyncio.sleep(0.3)
        sink.gate.set()
        await sink.wait_for(11, dead=1)
    await drop_session(broker, service.client_id)
    assert max(sink.sizes) > 1  # there were batches, and the refusal split only the one holding b"5"
    assert [env.binary_data for env, _ in sink.dead] == [b"5"]
    assert sorted(int(e.binary_data) for e in sink.events) == [i for i in range(12) if i != 5]


# ---------------------------------------------------------------- outbound


@contextlib.asynccontextmanager
async def outbound(broker: BrokerAccess, **extra: Any) -> AsyncIterator[MqttOutbound]:
    health = Health()
    cfg = MqttOutboundConfig.model_validate({"kind": "mqtt", "broker": "test-broker", **extra})
    out = MqttOutbound("mqtt", cfg, broker, health)
    async with running(out.service, health, out.component):
        yield out


@contextlib.asynccontextmanager
async def subscriber(host: str, port: int, topic: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic, qos=1)
        yield client


async def next_message(client: aiomqtt.Client, timeout_s: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout_s):
        return await anext(aiter(client.messages))


def props_of(message: aiomqtt.Message) -> tuple[str | None, dict[str, str]]:
    props = message.properties
    content_type = getattr(props, "ContentType", None)
    return content_type, dict(getattr(props, "UserProperty", []))


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_outbound_binary_v5(mosquitto: tuple[str, int], qos: int) -> None:
    host, port = mosquitto
    topic = unique("out")
    async with subscriber(host, port, topic) as sub, outbound(access(host, port), qos=qos) as out:
        await out.send(sample_event(), topic, "binary")
        message = await next_message(sub)
    assert message.payload == b'{"order":42}'
    content_type, user = props_of(message)
    assert content_type == "application/json"
    assert user == {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/orders",
        "type": "com.example.order.created",
        "subject": "order-42",
        "time": user["time"],
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    assert "secret-gateway-fact" not in user.values()


async def test_outbound_structured_and_protobuf_v5(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    topic = unique("out")
    async with subscriber(host, port, topic) as sub, outbound(access(host, port)) as out:
        await out.send(sample_event("s"), topic, "structured")
        structured = await next_message(sub)
        await out.send(sample_event("p"), topic, "protobuf")
        protobuf = await next_message(sub)
    assert props_of(structured) == (formats.JSON_CONTENT_TYPE, {})
    assert isinstance(structured.payload, bytes)
    body = json.loads(structured.payload)
    assert (body["id"], body["data"]) == ("s", {"order": 42})
    assert "secret-gateway-fact" not in structured.payload.decode()
    assert props_of(protobuf) == (formats.PROTOBUF_CONTENT_TYPE, {})
    assert isinstance(protobuf.payload, bytes)
    env = Envelope()
    env.ParseFromString(protobuf.payload)
    assert env.id == "p"
    assert not env.HasField("provenance")


async def test_outbound_v311_binary_is_payload_only_structured_is_json(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    topic = unique("out311")
    async with subscriber(host, port, topic) as sub, outbound(access(host, port, protocol="3.1.1")) as out:
        await out.send(sample_event(), topic, "binary")
        binary = await next_message(sub)
        await out.send(sample_event("s"), topic, "structured")
        structured = await next_message(sub)
    assert binary.payload == b'{"order":42}'
    assert props_of(binary) == (None, {})
    assert props_of(structured) == (None, {})
    assert isinstance(structured.payload, bytes)
    assert json.loads(structured.payload)["id"] == "s"


async def test_outbound_retain(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    topic = unique("retained")
    async with outbound(access(host, port), retain=True) as out:
        await out.send(sample_event(), topic, "binary")
    async with subscriber(host, port, topic) as sub:  # subscribed after the publish: only a retained copy
        message = await next_message(sub)
        assert message.retain
        assert message.payload == b'{"order":42}'
        await sub.publish(topic, b"", qos=1, retain=True)  # clear it


async def test_outbound_invalid_topic_is_terminal_and_disconnected_is_retryable(
    mosquitto: tuple[str, int],
) -> None:
    host, port = mosquitto
    async with outbound(access(host, port)) as out:
        for bad in ("", "a/+/b", "a/#"):
            with pytest.raises(TerminalDeliveryError, match="invalid MQTT topic"):
                await out.send(sample_event(), bad, "binary")
        with pytest.raises(TerminalDeliveryError, match="unknown format"):
            await out.send(sample_event(), "a/b", "yaml")
    # Not running (never connected, or stopped): fails at once instead of waiting.
    async with asyncio.timeout(1):
        with pytest.raises(RetryableDeliveryError, match="not connected"):
            await out.send(sample_event(), "a/b", "binary")


async def test_outbound_many_sends_in_flight(mosquitto: tuple[str, int]) -> None:
    """Far more concurrent sends than paho's default in-flight window (20): all confirmed, all received."""
    host, port = mosquitto
    topic = unique("pipe")
    count = 1000
    async with subscriber(host, port, topic) as sub, outbound(access(host, port), max_in_flight=256) as out:
        sem = asyncio.Semaphore(out.max_in_flight)

        async def send(i: int) -> None:
            async with sem:
                env = new_event(type="t", source="s", data=str(i).encode(), id=str(i))
                await out.send(env, topic, "binary")

        async with asyncio.timeout(30):
            await asyncio.gather(*(send(i) for i in range(count)))
            seen: set[bytes] = set()
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                seen.add(message.payload)
                if len(seen) == count:
                    break
    assert seen == {str(i).encode() for i in range(count)}
