"""The webhook outbound's CloudEvents abuse-protection handshake over loopback: against the gateway's own
CloudEvents inbound (the handshake both ways in one process), and against an aiohttp receiver that counts
the validation requests, fails one, and limits the rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from adapters.http import HttpOutbound, HttpOutboundConfig
from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from tests.adapters.test_http_support import serve
from tests.support.net import free_port

pytestmark = pytest.mark.timeout(60)


def outbound(url: str, **cfg: object) -> HttpOutbound:
    config = HttpOutboundConfig.model_validate(
        {"kind": "http", "url": url, "handshake": True, "handshake_origin": "mediator.test", **cfg}
    )
    return HttpOutbound("hooks", config, handshake_origin="mediator.test")


def event(n: int) -> Envelope:
    return new_event(type="com.example.t", source="/t", data=b'{"n": %d}' % n, content_type="application/json")


async def test_handshake_with_the_gateways_own_cloudevents_inbound() -> None:
    sections = {
        "ce": {"path": "/ce", "mode": "cloudevents", "handshake": {"allowed_origins": ["mediator.test"]}},
        "ce-closed": {"path": "/closed", "mode": "cloudevents", "handshake": {"allowed_origins": ["other.test"]}},
    }
    async with serve(sections) as running:
        out = outbound(running.base)
        try:
            await asyncio.gather(
                *(out.send(new_event(type="t", source="/s", data=b"%d" % i), "/ce", "") for i in range(20))
            )
            assert len(running.sink.events) == 20
            with pytest.raises(TerminalDeliveryError, match="refused the CloudEvents webhook handshake"):
                await out.send(new_event(type="t", source="/s", data=b"x"), "/closed", "")
            assert len(running.sink.events) == 20, "nothing was POSTed to the refusing inbound"
        finally:
            await out.close()


@dataclass
class Counting:
    base: str = ""
    options: list[float] = field(default_factory=list)
    posts: list[float] = field(default_factory=list)
    fail_first: bool = True


@pytest.fixture
async def counting() -> AsyncIterator[Counting]:
    state = Counting()

    async def handle(request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            state.options.append(time.monotonic())
            await asyncio.sleep(0.05)  # long enough for every concurrent send to find the handshake under way
            if state.fail_first and len(state.options) == 1:
                return web.Response(status=503)
            origin = request.headers["WebHook-Request-Origin"]
            return web.Response(headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "600"})
        await request.read()
        state.posts.append(time.monotonic())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state.base = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_one_handshake_per_target_a_failed_one_retried_and_the_allowed_rate_kept(counting: Counting) -> None:
    out = outbound(counting.base, send_timeout_s=1.0)
    try:
        first = await asyncio.gather(*(out.send(event(i), "/a", "") for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, RetryableDeliveryError) and "HTTP 503" in str(r) for r in first), first
        assert len(counting.options) == 1, "one validation request for the five waiting sends"
        assert counting.posts == []

        # Asked again (a 503 is not remembered); 600/min = one delivery per 0.1 s. Of ten at once, those
        # whose slot is more than half the 1 s budget away are retried later instead of waiting.
        results = await asyncio.gather(*(out.send(event(i), "/a", "") for i in range(10)), return_exceptions=True)
        assert len(counting.options) == 2
        sent = [r for r in results if r is None]
        paced = [r for r in results if isinstance(r, RetryableDeliveryError) and "paced" in str(r)]
        assert len(sent) + len(paced) == 10, results
        assert 1 <= len(sent) <= 6, results  # 5 when the handshake is quick: slots 0, 0.1, .. 0.4 s
        assert len(paced) >= 4, results
        gaps = [b - a for a, b in zip(counting.posts, counting.posts[1:], strict=False)]
        assert all(g >= 0.09 for g in gaps), gaps
        await out.send(event(99), "/b", "")  # another URL is another target: asked on its own
        assert len(counting.options) == 3
    finally:
        await out.close()
