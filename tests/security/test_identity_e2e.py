"""Who sent it, end to end: identity attributes spoofed through each of the four protocols are stripped;
broker-vouched identities (an MQTT topic segment, AMQP's user_id) become the authcontext; a broker message
nobody vouches for is dead-lettered with the reason and acknowledged; a rate limit on a broker inbound
slows consumption instead of dead-lettering."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue, get_one, user_props
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(120)

SPOOF = {"authid": "mallory", "authtype": "system", "authclaims": '{"admin":true}', "trustme": "yes"}


async def started(qs: Quickstart, tmp_path: Path) -> DaemonProcess:
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    return proc


async def stopped(proc: DaemonProcess) -> None:
    code = await proc.stop(signal.SIGTERM)
    assert code == 0, proc.logs()


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        yield await conn.channel()


def assert_not_spoofed(attributes: dict[str, str], verified: dict[str, str] | None = None) -> None:
    for name in SPOOF:
        if verified and name in verified:
            assert attributes.get(name) == verified[name], (name, attributes)
        else:
            assert name not in attributes, (name, attributes)


async def test_identity_attributes_spoofed_through_each_protocol_are_stripped(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int], amqp: aio_pika.abc.AbstractChannel
) -> None:
    # "trustme" is reserved by the config: stripped like the authcontext names.
    qs = Quickstart(tmp_path, extra_toml='[security]\nreserved_attributes = ["trustme"]\n')
    proc = await started(qs, tmp_path)
    try:
        orders = await bound_queue(amqp, qs.orders_exchange, "#")
        telemetry = await bound_queue(amqp, qs.telemetry_exchange, "#")
        # HTTP binary mode: ce- headers.
        async with aiohttp.ClientSession() as http:
            headers = {
                "ce-specversion": "1.0",
                "ce-id": uuid.uuid4().hex,
                "ce-source": "/spoof",
                "ce-type": "com.example.order.created",
                "Content-Type": "application/json",
                **{f"ce-{k}": v for k, v in SPOOF.items()},
            }
            async with http.post(f"http://127.0.0.1:{qs.http_port}/events", data=b"{}", headers=headers) as resp:
                assert resp.status == 202, await resp.text()
        got = await get_one(orders)
        assert_not_spoofed({k.removeprefix("cloudEvents_"): str(v) for k, v in got.headers.items()})
        # gRPC: envelope attributes.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as channel:
            ev = envelope_pb2.Envelope(id=uuid.uuid4().hex, source="/g", spec_version="1.0")
            ev.type = "com.example.order.created"
            for k, v in SPOOF.items():
                ev.attributes[k].ce_string = v
            await service_pb2_grpc.MediatorStub(channel).Publish(ev)
        got = await get_one(orders)
        assert_not_spoofed({k.removeprefix("cloudEvents_"): str(v) for k, v in got.headers.items()})
        # MQTT 5: user properties.
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = list(SPOOF.items())
        async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
            await mqtt.publish(f"{qs.topic_prefix}devices/d1/telemetry", b"{}", qos=1, properties=props)
            got = await get_one(telemetry)
            assert_not_spoofed({k.removeprefix("cloudEvents_"): str(v) for k, v in got.headers.items()})
            # AMQP: headers, to MQTT user properties.
            await mqtt.subscribe(f"{qs.topic_prefix}devices/+/commands", qos=1)
            exchange = await amqp.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            await exchange.publish(
                aio_pika.Message(b"reboot", headers={f"cloudEvents_{k}": v for k, v in SPOOF.items()}),
                routing_key="d7",
            )
            async with asyncio.timeout(15):
                message = await anext(aiter(mqtt.messages))
            assert_not_spoofed(user_props(message))
    finally:
        await stopped(proc)


BROKER_AUTH = """
[auth.devices]
kind = "broker"
from = "topic"
segment = 2            # {prefix}/devices/<username>/telemetry
default_roles = ["device"]

[auth.backoffice]
kind = "broker"
from = "user_id"

[[rate_limits]]
name = "devices"
per = "inbound"
rate = 20.0
burst = 5
inbounds = ["devices"]
"""


async def test_broker_vouched_identities_dead_letters_and_slowed_consumption(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int], amqp: aio_pika.abc.AbstractChannel
) -> None:
    qs = Quickstart(
        tmp_path,
        extra_toml=BROKER_AUTH,
        overrides={"inbound.devices": {"auth": ["devices"]}, "inbound.commands": {"auth": ["backoffice"]}},
    )
    proc = await started(qs, tmp_path)
    try:
        telemetry = await bound_queue(amqp, qs.telemetry_exchange, "#")
        async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = [("authid", "mallory")]
            await mqtt.publish(f"{qs.topic_prefix}devices/dev42/telemetry", b"{}", qos=1, properties=props)
            got = await get_one(telemetry)
            assert got.headers["cloudEvents_authid"] == "dev42"
            assert got.headers["cloudEvents_authtype"] == "app_user"

            # AMQP: RabbitMQ checks user_id against the connection's user (guest); without one the broker
            # vouches for nobody, and the command is dead-lettered, then acknowledged.
            await mqtt.subscribe(f"{qs.topic_prefix}devices/+/commands", qos=1)
            exchange = await amqp.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            await exchange.publish(aio_pika.Message(b"no-user", message_id="anon-1"), routing_key="d1")
            await exchange.publish(aio_pika.Message(b"reboot", user_id="guest"), routing_key="d2")
            async with asyncio.timeout(15):
                message = await anext(aiter(mqtt.messages))
            assert message.payload == b"reboot"
            assert user_props(message)["authid"] == "guest"

            # 60 messages into an inbound limited to 20/s with bursts of 5: all arrive, none is dead-lettered,
            # and it takes the limit's time (about 2.75 s), the broker holding what waits.
            start = time.monotonic()
            for n in range(60):
                await mqtt.publish(f"{qs.topic_prefix}devices/dev{n}/telemetry", str(n).encode(), qos=1)
            seen: set[str] = set()
            async with asyncio.timeout(30):
                while len(seen) < 60:
                    seen.add((await get_one(telemetry)).body.decode())
            elapsed = time.monotonic() - start
            assert seen == {str(n) for n in range(60)}
            assert elapsed >= 2.0, f"60 messages at 20/s passed in {elapsed:.2f} s: the limit did not hold them"

        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{qs.http_port}/admin/dead-letters") as resp,
        ):
            letters = (await resp.json())["dead_letters"]
        assert [d["event_id"] for d in letters] == ["anon-1"], letters
        assert "vouches for no publisher" in letters[0]["reason"]
        queue = await amqp.declare_queue(qs.commands_queue, durable=True, passive=True)
        assert queue.declaration_result.message_count == 0, "the dead-lettered command was not acknowledged"
    finally:
        await stopped(proc)
