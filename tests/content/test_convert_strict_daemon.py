"""Strict Avro conversion through the real daemon: events POSTed over HTTP to a route with two AMQP
destinations converting to Avro, one with ``unknown_fields = "reject"`` (the default) and one with
``"drop"``, read by consumers on the shared RabbitMQ and decoded with fastavro. The issue's event
(``"extra": true``) is dead-lettered at the rejecting destination with a reason naming ``extra`` and
delivered without it at the other; a wrong type (``"qty": "three"``) is dead-lettered at both; a good
event arrives at both."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiohttp
import fastavro
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractQueue

from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

SCHEMA = {
    "type": "record",
    "name": "Order",
    "namespace": "strictshop",
    "fields": [
        {"name": "orderId", "type": "string"},
        {"name": "qty", "type": "int"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}
TYPE = "com.example.strict.order"

ROUTES = f"""
[[routes]]
name = "strict-avro"
match = {{ type = ["{TYPE}"] }}

[[routes.to]]
outbound = "orders-exchange"
address = "strict.reject"
convert = {{ to = "avro", avro_schema = "order.avsc" }}

[[routes.to]]
outbound = "orders-exchange"
address = "strict.drop"
convert = {{ to = "avro", avro_schema = "order.avsc", unknown_fields = "drop" }}
"""


@dataclass
class Env:
    base: str
    http: aiohttp.ClientSession
    channel: AbstractChannel
    qs: Quickstart

    async def post(self, data: Any) -> str:
        event_id = uuid.uuid4().hex
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-source": "/strict-test",
            "ce-type": TYPE,
            "Content-Type": "application/json",
        }
        async with self.http.post(self.base + "/events", data=json.dumps(data), headers=headers) as resp:
            assert resp.status == 202, await resp.text()
        return event_id

    async def dead_letters(self, event_id: str, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The event's dead letters, once there are ``count`` of them (fails with what it saw)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            async with self.http.get(f"{self.base}/admin/dead-letters", params={"limit": "1000"}) as resp:
                assert resp.status == 200
                seen = [d for d in (await resp.json())["dead_letters"] if d["event_id"] == event_id]
            if len(seen) >= count:
                return seen
            await asyncio.sleep(0.1)
        raise AssertionError(f"expected {count} dead letters of {event_id}, saw {seen}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("strict")
    (tmp / "order.avsc").write_text(json.dumps(SCHEMA))
    qs = Quickstart(tmp, extra_toml=ROUTES)
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
    await daemon.start()
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        async with conn, aiohttp.ClientSession() as http:
            yield Env(f"http://127.0.0.1:{qs.http_port}", http, await conn.channel(), qs)
    finally:
        code = await daemon.stop(signal.SIGTERM)
        assert code == 0, daemon.logs()


def avro(body: bytes) -> Any:
    stream = io.BytesIO(body)
    datum = fastavro.schemaless_reader(stream, fastavro.parse_schema(SCHEMA), None)
    assert stream.tell() == len(body), "one datum, nothing after it"
    return datum


async def queues(env: Env) -> tuple[AbstractQueue, AbstractQueue]:
    return (
        await bound_queue(env.channel, env.qs.orders_exchange, "strict.reject"),
        await bound_queue(env.channel, env.qs.orders_exchange, "strict.drop"),
    )


async def test_good_events_arrive_at_both_destinations_as_avro(env: Env) -> None:
    reject, drop = await queues(env)
    ids = [await env.post({"orderId": f"o-{i}", "qty": i}) for i in range(3)]
    for queue in (reject, drop):
        got = [await get_one(queue) for _ in ids]
        assert [m.message_id for m in got] == ids
        assert {m.content_type for m in got} == {"application/avro"}
        assert [avro(m.body) for m in got] == [{"orderId": f"o-{i}", "qty": i, "note": None} for i in range(3)]


async def test_an_unknown_field_dead_letters_under_reject_and_is_left_out_under_drop(env: Env) -> None:
    reject, drop = await queues(env)
    event_id = await env.post({"orderId": "o-12", "qty": 3, "extra": True})
    got = await get_one(drop)
    assert got.message_id == event_id
    assert avro(got.body) == {"orderId": "o-12", "qty": 3, "note": None}, "extra left out on purpose"
    [letter] = await env.dead_letters(event_id, 1)
    assert letter["address"] == "strict.reject"
    assert letter["reason"].startswith("transform failed: cannot convert to Avro strictshop.Order: field 'extra' ")
    assert "is not in strictshop.Order" in letter["reason"]
    # The next event on the rejecting destination is the next good one: nothing of o-12 came through.
    after = await env.post({"orderId": "o-13", "qty": 1})
    assert (await get_one(reject)).message_id == after
    assert (await get_one(drop)).message_id == after


async def test_a_wrong_type_dead_letters_at_both_destinations(env: Env) -> None:
    reject, drop = await queues(env)
    event_id = await env.post({"orderId": "o-14", "qty": "three"})
    letters = await env.dead_letters(event_id, 2)
    assert sorted(d["address"] for d in letters) == ["strict.drop", "strict.reject"]
    for letter in letters:
        assert "field 'qty' must be an int, not a JSON string" in letter["reason"], letter
        assert "three" not in letter["reason"]
    missing = await env.post({"qty": 2})
    letters = await env.dead_letters(missing, 2)
    assert all("field 'orderId' is required" in d["reason"] for d in letters), letters
    after = await env.post({"orderId": "o-15", "qty": 5})
    for queue in (reject, drop):
        assert (await get_one(queue)).message_id == after
