"""``/admin/status`` and ``mediator status`` say of each inbound what its traffic says: ready exactly when a
publish through it is accepted, not ready when it is not (its broker unreachable, the daemon draining).

One test per inbound kind on the shipped config (http, grpc, mqtt, amqp) publishes through the inbound and
compares: the state is ready in the JSON answer and in ``mediator status``'s table, and the inbound's own
``accepted`` counter moves. Then the unhappy states over brokers this test owns: an MQTT inbound on a
Mosquitto the test stops and starts again, an AMQP inbound whose broker's port is closed (while the HTTP
inbounds on the same daemon serve and say so), and every inbound while the daemon drains (HTTP answers
503, gRPC UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.support.brokers import MosquittoInstance
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

# The per-test budget is a safety net, not a speed check: each step has its own deadline, and a test here
# runs `mediator status` (a new interpreter) several times, ~10 s each on a machine loaded past 8 per core
# (flake round 3 took 90 s here while every wait was still within its own bound).
pytestmark = [pytest.mark.timeout(180), pytest.mark.broker]

SHIPPED_INBOUNDS = {"orders-http": "http", "cloudevents-http": "http", "grpc": "grpc", "devices": "mqtt"}
SHIPPED_INBOUNDS["commands"] = "amqp"


async def admin_status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/admin/status") as resp:
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc


def inbound(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [i for i in doc["inbounds"] if i["name"] == name]
    assert len(found) == 1, doc["inbounds"]
    row: dict[str, Any] = found[0]
    return row


async def until_inbound(port: int, name: str, ready: bool, timeout_s: float = 20.0) -> dict[str, Any]:
    """The inbound's row of /admin/status once its ``ready`` is ``ready``; fails with the last one seen."""
    row: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                row = inbound(await admin_status(port), name)
                if row["ready"] is ready:
                    return row
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"inbound {name} not ready={ready} within {timeout_s} s; last seen: {row}") from None


async def until_accepted(port: int, name: str, count: int, timeout_s: float = 20.0) -> dict[str, Any]:
    row: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                row = inbound(await admin_status(port), name)
                if row["accepted"] >= count:
                    return row
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"inbound {name}: accepted < {count} within {timeout_s} s; last seen: {row}") from None


