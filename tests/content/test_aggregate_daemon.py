"""Aggregation through the real daemon: members in over HTTP, composites counted at an AMQP consumer with
their member ids, by count and by inactivity, and a group that survives ``kill -9``."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractQueue

from tests.e2e.test_quickstart import bound_queue
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(60)

LINE, READING = "com.example.order.line", "com.example.reading"

AGGREGATES = """
[[aggregate]]
name = "order-lines"
types = ["com.example.order.line"]
key = "{data.orderId}"
count = 3
type = "com.example.order.assembled"
source = "/aggregate/orders"

[[aggregate]]
name = "readings"
types = ["com.example.reading"]
key = "{subject}"
timeout_s = 1.0
type = "com.example.reading.window"
source = "/aggregate/readings"

[[routes]]
name = "composites"
match = { type = ["com.example.order.assembled", "com.example.reading.window"] }
to = [{ outbound = "orders-exchange", address = "agg.{aggregatekey}" }]

[[routes]]
name = "members-must-not-be-routed"
match = { type = ["com.example.order.line", "com.example.reading"] }
to = [{ outbound = "orders-exchange", address = "member" }]
"""


async def post(session: aiohttp.ClientSession, port: int, type_: str, body: dict[str, object], **ce: str) -> str:
    event_id = uuid.uuid4().hex
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/test",
        "ce-type": type_,
        "Content-Type": "application/json",
    } | {f"ce-{k}": v for k, v in ce.items()}
    async with session.post(f"http://127.0.0.1:{port}/events", data=json.dumps(body), headers=headers) as resp:
        assert resp.status == 202, await resp.text()
    return event_id


async def collect(queue: AbstractQueue, count: int, timeout_s: float) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout_s):
        while len(got) < count:
            msg = await queue.get(fail=False)
            if msg is None:
                await asyncio.sleep(0.05)
                continue
            await msg.ack()
            got.append(msg)
    return got


async def nothing_more(queue: AbstractQueue, wait_s: float = 0.5) -> None:
    await asyncio.sleep(wait_s)
    msg = await queue.get(fail=False)
    assert msg is None, f"unexpected message {msg.routing_key}: {msg.body[:200]!r}"


@pytest.fixture
async def consumer(rabbitmq: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        yield await conn.channel()


def setup(tmp_path: Path) -> tuple[Quickstart, DaemonProcess]:
    qs = Quickstart(tmp_path, extra_toml=AGGREGATES)
    return qs, DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")


async def test_by_count_and_by_inactivity(
    tmp_path: Path, consumer: aio_pika.abc.AbstractChannel, mosquitto: tuple[str, int]
) -> None:
    qs, daemon = setup(tmp_path)
    queue = await bound_queue(consumer, qs.orders_exchange, "#")
    await daemon.start()
    try:
        sent: dict[str, list[str]] = {"o1": [], "o2": []}
        async with aiohttp.ClientSession() as http:
            for n in range(3):  # interleaved: two groups fill at once
                for order in ("o1", "o2"):
                    sent[order].append(await post(http, qs.http_port, LINE, {"orderId": order, "line": n}))
            got = await collect(queue, 2, 10)
            by_key = {m.routing_key: m for m in got}
            assert set(by_key) == {"agg.o1", "agg.o2"}
            for order, ids in sent.items():
                msg = by_key[f"agg.{order}"]
                assert msg.headers["cloudEvents_type"] == "com.example.order.assembled"
                assert msg.headers["cloudEvents_aggregatedids"] == ",".join(ids)
                assert json.loads(msg.body) == [{"orderId": order, "line": n} for n in range(3)]
                assert msg.content_type == "application/json"

            t0 = time.monotonic()
            window = [await post(http, qs.http_port, READING, {"t": t}, subject="sensor-1") for t in (20.5, 21.0)]
            (reading,) = await collect(queue, 1, 10)
            assert time.monotonic() - t0 >= 0.9, "completed by inactivity, not at once"
            assert reading.routing_key == "agg.sensor-1"
            assert reading.headers["cloudEvents_aggregatedids"] == ",".join(window)
            assert json.loads(reading.body) == [{"t": 20.5}, {"t": 21.0}]
        await nothing_more(queue)  # no member was routed on its own, and each composite came once
    finally:
        assert await daemon.stop(signal.SIGTERM) == 0, daemon.logs()


async def test_group_survives_kill_9(
    tmp_path: Path, consumer: aio_pika.abc.AbstractChannel, mosquitto: tuple[str, int]
) -> None:
    qs, daemon = setup(tmp_path)
    queue = await bound_queue(consumer, qs.orders_exchange, "#")
    await daemon.start()
    async with aiohttp.ClientSession() as http:
        # Acknowledged (202) members of an incomplete count group and of an inactivity group, then kill -9
        # before the inactivity timer fires.
        lines = [await post(http, qs.http_port, LINE, {"orderId": "k9", "line": n}) for n in range(2)]
        readings = [await post(http, qs.http_port, READING, {"t": t}, subject="sensor-9") for t in range(4)]
        await daemon.kill()
        await nothing_more(queue, 0.2)

        again = DaemonProcess(daemon.config, qs.http_port, tmp_path / "daemon2.log")
        await again.start()
        try:
            (window,) = await collect(queue, 1, 10)  # the inactivity timer re-armed from the stored times
            assert window.routing_key == "agg.sensor-9"
            assert window.headers["cloudEvents_aggregatedids"] == ",".join(readings)
            lines.append(await post(http, qs.http_port, LINE, {"orderId": "k9", "line": 2}))
            (assembled,) = await collect(queue, 1, 10)
            ids = str(assembled.headers["cloudEvents_aggregatedids"]).split(",")
            assert ids == lines, f"lost {set(lines) - set(ids)}"
            assert json.loads(assembled.body) == [{"orderId": "k9", "line": n} for n in range(3)]
            await nothing_more(queue)
        finally:
            assert await again.stop(signal.SIGTERM) == 0, again.logs()
