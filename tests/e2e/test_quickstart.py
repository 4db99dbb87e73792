"""The four quickstart flows, end to end: a running daemon on the shipped config.toml, real clients,
real brokers. Each consumer must see the payload untouched and the CloudEvents attributes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mediator.v1 import envelope_pb2, service_pb2, service_pb2_grpc
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(90)


async def bound_queue(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str) -> AbstractQueue:
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(ex, key)
    return queue


async def get_one(queue: AbstractQueue, timeout_s: float = 15.0) -> AbstractIncomingMessage:
    async with asyncio.timeout(timeout_s):
        while True:
            msg = await queue.get(fail=False)
            if msg is not None:
                await msg.ack()
                return msg
            await asyncio.sleep(0.05)


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        yield await conn.channel()


def user_props(message: aiomqtt.Message) -> dict[str, str]:
    props = message.properties
    assert props is not None
    return dict(getattr(props, "UserProperty", []))


def assert_recent(rfc3339: str) -> None:
    when = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - when) < timedelta(minutes=2), rfc3339


async def test_flow1_http_post_reaches_amqp_and_mqtt(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractChannel
) -> None:
    queue = await bound_queue(amqp, quickstart.orders_exchange, "orders.created")
    body = json.dumps({"order": 1, "sku": "A-1", "note": "héllo"}).encode()
    topic = f"{quickstart.topic_prefix}orders/created"
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.subscribe(topic, qos=1)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{quickstart.http_port}/orders",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp,
        ):
            assert resp.status == 202, await resp.text()
            event_id = (await resp.json())["id"]
        uuid.UUID(event_id)
        async with asyncio.timeout(15):
            message = await anext(aiter(mqtt.messages))

    assert message.topic.value == topic
    assert message.payload == body
    assert message.properties is not None
    assert message.properties.ContentType == "application/json"  # type: ignore[attr-defined]
    props = user_props(message)
    assert props["id"] == event_id
    assert props["type"] == "com.example.order.created"
    assert props["source"] == "/orders"
    assert props["specversion"] == "1.0"
    assert_recent(props["time"])

    got = await get_one(queue)
    assert got.body == body
    assert got.message_id == event_id
    assert got.content_type == "application/json"
    headers = got.headers
    assert headers["cloudEvents_type"] == "com.example.order.created"
    assert headers["cloudEvents_source"] == "/orders"
    assert headers["cloudEvents_specversion"] == "1.0"
    assert_recent(str(headers["cloudEvents_time"]))
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_flow2_mqtt_telemetry_reaches_amqp(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractChannel
) -> None:
    queue = await bound_queue(amqp, quickstart.telemetry_exchange, "telemetry.dev42")
    payload = b'{"temp": 21.5}'
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/json"
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.publish(f"{quickstart.topic_prefix}devices/dev42/telemetry", payload, qos=1, properties=props)
    got = await get_one(queue)
    assert got.routing_key == "telemetry.dev42"
    assert got.body == payload
    assert got.content_type == "application/json"
    headers = got.headers
    assert headers["cloudEvents_type"] == "com.example.device.telemetry"
    assert headers["cloudEvents_source"] == "mqtt://127.0.0.1/devices/dev42"
    assert got.message_id
    assert_recent(str(headers["cloudEvents_time"]))


async def test_flow3_amqp_command_reaches_mqtt(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractChannel
) -> None:
    exchange = await amqp.declare_exchange(quickstart.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    topic = f"{quickstart.topic_prefix}devices/dev7/commands"
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.subscribe(topic, qos=1)
        await exchange.publish(
            aio_pika.Message(b"reboot", content_type="text/plain", message_id="cmd-1"), routing_key="dev7"
        )
        async with asyncio.timeout(15):
            message = await anext(aiter(mqtt.messages))
    assert message.topic.value == topic
    assert message.payload == b"reboot"
    assert message.properties is not None
    assert message.properties.ContentType == "text/plain"  # type: ignore[attr-defined]
    props = user_props(message)
    assert props["id"] == "cmd-1"
    assert props["type"] == "com.example.device.command"
    assert props["source"] == "amqp://127.0.0.1/commands"
    assert_recent(props["time"])


async def test_flow4_grpc_publish_and_subscribe(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractChannel
) -> None:
    queue = await bound_queue(amqp, quickstart.orders_exchange, "orders.created")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{quickstart.grpc_port}") as channel:
        stub = service_pb2_grpc.MediatorStub(channel)
        stream = stub.Subscribe(service_pb2.SubscribeRequest(type="com.example.*"))
        received: list[envelope_pb2.Envelope] = []
        arrived = asyncio.Event()

        async def collect() -> None:
            async for env in stream:
                received.append(env)
                arrived.set()

        collector = asyncio.create_task(collect())
        http_ids: list[str] = []
        async with aiohttp.ClientSession() as http:
            # The subscription registers asynchronously: publish until the first event shows up.
            async with asyncio.timeout(15):
                while not received:
                    async with http.post(
                        f"http://127.0.0.1:{quickstart.http_port}/orders", json={"probe": len(http_ids)}
                    ) as resp:
                        assert resp.status == 202
                        http_ids.append((await resp.json())["id"])
                    await asyncio.sleep(0.1)

        env = envelope_pb2.Envelope(
            id=f"grpc-{uuid.uuid4()}", source="/grpc-test", spec_version="1.0", type="com.example.order.created"
        )
        env.attributes["datacontenttype"].ce_string = "application/json"
        env.binary_data = b'{"order": 2}'
        reply = await stub.Publish(env)
        assert reply.id == env.id

        async with aiomqtt.Client("127.0.0.1", 1883) as mqtt:
            await mqtt.subscribe(f"{quickstart.topic_prefix}devices/+/telemetry", qos=1)
            await mqtt.publish(f"{quickstart.topic_prefix}devices/dev9/telemetry", b"7", qos=1)

        def complete() -> bool:
            ids = {e.id for e in received}
            return env.id in ids and any(e.type == "com.example.device.telemetry" for e in received)

        async with asyncio.timeout(15):
            while not complete():
                arrived.clear()
                await arrived.wait()
        collector.cancel()

    by_id = {e.id: e for e in received}
    assert received[0].id in http_ids  # flow 1's events reach the subscriber
    assert by_id[received[0].id].type == "com.example.order.created"
    grpc_event = by_id[env.id]
    assert grpc_event.type == "com.example.order.created"
    assert grpc_event.source == "/grpc-test"
    assert grpc_event.binary_data == b'{"order": 2}'
    assert not grpc_event.HasField("provenance")
    telemetry = next(e for e in received if e.type == "com.example.device.telemetry")
    assert telemetry.source == "mqtt://127.0.0.1/devices/dev9"
    assert telemetry.binary_data == b"7"
    assert all(e.type.startswith("com.example.") for e in received)

    got = await get_one(queue)  # the first HTTP probe, then the gRPC event: both reach the exchange
    seen = {got.message_id}
    while env.id not in seen:
        seen.add((await get_one(queue)).message_id)
    assert env.id in seen


async def test_health_endpoints(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{quickstart.http_port}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{quickstart.http_port}/readyz") as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body, "readyz lists its components"
    assert all(c["ready"] for c in body.values()), body
