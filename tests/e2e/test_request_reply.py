"""Request-reply across protocols, end to end: the daemon on the shipped config.toml (POST /rpc/echo to the
AMQP queue rpc.echo, POST /rpc/price to the MQTT 5 topic rpc/price, MQTT 5 requests on rpc/echo, the gRPC
Request RPC), real responders (aio-pika, aiomqtt/paho, mosquitto_rr, curl) on the real brokers.

Timeouts are 3 s here (the shipped 5 s would only make the tests slower)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, unique
from tests.support.responders import echo, reply, responder

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 3.0


@pytest.fixture
def quickstart(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> Quickstart:
    timeout: dict[str, object] = {"request_timeout_s": TIMEOUT_S}
    return Quickstart(
        tmp_path, overrides={"inbound.rpc-echo": timeout, "inbound.rpc-price": timeout, "inbound.rpc-mqtt": timeout}
    )


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(RABBIT_URL)
    async with conn:
        yield conn


async def post(session: aiohttp.ClientSession, qs: Quickstart, path: str, body: bytes) -> tuple[int, str, bytes]:
    url = f"http://127.0.0.1:{qs.http_port}{path}"
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def metric(qs: Quickstart, name: str, labels: str = "") -> float:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{qs.http_port}/metrics") as resp,
    ):
        text = await resp.text()
    series = f"{name}{{{labels}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{series} not in /metrics"
    return float(match.group(1))


async def until_metric(qs: Quickstart, name: str, labels: str, want: float, timeout_s: float = 10.0) -> None:
    seen = None
    try:
        async with asyncio.timeout(timeout_s):
            while (seen := await metric(qs, name, labels)) != want:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{name}{{{labels}}} stayed {seen}, expected {want}") from None


async def test_aio_pika_responder_answers_http_and_curl(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    seen: list[AbstractIncomingMessage] = []

    async def handler(channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
        seen.append(msg)
        await echo(channel, msg)

    await responder(amqp, quickstart.rpc_queue, handler)
    async with aiohttp.ClientSession() as session:
        status, ctype, body = await post(session, quickstart, "/rpc/echo", b'{"hello": "world"}')
    assert (status, ctype, body) == (200, "application/json", b'{"hello": "world"}')
    request = seen[0]
    assert request.reply_to is not None
    assert request.reply_to.startswith("amq.rabbitmq.reply-to.")
    assert request.correlation_id
    assert len(request.correlation_id) == 32
    assert request.expiration == TIMEOUT_S  # aio-pika reads the expiration back in seconds
    assert request.headers["cloudEvents_type"] == "com.example.rpc.echo"

    # The README's curl, as written (port aside).
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed"
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-s",
        "-X",
        "POST",
        f"http://127.0.0.1:{quickstart.http_port}/rpc/echo",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"n": 42}',
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    assert out == b'{"n": 42}'
    assert await metric(quickstart, "mediator_requests_total", 'outcome="replied"') == 2
    assert await metric(quickstart, "mediator_requests_waiting") == 0


async def test_error_reply_is_502_with_the_consumers_text(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def handler(channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
        await reply(channel, msg, "no such sku: Ä-1".encode(), headers={"mediator-error": "true"})

    await responder(amqp, quickstart.rpc_queue, handler)
    async with aiohttp.ClientSession() as session:
        status, ctype, body = await post(session, quickstart, "/rpc/echo", b"{}")
    assert status == 502
    assert ctype == "application/problem+json"
    problem = json.loads(body)
    assert problem["detail"] == "no such sku: Ä-1"
    assert problem["type"] == "urn:mediator:problem:consumer-error"
    assert await metric(quickstart, "mediator_requests_total", 'outcome="error_reply"') == 1


async def test_timeout_is_504_leaves_no_waiter_and_the_request_expires(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    channel = await amqp.channel()
    async with aiohttp.ClientSession() as session:
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = asyncio.create_task(post(session, quickstart, "/rpc/echo", b'{"slow": true}'))
        await until_metric(quickstart, "mediator_requests_waiting", "", 1)  # the gauge sees the waiter
        status, ctype, body = await pending
        took = loop.time() - started
    assert status == 504, body
    assert ctype == "application/problem+json"
    assert json.loads(body)["type"] == "urn:mediator:problem:reply-timeout"
    assert TIMEOUT_S - 0.1 <= took < TIMEOUT_S + 2.0
    assert await metric(quickstart, "mediator_requests_waiting") == 0
    assert await metric(quickstart, "mediator_requests_total", 'outcome="timeout"') == 1
    # Nobody took it in time: the broker expires it (expiration = the timeout), so nobody acts on it later.
    count = None
    try:
        async with asyncio.timeout(10):
            while True:
                queue = await channel.declare_queue(quickstart.rpc_queue, durable=True, passive=True)
                count = queue.declaration_result.message_count
                if count == 0:
                    break
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"the expired request is still queued ({count} messages)") from None


async def test_late_reply_is_dropped_and_overlapping_requests_get_their_own(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    held: asyncio.Queue[tuple[AbstractChannel, AbstractIncomingMessage]] = asyncio.Queue()

    async def hold(channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
        await held.put((channel, msg))

    await responder(amqp, quickstart.rpc_queue, hold)
    async with aiohttp.ClientSession() as session:
        # A times out while its request is held; B is then waiting when A's reply arrives, late.
        a = await post(session, quickstart, "/rpc/echo", b'{"who": "A"}')
        assert a[0] == 504
        channel_a, msg_a = await asyncio.wait_for(held.get(), 5)
        b_task = asyncio.create_task(post(session, quickstart, "/rpc/echo", b'{"who": "B"}'))
        channel_b, msg_b = await asyncio.wait_for(held.get(), 5)
        await reply(channel_a, msg_a, b'{"answer": "A"}')
        await until_metric(quickstart, "mediator_replies_dropped_total", 'reason="late"', 1)
        await reply(channel_b, msg_b, b'{"answer": "B"}')
        assert await b_task == (200, "application/octet-stream", b'{"answer": "B"}')

        # C and D overlap; the responder answers D first: each caller gets its own answer.
        c_task = asyncio.create_task(post(session, quickstart, "/rpc/echo", b'{"who": "C"}'))
        d_task = asyncio.create_task(post(session, quickstart, "/rpc/echo", b'{"who": "D"}'))
        first = await asyncio.wait_for(held.get(), 5)
        second = await asyncio.wait_for(held.get(), 5)
        by_who = {json.loads(m.body)["who"]: (ch, m) for ch, m in (first, second)}
        for who in ("D", "C"):
            ch, m = by_who[who]
            await reply(ch, m, json.dumps({"answer": who}).encode(), content_type="application/json")
        c, d = await c_task, await d_task
    assert c == (200, "application/json", b'{"answer": "C"}')
    assert d == (200, "application/json", b'{"answer": "D"}')
    assert await metric(quickstart, "mediator_replies_dropped_total", 'reason="late"') == 1
    assert await metric(quickstart, "mediator_requests_waiting") == 0


async def test_duplicate_reply_answers_once(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def twice(channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
        await reply(channel, msg, b"first", content_type="text/plain")
        await reply(channel, msg, b"second", content_type="text/plain")

    await responder(amqp, quickstart.rpc_queue, twice)
    async with aiohttp.ClientSession() as session:
        assert await post(session, quickstart, "/rpc/echo", b"{}") == (200, "text/plain", b"first")
    await until_metric(quickstart, "mediator_replies_dropped_total", 'reason="duplicate"', 1)


async def test_200_concurrent_requests_matched(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    await responder(amqp, quickstart.rpc_queue, echo)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        bodies = [json.dumps({"seq": i, "pad": "x" * (i % 17)}).encode() for i in range(200)]
        results = await asyncio.gather(*(post(session, quickstart, "/rpc/echo", b) for b in bodies))
    wrong = [(i, r) for i, (b, r) in enumerate(zip(bodies, results, strict=True)) if r != (200, "application/json", b)]
    assert not wrong, f"{len(wrong)} of 200 mismatched, first: {wrong[:3]}"
    assert await metric(quickstart, "mediator_requests_total", 'outcome="replied"') == 200
    assert await metric(quickstart, "mediator_requests_waiting") == 0


async def test_grpc_request_and_deadline_exceeded(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    channel = await responder(amqp, quickstart.rpc_queue, echo)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{quickstart.grpc_port}") as ch:
        stub = service_pb2_grpc.MediatorStub(ch)
        env = envelope_pb2.Envelope(id=unique("rq"), source="/test", spec_version="1.0", type="com.example.rpc.echo")
        env.binary_data = b'{"via": "grpc"}'
        env.attributes["datacontenttype"].ce_string = "application/json"
        answer = await stub.Request(env, timeout=10)
        assert answer.id == env.id
        assert answer.type == "io.mediator.reply"
        assert answer.binary_data == b'{"via": "grpc"}'
        assert answer.attributes["datacontenttype"].ce_string == "application/json"

        await channel.close()  # no responder: the call's own deadline is honoured
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Request(env, timeout=1.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - started < 3.0
    await until_metric(quickstart, "mediator_requests_total", 'outcome="timeout"', 1)
    assert await metric(quickstart, "mediator_requests_waiting") == 0


async def test_mqtt5_responder_answers_http(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    seen: list[aiomqtt.Message] = []
    subscribed = asyncio.Event()

    async def serve() -> None:
        async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(quickstart.rpc_topic, qos=1)
            subscribed.set()
            async for msg in client.messages:
                seen.append(msg)
                assert msg.properties is not None
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = getattr(msg.properties, "CorrelationData", None)
                assert isinstance(msg.payload, bytes)
                request = json.loads(msg.payload)
                if request["sku"] == "none":
                    props.UserProperty = [("mediator-error", "true")]
                    body = b"out of stock"
                else:
                    props.ContentType = "application/json"
                    body = json.dumps({"sku": request["sku"], "price": 42}).encode()
                await client.publish(getattr(msg.properties, "ResponseTopic", ""), body, qos=1, properties=props)

    task = asyncio.create_task(serve())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        async with aiohttp.ClientSession() as session:
            ok = await post(session, quickstart, "/rpc/price", b'{"sku": "A-1"}')
            refused = await post(session, quickstart, "/rpc/price", b'{"sku": "none"}')
    finally:
        task.cancel()
    assert ok == (200, "application/json", b'{"sku": "A-1", "price": 42}')
    assert refused[0] == 502
    assert json.loads(refused[2])["detail"] == "out of stock"
    props = seen[0].properties
    assert props is not None
    assert getattr(props, "ResponseTopic", None) == f"mediator/replies/mediator-{quickstart.uid}-mqtt-rpc"
    assert len(getattr(props, "CorrelationData", b"")) == 32
    assert getattr(props, "MessageExpiryInterval", None) == int(TIMEOUT_S)


async def test_mqtt5_timeout_is_504_and_leaves_no_waiter(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, quickstart, "/rpc/price", b'{"sku": "A-1"}')
    assert status == 504, body
    assert await metric(quickstart, "mediator_requests_waiting") == 0


async def test_mosquitto_rr_gets_the_aio_pika_responders_reply(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    rr = shutil.which("mosquitto_rr")
    assert rr is not None, "mosquitto_rr (Debian's mosquitto-clients) is needed"
    await responder(amqp, quickstart.rpc_queue, echo)
    await until_ready(quickstart)
    proc = await asyncio.create_subprocess_exec(
        *(rr, "-h", "127.0.0.1", "-p", "1883", "-V", "5", "-q", "1", "-W", "10"),
        *("-t", quickstart.rpc_request_topic, "-e", f"{quickstart.uid}/my/replies", "-m", '{"hello": "mqtt"}'),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert out.strip() == b'{"hello": "mqtt"}'


async def until_ready(qs: Quickstart, timeout_s: float = 15.0) -> None:
    """/readyz 200: every inbound is subscribed (the MQTT request inbound included)."""
    async with aiohttp.ClientSession() as s, asyncio.timeout(timeout_s):
        while True:
            async with s.get(f"http://127.0.0.1:{qs.http_port}/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.1)
