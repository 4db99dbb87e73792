"""Enrichment against real lookups: a Redis the test starts (and stops) and an aiohttp server it runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from mediator.core.envelope import Envelope, attribute, data_bytes, new_event
from mediator.core.errors import ConfigError, NotReady, Rejected
from mediator.core.ingress import Batch, Origin
from mediator.stages.enrich import Enrich, EnrichConfig, build
from tests.content.conftest import RedisServer
from tests.support.net import free_port

pytestmark = pytest.mark.timeout(30)

ORDER = "com.example.order.created"


def order(customer: str | None, **extra: Any) -> Envelope:
    body: dict[str, Any] = {"order": 1, **extra}
    if customer is not None:
        body["customerId"] = customer
    return new_event(type=ORDER, source="/orders", data=orjson.dumps(body), content_type="application/json")


def enricher(url: str, **keys: Any) -> Enrich:
    cfg = EnrichConfig.model_validate(
        {"name": "crm", "kind": "redis", "url": url, "key": "customer:{data.customerId}", "into": "data.customer"}
        | keys
    )
    (stage,) = build([cfg])
    return stage


def batch(*events: Envelope) -> Batch:
    return Batch(Origin(inbound="orders-http", protocol="http"), list(events))


def data(env: Envelope) -> Any:
    return json.loads(data_bytes(env))


async def test_redis_hit_miss_cache_and_dead_letter(own_redis: RedisServer) -> None:
    r = own_redis.client()
    await r.hset("customer:c1", mapping={"name": "Alice", "tier": "gold"})
    stage = enricher(own_redis.url, ttl_s=60)
    try:
        hit, miss, keyless = order("c1"), order("c404"), order(None)
        b = batch(hit, miss, keyless)
        await stage.run(b)
        assert data(hit) == {"order": 1, "customerId": "c1", "customer": {"name": "Alice", "tier": "gold"}}
        assert data(miss) == {"order": 1, "customerId": "c404"}  # on_miss = skip: unchanged, passed on
        assert data(keyless) == {"order": 1}
        assert b.events == [hit, miss, keyless]
        assert not b.dead_letters
        assert b.data.get(hit)["customer"]["tier"] == "gold"  # the parse cache saw the change

        # Cached for ttl_s: a change in Redis is not seen yet, by one lookup or many.
        await r.hset("customer:c1", "tier", "platinum")
        again = order("c1")
        await stage.run(batch(again))
        assert data(again)["customer"]["tier"] == "gold"
    finally:
        await stage.close()

    dl = enricher(own_redis.url, ttl_s=0, on_miss="dead_letter")
    try:
        hit, miss = order("c1"), order("c404")
        b = batch(hit, miss)
        await dl.run(b)
        assert data(hit)["customer"]["tier"] == "platinum"  # ttl_s = 0: no cache
        assert b.events == [hit]
        assert len(b.dead_letters) == 1
        assert b.dead_letters[0][0] is miss
        assert "no entry for 'customer:c404'" in b.dead_letters[0][1]
    finally:
        await dl.close()
        await r.aclose()


async def test_redis_stopped_each_policy(own_redis: RedisServer) -> None:
    r = own_redis.client()
    await r.hset("customer:c1", "name", "Alice")
    await r.aclose()
    stages = {p: enricher(own_redis.url, ttl_s=0, timeout_s=0.5, on_error=p) for p in ("retry", "skip", "dead_letter")}
    try:
        ok = order("c1")
        await stages["retry"].run(batch(ok))
        assert data(ok)["customer"] == {"name": "Alice"}  # the pool is connected before the outage
        await own_redis.stop()

        started = time.monotonic()
        with pytest.raises(NotReady) as info:
            await stages["retry"].run(batch(order("c1")))
        assert time.monotonic() - started < 2.0, "a lookup is bounded by timeout_s"
        assert "enrich:crm: lookup failed" in info.value.reason

        skipped = order("c1")
        b = batch(skipped)
        await stages["skip"].run(b)
        assert b.events == [skipped]
        assert data(skipped) == {"order": 1, "customerId": "c1"}

        dead = order("c1")
        b = batch(dead)
        await stages["dead_letter"].run(b)
        assert b.events == []
        assert b.dead_letters[0][0] is dead
        assert "lookup of 'customer:c1' failed" in b.dead_letters[0][1]

        # Redis back on the same port: the same pool reconnects.
        await own_redis.start()
        r = own_redis.client()
        await r.hset("customer:c1", "name", "Alice again")
        await r.aclose()
        back = order("c1")
        await stages["retry"].run(batch(back))
        assert data(back)["customer"] == {"name": "Alice again"}
    finally:
        for stage in stages.values():
            await stage.close()


async def test_data_must_be_a_json_object() -> None:
    stage = enricher("redis://127.0.0.1:1/0")
    try:
        text = new_event(type=ORDER, source="/x", data=b"plain", content_type="text/plain")
        with pytest.raises(Rejected) as info:
            await stage.run(batch(text))
        assert "must be a JSON object" in info.value.reason
    finally:
        await stage.close()


class Crm:
    """An HTTP lookup the test runs: /customers/c1 answers, /customers/slow does not in time."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[str] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["id"]
        self.requests.append(cid)
        if cid == "slow":
            await asyncio.sleep(1)
        if cid in ("c1", "slow"):
            await asyncio.sleep(0.05)  # concurrent lookups of one key overlap
            return web.json_response({"name": "Alice", "tier": "gold", "since": 2019})
        if cid == "broken":
            return web.Response(status=500)
        return web.json_response({"error": "not found"}, status=404)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/customers/{id}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/customers/{{key}}"


