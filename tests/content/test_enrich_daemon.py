"""Enrichment through the real daemon and the shared Redis (keys unique to the test): an order posted
over HTTP reaches the AMQP consumer with its customer merged in; an unknown customer is dead-lettered
with the reason; a SIGHUP that changes the enricher swaps it in."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, unique

pytestmark = pytest.mark.timeout(60)


def enrich_toml(prefix: str, into: str) -> str:
    return f"""
[[enrich]]
name = "crm"
types = ["com.example.order.created"]
inbounds = ["orders-http"]
kind = "redis"
url = "redis://127.0.0.1:6379/0"
key = "{prefix}:customer:{{data.customerId}}"
into = "{into}"
ttl_s = 30.0
timeout_s = 0.5
on_miss = "dead_letter"
on_error = "retry"
"""


@pytest.fixture
async def customers(shared_redis: str) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    prefix = unique("enrich")
    client = aioredis.Redis.from_url(shared_redis, decode_responses=True)
    await client.hset(f"{prefix}:customer:c1", mapping={"name": "Alice", "tier": "gold"})
    try:
        yield prefix, client
    finally:
        await client.delete(f"{prefix}:customer:c1")
        await client.aclose()


async def test_orders_enriched_from_redis_and_a_miss_dead_lettered(
    tmp_path: Path, customers: tuple[str, aioredis.Redis], rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    prefix, _ = customers
    qs = Quickstart(tmp_path, extra_toml=enrich_toml(prefix, "data.customer"))
    config = qs.write()
    daemon = DaemonProcess(config, qs.http_port, tmp_path / "daemon.log")
    base = f"http://127.0.0.1:{qs.http_port}"
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        queue = await bound_queue(await conn.channel(), qs.orders_exchange, "orders.created")
        await daemon.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/orders", json={"order": 7, "customerId": "c1"}) as resp:
                    assert resp.status == 202, await resp.text()
                got = await get_one(queue)
                assert json.loads(got.body) == {
                    "order": 7,
                    "customerId": "c1",
                    "customer": {"name": "Alice", "tier": "gold"},
                }

                async with http.post(f"{base}/orders", json={"order": 8, "customerId": "nobody"}) as resp:
                    assert resp.status == 202, "a miss is not the sender's fault: accepted, then dead-lettered"
                    missed_id = (await resp.json())["id"]
                async with http.get(f"{base}/admin/dead-letters") as resp:
                    letters = (await resp.json())["dead_letters"]
                (letter,) = [d for d in letters if d["event_id"] == missed_id]
                assert letter["reason"] == f"enrich:crm: no entry for '{prefix}:customer:nobody'"

                # SIGHUP with the enricher changed (into attributes now): swapped in without a restart.
                config.write_text(
                    qs.render().replace(enrich_toml(prefix, "data.customer"), "") + enrich_toml(prefix, "attributes")
                )
                assert daemon.proc is not None
                daemon.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while "config.stages_reloaded" not in daemon.logs():
                    assert time.monotonic() < deadline, daemon.logs()
                    await asyncio.sleep(0.05)
                async with http.post(f"{base}/orders", json={"order": 9, "customerId": "c1"}) as resp:
                    assert resp.status == 202
                got = await get_one(queue)
                assert json.loads(got.body) == {"order": 9, "customerId": "c1"}
                assert got.headers["cloudEvents_tier"] == "gold"
                assert got.headers["cloudEvents_name"] == "Alice"
        finally:
            assert await daemon.stop(signal.SIGTERM) == 0, daemon.logs()
