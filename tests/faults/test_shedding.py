"""Shedding by priority (mediator/overload.py) against a broker that blocks publishers.

The daemon publishes to its own RabbitMQ node; the test sets a memory alarm on that node, so RabbitMQ
blocks the daemon's publishing connection (connection.blocked) and confirms stop: the outbox fills. Three
HTTP inbounds (critical, normal, low) and two MQTT inbounds (critical, low) on the shared Mosquitto feed
it. Expected, in order: low publishes refused first (503 + Retry-After) and the low MQTT inbound paused
while the critical one keeps committing; then normal publishes refused; critical ones accepted up to
max_pending. After the alarm clears, a real consumer receives every event that was acknowledged
(202, or taken from MQTT), the paused MQTT messages included: nothing acknowledged and then lost.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from aio_pika.abc import AbstractIncomingMessage

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.support.brokers import RabbitNode, own_rabbit_node
from tests.support.daemon import DaemonProcess
from tests.support.net import free_port, unique, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MAX_PENDING = 20


@pytest.fixture(scope="module")
def blockable_rabbit() -> Iterator[RabbitNode]:
    with own_rabbit_node() as node:
        yield node


def config(tmp: Path, http_port: int, grpc_port: int, rabbit: RabbitNode, exchange: str, topics: dict[str, str]) -> str:
    inbound = "".join(
        f"""
[inbound.http-{p}]
kind = "http"
listener = "web"
path = "/{p}"
mode = "cloudevents"
priority = "{p}"
"""
        for p in ("critical", "normal", "low")
    )
    inbound += "".join(
        f"""
[inbound.mqtt-{p}]
kind = "mqtt"
broker = "mosquitto"
topics = ["{topic}"]
qos = 1
type = "test.shed.mqtt"
priority = "{p}"
"""
        for p, topic in topics.items()
    )
    names = ", ".join(
        [*(f'"http-{p}"' for p in ("critical", "normal", "low")), *(f'"mqtt-{p}"' for p in topics), '"grpc-low"']
    )
    return f"""
[daemon]
log_format = "json"
drain_timeout_s = 2.0

[outbox]
path = "{tmp / "outbox.sqlite"}"
max_pending = {MAX_PENDING}

[overload]
outbox_low = 0.25
outbox_normal = 0.5
broker_stall_s = 1.0
loop_interval_s = 0.05

[listeners.web]
kind = "http"
host = "127.0.0.1"
port = {http_port}

[listeners.rpc]
kind = "grpc"
host = "127.0.0.1"
port = {grpc_port}

[inbound.grpc-low]
kind = "grpc"
listener = "rpc"
priority = "low"

[brokers.own]
kind = "amqp"
url = "{rabbit.url}"

[brokers.mosquitto]
kind = "mqtt"
host = "127.0.0.1"
port = 1883
client_id = "{unique("shed")}"
session_expiry_s = 0
{inbound}
[outbound.rabbit]
kind = "amqp"
broker = "own"
exchange = "{exchange}"
send_timeout_s = 1.0
retry = {{ max_attempts = 1000, backoff_initial_s = 0.05, backoff_max_s = 0.5 }}