@pytest.fixture
async def crm() -> AsyncIterator[Crm]:
    server = Crm()
    await server.start()
    try:
        yield server
    finally:
        assert server.runner is not None
        await server.runner.cleanup()


def http_enricher(crm: Crm, **keys: Any) -> Enrich:
    cfg = EnrichConfig.model_validate(
        {"name": "crm-http", "kind": "http", "url": crm.url, "key": "{data.customerId}", "timeout_s": 0.3} | keys
    )
    (stage,) = build([cfg])
    return stage


async def test_http_hit_miss_timeout_and_one_request_per_key(crm: Crm) -> None:
    stage = http_enricher(crm, into="attributes", attribute_prefix="customer", on_miss="dead_letter")
    try:
        events = [order("c1") for _ in range(5)] + [order("c404")]
        b = batch(*events)
        await stage.run(b)
        for env in events[:5]:
            assert attribute(env, "customername") == "Alice"
            assert attribute(env, "customertier") == "gold"
            assert attribute(env, "customersince") == "2019"  # a number as its JSON text
        assert b.events == events[:5]
        assert b.dead_letters[0][0] is events[5]
        assert "no entry for 'c404'" in b.dead_letters[0][1]
        # Two concurrent batches for the same key: one request between them (and the five above).
        await asyncio.gather(stage.run(batch(order("c1"))), stage.run(batch(order("c1"))))
        assert crm.requests.count("c1") == 1
    finally:
        await stage.close()

    retry = http_enricher(crm)
    try:
        started = time.monotonic()
        with pytest.raises(NotReady) as info:
            await retry.run(batch(order("slow")))
        assert time.monotonic() - started < 1.5
        assert "no answer within 0.3 s" in info.value.reason
        with pytest.raises(NotReady) as info:
            await retry.run(batch(order("broken")))
        assert "status 500" in info.value.reason
        ok = order("c1")
        await retry.run(batch(ok))
        assert data(ok)["name"] == "Alice"
        assert data(ok)["order"] == 1
    finally:
        await retry.close()


def test_url_env_and_its_variable() -> None:
    cfg = EnrichConfig.model_validate({"name": "crm", "kind": "redis", "url_env": "CRM_REDIS_URL", "key": "k"})
    with pytest.raises(ConfigError) as info:
        build([cfg], environ=lambda name: None)
    assert info.value.file == "environment"
    assert info.value.problems == ["enrich[0].url_env: environment variable CRM_REDIS_URL is not set"]
    env = {"CRM_REDIS_URL": "redis://:secret@127.0.0.1:6379/0"}
    (stage,) = build([cfg], environ=env.get)
    assert stage.name == "enrich:crm"