async def cli_status(config: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``mediator status`` as JSON and as its table: (document, {inbound: its table row})."""
    out: list[str] = []
    for shape in ("--json", "--table"):
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "mediator", "status", "--config", str(config), shape),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        async with asyncio.timeout(30):
            stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        out.append(stdout.decode())
    lines = out[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("INBOUND"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    rows = {line.split()[0]: line for line in lines[start + 1 : end]}  # the INBOUND table's rows
    doc: dict[str, Any] = json.loads(out[0])
    return doc, rows


async def agrees(daemon: DaemonProcess, name: str, ready: bool) -> None:
    """``mediator status`` says of ``name`` what /admin/status does: ``ready``, in the JSON and the table."""
    doc, rows = await cli_status(daemon.config)
    assert inbound(doc, name)["ready"] is ready, inbound(doc, name)
    assert ("NOT READY" not in rows[name]) is ready, rows[name]
    assert (" ready " in f"{rows[name]} ") is ready, rows[name]


class Daemon(DaemonProcess):
    """A daemon of a rendered Quickstart, which names its ports and broker names."""

    def __init__(self, qs: Quickstart) -> None:
        super().__init__(qs.write(), qs.http_port, qs.tmp / "daemon.log")
        self.qs = qs


@pytest.fixture
async def shipped(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> AsyncIterator[Daemon]:
    proc = Daemon(Quickstart(tmp_path))
    await proc.start()
    try:
        yield proc
    finally:
        assert await proc.stop() == 0, proc.logs()


async def serves(daemon: DaemonProcess, name: str, publish: Callable[[], Awaitable[None]]) -> None:
    """Ready in every view, and a publish through the inbound is accepted (its own counter moves)."""
    port = daemon.http_port
    before = (await until_inbound(port, name, True))["accepted"]
    await publish()
    row = await until_accepted(port, name, before + 1)
    assert row["ready"] is True
    assert row["kind"] == SHIPPED_INBOUNDS[name]
    await agrees(daemon, name, True)


async def test_http_inbounds_are_ready_and_serve(shipped: Daemon) -> None:
    port = shipped.http_port

    async def order() -> None:
        async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/orders", json={}) as resp:
            assert resp.status == 202, await resp.text()

    async def cloudevent() -> None:
        headers = {
            "ce-specversion": "1.0",
            "ce-id": str(uuid.uuid4()),
            "ce-source": "/status-test",
            "ce-type": "com.example.order.created",
            "content-type": "application/json",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{port}/events", data=b"{}", headers=headers) as resp,
        ):
            assert resp.status == 202, await resp.text()

    await serves(shipped, "orders-http", order)
    await serves(shipped, "cloudevents-http", cloudevent)
    row = inbound(await admin_status(port), "orders-http")
    assert row["detail"] == f"serving http://127.0.0.1:{port}/orders on listener:http", row


def grpc_event() -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(
        id=str(uuid.uuid4()), source="/status-test", spec_version="1.0", type="com.example.order.created"
    )
    env.binary_data = b"{}"
    return env


async def test_grpc_inbound_is_ready_and_serves(shipped: Daemon) -> None:
    async def publish() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{shipped.qs.grpc_port}") as channel:
            reply = await service_pb2_grpc.MediatorStub(channel).Publish(grpc_event(), timeout=10)
            assert reply.id

    await serves(shipped, "grpc", publish)


async def mqtt_publish(port: int, topic: str) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.publish(topic, b'{"temp": 1}', qos=1)


async def test_mqtt_inbound_is_ready_and_serves(shipped: Daemon) -> None:
    topic = f"{shipped.qs.topic_prefix}devices/d1/telemetry"
    await serves(shipped, "devices", lambda: mqtt_publish(1883, topic))


async def test_amqp_inbound_is_ready_and_serves(shipped: Daemon) -> None:
    async def publish() -> None:
        async with await aio_pika.connect(RABBIT_URL, timeout=10) as conn:
            channel = await conn.channel()
            exchange = await channel.declare_exchange(
                shipped.qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            await exchange.publish(aio_pika.Message(b"reboot", message_id=str(uuid.uuid4())), routing_key="d1")

    await serves(shipped, "commands", publish)


@pytest.fixture
async def owned(tmp_path: Path, rabbitmq: str) -> AsyncIterator[tuple[Daemon, MosquittoInstance]]:
    """The shipped config with its MQTT broker a Mosquitto this test owns and its AMQP broker a closed port."""
    broker = MosquittoInstance(tmp_path / "mosquitto")
    await broker.start()
    drain: dict[str, dict[str, object]] = {"daemon": {"drain_timeout_s": 6.0}}
    proc = Daemon(Quickstart(tmp_path, mqtt_port=broker.port, amqp_port=free_port(), overrides=drain))
    await proc.start(wait_ready=False)
    try:
        yield proc, broker
    finally:
        await proc.stop()
        await broker.stop()


async def until_answering(port: int, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def test_broker_inbounds_are_not_ready_while_their_broker_is_unreachable(
    owned: tuple[Daemon, MosquittoInstance],
) -> None:
    daemon, broker = owned
    port = daemon.http_port
    await until_answering(port)
    topic = f"{daemon.qs.topic_prefix}devices/d1/telemetry"

    # AMQP on a closed port: not ready, saying why; and nothing can publish there.
    commands = await until_inbound(port, "commands", False)
    assert "cannot connect" in commands["detail"] or "connecting" in commands["detail"], commands
    await agrees(daemon, "commands", False)
    with pytest.raises((ConnectionError, OSError)):
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{daemon.qs.amqp_port}/", timeout=5)
    # Meanwhile the HTTP inbound serves (the outbox accepts while a broker is down) and says so.
    async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/orders", json={}) as resp:
        assert resp.status == 202
    await until_accepted(port, "orders-http", 1)
    await agrees(daemon, "orders-http", True)

    # MQTT on the broker the test owns: ready and serving, not ready once it stops, both again when it is back.
    await serves(daemon, "devices", lambda: mqtt_publish(broker.port, topic))
    await broker.stop()
    down = await until_inbound(port, "devices", False)
    assert down["detail"], down
    await agrees(daemon, "devices", False)
    await broker.start()
    await serves(daemon, "devices", lambda: mqtt_publish(broker.port, topic))


async def test_inbounds_are_not_ready_while_the_daemon_drains(
    owned: tuple[Daemon, MosquittoInstance],
) -> None:
    daemon, broker = owned
    port = daemon.http_port
    await until_answering(port)
    await until_inbound(port, "orders-http", True)
    await broker.stop()  # an order then stays undelivered to the MQTT outbound: the drain lasts its budget
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/orders", json={}) as resp:
            assert resp.status == 202
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        for name in ("orders-http", "cloudevents-http", "grpc", "devices", "commands"):
            row = await until_inbound(port, name, False, timeout_s=3.0)
            assert row["detail"].startswith("draining"), row
        async with http.post(f"http://127.0.0.1:{port}/orders", json={}) as resp:
            assert resp.status == 503
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.qs.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service_pb2_grpc.MediatorStub(channel).Publish(grpc_event(), timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