[[routes]]
name = "all"
match.inbound = [{names}]
to = [{{ outbound = "rabbit", address = "shed" }}]
"""


async def post(http: aiohttp.ClientSession, port: int, priority: str, key: str) -> tuple[int, str | None, str]:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": key,
        "ce-type": "test.shed",
        "ce-source": "/shed",
        "Content-Type": "application/json",
    }
    body = json.dumps({"k": key}).encode()
    async with http.post(f"http://127.0.0.1:{port}/{priority}", data=body, headers=headers) as resp:
        return resp.status, resp.headers.get("Retry-After"), await resp.text()


async def admin_status(http: aiohttp.ClientSession, port: int) -> dict[str, object]:
    async with http.get(f"http://127.0.0.1:{port}/admin/status") as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        assert isinstance(doc, dict)
        return doc


async def test_priorities_are_shed_in_order_and_nothing_acknowledged_is_lost(
    tmp_path: Path, blockable_rabbit: RabbitNode, mosquitto: tuple[str, int]
) -> None:
    rabbit = blockable_rabbit
    exchange = unique("shed.x")
    topics = {p: f"{unique('shed')}/{p}" for p in ("critical", "low")}
    port, grpc_port = free_port(), free_port()
    path = tmp_path / "config.toml"
    path.write_text(config(tmp_path, port, grpc_port, rabbit, exchange, topics))

    received: dict[str, int] = {}  # body key -> times received (at-least-once: a retried publish repeats)

    async def on_message(message: AbstractIncomingMessage) -> None:
        key = json.loads(message.body)["k"]
        received[key] = received.get(key, 0) + 1
        await message.ack()

    consumer = await aio_pika.connect(rabbit.url)
    daemon = DaemonProcess(path, port, tmp_path / "daemon.log")
    alarm = False
    try:
        channel = await consumer.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(unique("shed.q"), exclusive=True)
        await queue.bind(ex, "#")
        await queue.consume(on_message)
        await daemon.start()
        acked: set[str] = set()
        async with (
            aiohttp.ClientSession() as http,
            aiomqtt.Client("127.0.0.1", 1883, identifier=unique("pub")) as pub,
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as grpc_channel,
        ):
            stub = service_pb2_grpc.MediatorStub(grpc_channel)
            # Flowing: one of each, delivered.
            for p in ("critical", "normal", "low"):
                status, _, text = await post(http, port, p, f"warm-{p}")
                assert status == 202, text
                acked.add(f"warm-{p}")
            await wait_until(lambda: acked <= set(received), timeout_s=20, what="the first events delivered")

            # The broker blocks publishers; a critical event gets stuck, and the broker monitor fires.
            await rabbit.actl("set_vm_memory_high_watermark", "0.0000001")
            alarm = True
            status, _, text = await post(http, port, "critical", "probe")
            assert status == 202, text
            acked.add("probe")
            levels: list[object] = []

            async def level_is(want: str) -> bool:
                doc = await admin_status(http, port)
                overload = doc["overload"]
                assert isinstance(overload, dict)
                levels.append(overload["level"])
                return bool(overload["level"] == want)

            async with asyncio.timeout(20):
                while not await level_is("shed_low"):
                    await asyncio.sleep(0.1)
            doc = await admin_status(http, port)
            overload = doc["overload"]
            assert isinstance(overload, dict)
            assert [r["monitor"] for r in overload["reasons"]] == ["broker"], overload

            # 1. Low first: refused with Retry-After, while normal and critical are still taken.
            low_refused = 0
            for i in range(3):
                status, retry_after, text = await post(http, port, "low", f"low-{i}")
                assert status == 503, text
                assert retry_after is not None
                assert int(retry_after) >= 1
                assert "low publishes shed" in text, text
                low_refused += 1
            env = envelope_pb2.Envelope(id="grpc-low-0", source="/shed", spec_version="1.0", type="test.shed")
            env.binary_data = b'{"k": "grpc-low-0"}'
            with pytest.raises(grpc.aio.AioRpcError) as refusal:
                await stub.Publish(env, timeout=10)
            assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.value

            # The low MQTT inbound pauses (holds its messages unacknowledged); the critical one flows.
            mqtt_keys = {p: [f"mqtt-{p}-{i}" for i in range(4)] for p in topics}
            for p, keys in mqtt_keys.items():
                for key in keys:
                    await pub.publish(topics[p], json.dumps({"k": key}).encode(), qos=1)

            async def inbound(name: str) -> dict[str, object]:
                doc = await admin_status(http, port)
                inbounds = doc["inbounds"]
                assert isinstance(inbounds, list)
                [found] = [x for x in inbounds if x["name"] == name]
                assert isinstance(found, dict)
                return found

            async with asyncio.timeout(20):
                while (await inbound("mqtt-critical"))["accepted"] != len(mqtt_keys["critical"]):
                    await asyncio.sleep(0.1)
                while "mqtt-low" not in (await admin_status(http, port))["overload"]["paused"]:  # type: ignore[index]
                    await asyncio.sleep(0.1)
            assert (await inbound("mqtt-low"))["accepted"] == 0
            acked.update(mqtt_keys["critical"])

            # 2. Then normal: taken until the outbox is half full (outbox_normal), refused after.
            normal_accepted = 0
            while True:
                key = f"normal-{normal_accepted}"
                status, retry_after, text = await post(http, port, "normal", key)
                if status != 202:
                    break
                acked.add(key)
                normal_accepted += 1
                assert normal_accepted <= MAX_PENDING, "normal publishes never shed"
            assert status == 503, text
            assert retry_after is not None
            assert "normal publishes shed: outbox" in text, text
            assert (await post(http, port, "low", "low-again"))[0] == 503
            low_refused += 1

            # 3. Critical: taken up to the hard limit (max_pending), then refused too.
            critical_accepted = 0
            while True:
                key = f"critical-{critical_accepted}"
                status, retry_after, text = await post(http, port, "critical", key)
                if status != 202:
                    break
                acked.add(key)
                critical_accepted += 1
                assert critical_accepted <= MAX_PENDING, "critical publishes never refused"
            assert status == 503, text
            assert retry_after is not None
            assert f"outbox holds {MAX_PENDING}" in text, text
            # Every critical one committed beyond the normal limit: the outbox is full, and of them.
            held = 1 + len(mqtt_keys["critical"]) + normal_accepted + critical_accepted
            assert held == MAX_PENDING, (normal_accepted, critical_accepted)
            assert critical_accepted >= MAX_PENDING // 2 - 1

            # What was shed and why: /admin/status, /metrics and `mediator status`.
            overload = (await admin_status(http, port))["overload"]
            assert isinstance(overload, dict)
            assert overload["level"] == "shed_normal", overload
            assert overload["shedding"] == ["low", "normal"], overload
            shed = {(s["inbound"], s["monitor"]): s["refused"] for s in overload["shed"]}
            assert sum(n for (i, _), n in shed.items() if i == "http-low") == low_refused, shed
            assert shed[("http-low", "broker")] == 3, shed  # before the outbox filled, the broker shed them
            assert shed[("http-normal", "outbox")] == 1, shed
            assert shed[("grpc-low", "broker")] == 1, shed
            assert not any(i in ("http-critical", "mqtt-critical") for i, _ in shed), shed
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics = await resp.text()
            assert 'mediator_events_shed_total{inbound="http-low",monitor="broker",priority="low"} 3.0' in metrics, (
                metrics
            )
            assert "mediator_overload_level 2.0" in metrics
            assert 'mediator_inbound_paused{inbound="mqtt-low"} 1.0' in metrics
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mediator",
                "status",
                "--config",
                str(path),
                "--table",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(30):
                out, _ = await cli.communicate()
            text = out.decode()
            assert cli.returncode == 0, text
            assert "overload: shed_normal" in text, text
            assert "paused: mqtt-low" in text, text

            # The alarm clears: everything acknowledged arrives, the paused MQTT messages too.
            await rabbit.actl("set_vm_memory_high_watermark", "0.4")
            alarm = False
            acked.update(mqtt_keys["low"])
            await wait_until(
                lambda: acked <= set(received), timeout_s=60, what="every acknowledged event delivered", poll_s=0.1
            )
            lost = acked - set(received)
            duplicates = sum(n - 1 for n in received.values())
            print(f"shedding: acked={len(acked)} received={len(received)} lost={len(lost)} duplicates={duplicates}")
            assert not lost, sorted(lost)
            unexpected = set(received) - acked
            assert not unexpected, f"received events that were refused: {sorted(unexpected)}"
            async with asyncio.timeout(20):
                while not await level_is("none"):
                    await asyncio.sleep(0.1)
    finally:
        if alarm:
            await rabbit.actl("set_vm_memory_high_watermark", "0.4", check=False)
        if daemon.proc is not None:
            await daemon.stop()
        await consumer.close()
