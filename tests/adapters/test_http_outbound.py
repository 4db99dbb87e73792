"""Webhook outbound against a real aiohttp receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from adapters.http import HttpOutbound, HttpOutboundConfig, build
from adapters.http.codec import from_binary
from mediator.core import formats
from mediator.core.envelope import Envelope, attribute, context_attributes, data_bytes, new_event
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.seams import AdapterConfig, Runtime
from mediator.v1.envelope_pb2 import Provenance
from tests.adapters.test_http_support import serve
from tests.support.fakes import ListSink
from tests.support.net import free_port

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Received:
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Receiver:
    base: str
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver: /ok 204, /fail 500, /busy 429 + Retry-After, /gone 410, /slow never answers,
    /moved 302; anything else 404."""
    state = Receiver(base="")

    async def record(request: web.Request) -> Received:
        got = Received(request.path, request.headers, await request.read())
        state.requests.append(got)
        state.arrived.set()
        return got

    async def ok(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=204)

    async def fail(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=500, text="database on fire\nsecond line")

    async def busy(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=429, headers={"Retry-After": "7"})

    async def busy_until(request: web.Request) -> web.Response:
        await record(request)
        when = email.utils.formatdate(time.time() + 60, usegmt=True)
        return web.Response(status=503, headers={"Retry-After": when})

    async def gone(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=410, text="unsubscribed")

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await state.release.wait()
        return web.Response(status=200)

    async def moved(request: web.Request) -> web.Response:
        await record(request)
        raise web.HTTPFound("/ok")

    app = web.Application()
    for path, handler in [
        ("/ok", ok),
        ("/hooks/orders", ok),
        ("/fail", fail),
        ("/busy", busy),
        ("/busy-until", busy_until),
        ("/gone", gone),
        ("/slow", slow),
        ("/moved", moved),
    ]:
        app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.base = f"http://127.0.0.1:{site.port}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def outbound(**cfg: Any) -> AsyncIterator[HttpOutbound]:
    ob = HttpOutbound("hooks", HttpOutboundConfig.model_validate({"kind": "http", **cfg}))
    try:
        yield ob
    finally:
        await ob.close()


def sample() -> Envelope:
    env = new_event(
        type="com.example.order.created",
        source="/orders",
        data=b'{"order": 42}',
        content_type="application/json",
        subject="Euro \u20ac",
        provenance=Provenance(inbound="orders-http", protocol="http", principal="alice"),
    )
    env.attributes["traceparent"].ce_string = TRACEPARENT
    return env


async def test_binary_format(receiver: Receiver) -> None:
    env = sample()
    async with outbound(url=receiver.base, headers={"Authorization": "Bearer abc"}) as ob:
        await ob.send(env, "ok", "binary")
    (got,) = receiver.requests
    assert got.path == "/ok"
    assert got.body == b'{"order": 42}'
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["ce-id"] == env.id
    assert got.headers["ce-subject"] == "Euro%20%E2%82%AC"
    assert got.headers["traceparent"] == TRACEPARENT
    assert got.headers["Authorization"] == "Bearer abc"
    assert not any(k.lower().startswith("ce-provenance") for k in got.headers)
    back = from_binary(got.headers, got.body)
    assert context_attributes(back) == context_attributes(env)
    assert data_bytes(back) == data_bytes(env)


async def test_binary_without_datacontenttype_sends_no_content_type(receiver: Receiver) -> None:
    env = new_event(type="t", source="/s", data=b"\x00raw")
    async with outbound(url=receiver.base) as ob:
        await ob.send(env, "/ok", "binary")
    (got,) = receiver.requests
    assert "Content-Type" not in got.headers
    assert attribute(from_binary(got.headers, got.body), "datacontenttype") is None


async def test_structured_format(receiver: Receiver) -> None:
    env = sample()
    async with outbound(url=receiver.base + "/") as ob:
        await ob.send(env, "/ok", "structured")
    (got,) = receiver.requests
    assert got.headers["Content-Type"] == formats.JSON_CONTENT_TYPE
    back = formats.from_structured(got.body)
    assert context_attributes(back) == context_attributes(env)
    assert b"alice" not in got.body  # provenance never reaches a consumer


async def test_protobuf_format(receiver: Receiver) -> None:
    env = sample()
    async with outbound(url=receiver.base) as ob:
        await ob.send(env, "ok", "protobuf")
    (got,) = receiver.requests
    assert got.headers["Content-Type"] == formats.PROTOBUF_CONTENT_TYPE
    back = Envelope.FromString(got.body)
    assert not back.HasField("provenance")
    assert back.id == env.id
    assert data_bytes(back) == data_bytes(env)


async def test_base_url_joins_the_address_and_absolute_addresses_win(receiver: Receiver) -> None:
    async with outbound(url=receiver.base + "/hooks/") as ob:
        await ob.send(sample(), "orders", "binary")
        await ob.send(sample(), receiver.base + "/ok", "binary")
    assert [r.path for r in receiver.requests] == ["/hooks/orders", "/ok"]


