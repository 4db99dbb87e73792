"""Dead letters of a running daemon: an unroutable AMQP publish is dead-lettered with its reason, listed by
the admin endpoint and the CLI, and delivered when replayed after the operator fixed the cause."""

from __future__ import annotations

import asyncio
import json
import sys

import aio_pika
import aiohttp
import pytest

from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(90)


async def letters(http: aiohttp.ClientSession, port: int) -> list[dict[str, object]]:
    async with http.get(f"http://127.0.0.1:{port}/admin/dead-letters") as resp:
        assert resp.status == 200
        body = await resp.json()
    result: list[dict[str, object]] = body["dead_letters"]
    return result


async def test_unroutable_is_dead_lettered_listed_and_replayed(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    port = quickstart.http_port
    async with aiohttp.ClientSession() as http:
        # Nothing is bound to the orders exchange yet: RabbitMQ returns the mandatory publish.
        async with http.post(f"http://127.0.0.1:{port}/orders", json={"order": 42}) as resp:
            assert resp.status == 202
            event_id = (await resp.json())["id"]
        async with asyncio.timeout(20):
            while True:
                mine = [dl for dl in await letters(http, port) if dl["event_id"] == event_id]
                if mine:
                    break
                await asyncio.sleep(0.1)
        [letter] = mine
        assert letter["outbound"] == "orders-exchange"
        assert letter["route"] == "orders"
        assert "unroutable" in str(letter["reason"]).lower()
        assert letter["replayable"] is True

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mediator", "dead-letters", "list", "--config", str(daemon.config),
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert event_id in {dl["event_id"] for dl in json.loads(out)["dead_letters"]}

        conn = await aio_pika.connect(RABBIT_URL)
        async with conn:
            channel = await conn.channel()
            exchange = await channel.declare_exchange(
                quickstart.orders_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, "orders.created")
            async with http.post(
                f"http://127.0.0.1:{port}/admin/dead-letters/replay", json={"ids": [letter["id"]]}
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["replayed"] == 1
            async with asyncio.timeout(20):
                while (msg := await queue.get(fail=False)) is None:
                    await asyncio.sleep(0.05)
            assert msg.message_id == event_id
            assert json.loads(msg.body) == {"order": 42}
        assert all(dl["id"] != letter["id"] for dl in await letters(http, port))
