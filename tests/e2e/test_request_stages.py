"""Requests pass the same ingress stages as publishes: the ingress transform, the rate limit and the media
check of an HTTP inbound in request mode, over the real daemon and an aio-pika responder. A refused request
is never published (the responder counts what reached it)."""

from __future__ import annotations

import json
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from tests.e2e.test_request_reply import metric
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL
from tests.support.responders import echo, responder

pytestmark = pytest.mark.timeout(90)

RATE_LIMIT = """
[[rate_limits]]
name = "rpc-echo"
per = "inbound"
rate = 0.01
burst = 2
inbounds = ["rpc-echo"]
"""


@pytest.fixture
def quickstart(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> Quickstart:
    transform = {"jsonata": '$merge([$, {"via": "gateway"}])'}
    return Quickstart(tmp_path, extra_toml=RATE_LIMIT, overrides={"inbound.rpc-echo": {"transform": transform}})


async def test_transform_rate_limit_and_media_check_apply_to_requests(
    daemon: DaemonProcess, quickstart: Quickstart
) -> None:
    reached: list[bytes] = []

    async def counting_echo(channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
        reached.append(msg.body)
        await echo(channel, msg)

    url = f"http://127.0.0.1:{quickstart.http_port}/rpc/echo"
    async with await aio_pika.connect_robust(RABBIT_URL) as conn, aiohttp.ClientSession() as http:
        await responder(conn, quickstart.rpc_queue, counting_echo)
        async with http.post(url, data=b"hello", headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 415  # refused before the rate limit counts it
        answers = []
        for i in range(3):
            async with http.post(url, json={"n": i}) as resp:
                answers.append((resp.status, await resp.read()))
    assert [json.loads(a[1]) for a in answers[:2]] == [{"n": 0, "via": "gateway"}, {"n": 1, "via": "gateway"}]
    assert answers[2][0] == 429, answers[2]
    assert len(reached) == 2  # neither the 415 nor the 429 was published
    assert await metric(quickstart, "mediator_requests_total", 'outcome="refused"') == 1
    assert await metric(quickstart, "mediator_requests_total", 'outcome="replied"') == 2