async def test_relative_address_without_url_is_terminal() -> None:
    async with outbound() as ob:
        with pytest.raises(TerminalDeliveryError, match="no url"):
            await ob.send(sample(), "orders", "binary")


async def test_unknown_format_is_terminal(receiver: Receiver) -> None:
    async with outbound(url=receiver.base) as ob:
        with pytest.raises(TerminalDeliveryError, match="unknown format"):
            await ob.send(sample(), "ok", "avro")
    assert receiver.requests == []


async def test_header_injection_is_terminal(receiver: Receiver) -> None:
    env = new_event(type="t", source="/s", data=b"{}", content_type="application/json\r\nX-Evil: 1")
    async with outbound(url=receiver.base) as ob:
        with pytest.raises(TerminalDeliveryError, match="unsendable"):
            await ob.send(env, "ok", "binary")
    assert receiver.requests == []


async def test_500_is_retryable(receiver: Receiver) -> None:
    async with outbound(url=receiver.base) as ob:
        with pytest.raises(RetryableDeliveryError, match="HTTP 500") as info:
            await ob.send(sample(), "fail", "binary")
    assert "database on fire second line" in str(info.value)
    assert info.value.retry_after_s is None


async def test_429_is_retryable_with_retry_after(receiver: Receiver) -> None:
    async with outbound(url=receiver.base) as ob:
        with pytest.raises(RetryableDeliveryError, match="HTTP 429") as info:
            await ob.send(sample(), "busy", "binary")
    assert info.value.retry_after_s == 7.0


async def test_503_with_http_date_retry_after(receiver: Receiver) -> None:
    async with outbound(url=receiver.base) as ob:
        with pytest.raises(RetryableDeliveryError, match="HTTP 503") as info:
            await ob.send(sample(), "busy-until", "binary")
    assert info.value.retry_after_s is not None
    assert 55.0 <= info.value.retry_after_s <= 61.0


@pytest.mark.parametrize(("path", "status"), [("missing", 404), ("gone", 410), ("moved", 302)])
async def test_other_4xx_and_3xx_are_terminal(receiver: Receiver, path: str, status: int) -> None:
    async with outbound(url=receiver.base) as ob:
        with pytest.raises(TerminalDeliveryError, match=f"HTTP {status}"):
            await ob.send(sample(), path, "binary")
    if path == "moved":
        assert [r.path for r in receiver.requests] == ["/moved"]  # the redirect is not followed


async def test_connection_refused_is_retryable() -> None:
    async with outbound(url=f"http://127.0.0.1:{free_port()}") as ob:
        with pytest.raises(RetryableDeliveryError, match=r"127\.0\.0\.1"):
            await ob.send(sample(), "ok", "binary")


async def test_timeout_is_retryable(receiver: Receiver) -> None:
    async with outbound(url=receiver.base, send_timeout_s=0.3) as ob:
        with pytest.raises(RetryableDeliveryError, match="no response within"):
            await ob.send(sample(), "slow", "binary")
    assert [r.path for r in receiver.requests] == ["/slow"]


async def test_many_sends_in_flight(receiver: Receiver) -> None:
    async with outbound(url=receiver.base, max_in_flight=16) as ob:
        events = [new_event(type="t", source="/s", data=str(i).encode()) for i in range(100)]
        await asyncio.gather(*(ob.send(e, "ok", "binary") for e in events))
    assert sorted(int(r.body) for r in receiver.requests) == list(range(100))


async def test_built_outbound_service_owns_the_session(receiver: Receiver) -> None:
    health = Health()
    cfg = HttpOutboundConfig(kind="http", url=receiver.base)
    built = build(AdapterConfig(outbounds={"hooks": cfg}), Runtime(sink=ListSink(), health=health))
    ob = built.outbounds["hooks"]
    (service,) = built.services
    assert service.name == "outbound:hooks"
    assert health.snapshot()["outbound:hooks"]["ready"] is False
    task = asyncio.create_task(service.run(), name=service.name)
    try:
        await ob.send(sample(), "ok", "binary")
        assert health.snapshot()["outbound:hooks"]["ready"] is True
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert health.snapshot()["outbound:hooks"] == {"ready": False, "detail": "stopped"}
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("fmt", ["binary", "structured", "protobuf"])
async def test_webhook_into_our_own_listener_keeps_the_event(fmt: str) -> None:
    """End to end over HTTP: outbound in each format, received by a CloudEvents inbound."""
    env = sample()
    env.attributes["comexampleflag"].ce_string = "on"
    ce = {"path": "/events", "mode": "cloudevents"}
    async with serve({"ce": ce}) as running, outbound(url=running.base) as ob:
        await ob.send(env, "/events", fmt)
        (got,) = running.sink.events
    assert context_attributes(got) == context_attributes(env)
    if fmt == "structured":  # JSON data travels as JSON, so only its value is kept, not its spacing
        assert json.loads(data_bytes(got)) == json.loads(data_bytes(env))
    else:
        assert data_bytes(got) == data_bytes(env)
    assert got.provenance.inbound == "ce"
    assert got.provenance.principal == ""
