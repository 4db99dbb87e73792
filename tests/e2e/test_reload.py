"""Config reload without a restart: a good edit swaps the routes in; a bad one is refused and the old
config keeps serving."""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import aiohttp
import pytest

from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(90)


async def post_order(port: int) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/orders", json={"order": 1}) as resp,
    ):
        assert resp.status == 202
        event_id: str = (await resp.json())["id"]
        return event_id


async def next_message(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with asyncio.timeout(15):
        while (msg := await queue.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    await msg.ack()
    return msg


async def wait_log(daemon: DaemonProcess, text: str, count: int) -> None:
    async with asyncio.timeout(15):
        while daemon.logs().count(text) < count:
            await asyncio.sleep(0.1)


async def test_sighup_swaps_routes_and_refuses_a_bad_edit(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    assert daemon.proc is not None
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        channel = await conn.channel()
        exchange = await channel.declare_exchange(quickstart.orders_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "orders.*")

        first = await post_order(quickstart.http_port)
        assert (await next_message(queue)).routing_key == "orders.created"

        text = daemon.config.read_text()
        daemon.config.write_text(text.replace('address = "orders.created"', 'address = "orders.revised"'))
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_log(daemon, "config.reloaded", 1)
        second = await post_order(quickstart.http_port)
        msg = await next_message(queue)
        assert msg.routing_key == "orders.revised"
        assert msg.message_id == second != first

        good = daemon.config.read_text()
        daemon.config.write_text(good.replace("[[routes]]", "[[routes]\n", 1))  # a TOML syntax error
        daemon.proc.send_signal(signal.SIGHUP)
        await wait_log(daemon, "config.reload_refused", 1)
        third = await post_order(quickstart.http_port)
        msg = await next_message(queue)
        assert msg.routing_key == "orders.revised"  # the last good config still serves
        assert msg.message_id == third
        assert daemon.proc.returncode is None
