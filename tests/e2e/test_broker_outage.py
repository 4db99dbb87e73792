"""The daemon starts without its brokers, connects when they appear, and resumes after a broker restart.

Uses a Mosquitto instance the test owns (never the shared one)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import pytest

from tests.support.brokers import MosquittoInstance
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = pytest.mark.timeout(120)


async def readyz(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status


async def publish_telemetry(port: int, prefix: str, device: str, seqs: range) -> None:
    """QoS 1 publishes: each returns after the PUBACK, i.e. after the daemon committed it."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"pub-{device}") as mqtt:
        for seq in seqs:
            await mqtt.publish(f"{prefix}devices/{device}/telemetry", str(seq).encode(), qos=1)


async def collect(queue: aio_pika.abc.AbstractQueue, expected: set[int], timeout_s: float = 30) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(timeout_s), queue.iterator() as it:
        async for msg in it:
            await msg.ack()
            got.append(int(msg.body))
            if expected <= set(got):
                break
    return got


async def test_daemon_starts_without_broker_then_connects_and_survives_restart(tmp_path: Path, rabbitmq: str) -> None:
    broker = MosquittoInstance(tmp_path / "mosq", port=free_port())
    qs = Quickstart(tmp_path, mqtt_port=broker.port)
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await daemon.start(wait_ready=False)
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        # The broker is down: the daemon is alive but not ready.
        async with asyncio.timeout(20):
            while True:
                try:
                    status = await readyz(qs.http_port)
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        assert status == 503
        await asyncio.sleep(1.0)
        assert daemon.proc is not None
        assert daemon.proc.returncode is None, daemon.logs()
        assert await readyz(qs.http_port) == 503

        await broker.start()
        await daemon.wait_ready(30)

        channel = await conn.channel()
        exchange = await channel.declare_exchange(qs.telemetry_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "telemetry.dev1")

        await publish_telemetry(broker.port, qs.topic_prefix, "dev1", range(0, 50))
        before = await collect(queue, set(range(50)))
        assert set(before) == set(range(50))

        await broker.restart(kill=True)
        await daemon.wait_ready(30)  # reconnected and resubscribed by itself

        await publish_telemetry(broker.port, qs.topic_prefix, "dev1", range(50, 100))
        after = await collect(queue, set(range(50, 100)))
        assert set(after) >= set(range(50, 100))
        duplicates = len(before) + len(after) - len(set(before) | set(after))
        assert duplicates <= 50, f"{duplicates} duplicates"
    finally:
        await conn.close()
        code = await daemon.stop(signal.SIGTERM)
        await broker.stop()
    assert code == 0, daemon.logs()
