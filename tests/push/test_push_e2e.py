"""Push over SSE and WebSocket, end to end: the real daemon on the shipped config (plus a WebSocket inbound,
a slow and a tiny push outbound, and a listener with authentication), real clients over real sockets, the
shared RabbitMQ and Mosquitto."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
import pytest_asyncio

from mediator.observability.status import render
from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue
from tests.push.clients import StalledSubscriber, drain_queue, metric, open_sse
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

ORDER = "com.example.order.created"
KEY_DASH = "mk_dashboard-" + "d" * 30
KEY_OTHER = "mk_other-" + "o" * 30
ALLOWED_ORIGIN = "https://app.example"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def extra_toml(secure_port: int) -> str:
    return f"""
[inbound.ws]
kind = "websocket"
listener = "http"
path = "/ws"
max_frame_bytes = 4096

[outbound.slowpush]
kind = "push"
listener = "http"
prefix = "/slow"
subscriber_buffer = 100
send_buffer_bytes = 4096

[outbound.tiny]
kind = "push"
listener = "http"
prefix = "/tiny"
max_events = 10
heartbeat_s = 0.5

[listeners.secure]
kind = "http"
host = "0.0.0.0"
port = {secure_port}
auth = ["keys"]
admin = false
query_token = "access_token"
max_subscribers = 3
cors = {{ allow_origins = ["{ALLOWED_ORIGIN}"], allow_methods = ["GET"] }}

[auth.keys]
kind = "api_key"
keys_file = "api-keys.toml"

[outbound.guarded]
kind = "push"
listener = "secure"

[[outbound.guarded.subscribe]]
name = "dashboards"
roles = ["dashboard"]
addresses = ["orders.#"]

[[routes]]
name = "push-telemetry"
match = {{ inbound = ["devices"] }}
to = [{{ outbound = "browsers", address = "telemetry" }}]

[[routes]]
name = "push-commands"
match = {{ inbound = ["commands"] }}
to = [{{ outbound = "browsers", address = "commands" }}]

[[routes]]
name = "slow"
match = {{ type = ["com.example.slow"] }}
to = [{{ outbound = "slowpush", address = "slow" }}, {{ outbound = "orders-exchange", address = "slow.flow" }}]

[[routes]]
name = "tiny"
match = {{ type = ["com.example.tiny"] }}
to = [{{ outbound = "tiny", address = "tiny" }}]

[[routes]]
name = "guarded"
match = {{ type = ["{ORDER}"] }}
to = [{{ outbound = "guarded", address = "orders.eu" }}]
"""


@dataclass
class Push:
    daemon: DaemonProcess
    qs: Quickstart
    base: str
    secure: str
    ws_base: str
    http: aiohttp.ClientSession
    channel: aio_pika.abc.AbstractChannel

    async def post_event(self, type_: str, data: object, event_id: str | None = None) -> str:
        event_id = event_id or f"ev-{uuid.uuid4()}"
        body = {"specversion": "1.0", "id": event_id, "source": "/push-test", "type": type_, "data": data}
        async with self.http.post(
            f"{self.base}/events", data=json.dumps(body), headers={"Content-Type": "application/cloudevents+json"}
        ) as resp:
            assert resp.status == 202, await resp.text()
        return event_id

    async def post_order(self, data: object) -> str:
        async with self.http.post(f"{self.base}/orders", json=data) as resp:
            assert resp.status == 202, await resp.text()
            event_id: str = (await resp.json())["id"]
            return event_id


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def push(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[Push]:
    tmp = tmp_path_factory.mktemp("push")
    secure_port = free_port()
    (tmp / "api-keys.toml").write_text(
        f'[[keys]]\nprincipal = "dash"\nsha256 = "{sha(KEY_DASH)}"\nroles = ["dashboard"]\n\n'
        f'[[keys]]\nprincipal = "other"\nsha256 = "{sha(KEY_OTHER)}"\nroles = ["publisher"]\n'
    )
    qs = Quickstart(tmp, extra_toml=extra_toml(secure_port))
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
    await daemon.start()
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        async with conn, aiohttp.ClientSession() as http:
            yield Push(
                daemon,
                qs,
                f"http://127.0.0.1:{qs.http_port}",
                f"http://127.0.0.1:{secure_port}",
                f"ws://127.0.0.1:{qs.http_port}",
                http,
                await conn.channel(),
            )
    finally:
        code = await daemon.stop(signal.SIGTERM)
        assert code == 0, daemon.logs()


async def ws_take(ws: aiohttp.ClientWebSocketResponse, count: int, timeout_s: float = 20.0) -> list[aiohttp.WSMessage]:
    got: list[aiohttp.WSMessage] = []
    async with asyncio.timeout(timeout_s):
        while len(got) < count:
            msg = await ws.receive()
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), (msg.type, msg.data, msg.extra)
            got.append(msg)
    return got


# ---------------------------------------------------------------- every protocol in, SSE and WebSocket out


async def test_sse_and_websocket_receive_events_from_http_mqtt_amqp_and_grpc(push: Push) -> None:
    sse = await open_sse(push.http, f"{push.base}/subscribe/%23")  # "#": every address
    assert sse.retry == 3000
    ws = await push.http.ws_connect(f"{push.ws_base}/subscribe/%23", protocols=["cloudevents.json"])
    assert ws.protocol == "cloudevents.json"
    proto_ws = await push.http.ws_connect(f"{push.ws_base}/subscribe/orders", protocols=["cloudevents.proto"])
    assert proto_ws.protocol == "cloudevents.proto"
    await asyncio.sleep(0)  # nothing to wait for: the upgrade registered the subscriptions before answering

    http_id = await push.post_order({"order": 1})
    qs = push.qs
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.publish(f"{qs.topic_prefix}devices/dev5/telemetry", b'{"t": 21.5}', qos=1)
    exchange = await push.channel.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    await exchange.publish(
        aio_pika.Message(b"reboot", content_type="text/plain", message_id=f"cmd-{uuid.uuid4()}"), routing_key="dev5"
    )
    env = envelope_pb2.Envelope(id=f"grpc-{uuid.uuid4()}", source="/grpc-test", spec_version="1.0", type=ORDER)
    env.attributes["datacontenttype"].ce_string = "application/json"
    env.binary_data = b'{"order": 2}'
    async with grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as channel:
        await service_pb2_grpc.MediatorStub(channel).Publish(env)

    def summary(docs: list[dict[str, object]]) -> set[tuple[object, str]]:
        out = set()
        for d in docs:
            data = d.get("data", d.get("data_base64"))
            out.add((d["type"], data if isinstance(data, str) else json.dumps(data)))
        return out

    want = {
        (ORDER, json.dumps({"order": 1})),
        ("com.example.device.telemetry", json.dumps({"t": 21.5})),
        ("com.example.device.command", "reboot"),
        (ORDER, json.dumps({"order": 2})),
    }
    sse_msgs = await sse.take(4)
    sse_docs = [m.json() for m in sse_msgs]
    assert summary(sse_docs) == want, sse_docs
    assert [m.event for m in sse_msgs] == [d["type"] for d in sse_docs]
    cursors = [int(m.id or 0) for m in sse_msgs]
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == 4
    assert {d["id"] for d in sse_docs} >= {http_id, env.id}

    ws_docs = [json.loads(m.data) for m in await ws_take(ws, 4)]
    assert [d["id"] for d in ws_docs] == [d["id"] for d in sse_docs]  # one ring, one order
    assert [int(d["mediatorcursor"]) for d in ws_docs] == cursors

    frames = await ws_take(proto_ws, 2)  # only the address "orders": the HTTP and the gRPC orders
    events = []
    for frame in frames:
        assert frame.type == aiohttp.WSMsgType.BINARY
        event = envelope_pb2.Envelope()
        event.ParseFromString(frame.data)
        events.append(event)
    assert [e.id for e in events] == [http_id, env.id]
    assert events[1].binary_data == b'{"order": 2}'
    assert not any(e.HasField("provenance") for e in events)
    for client in (ws, proto_ws):
        await client.close()
    sse.response.close()


# ---------------------------------------------------------------- resume


async def test_sse_disconnected_during_100_events_resumes_with_exactly_them(push: Push) -> None:
    sse = await open_sse(push.http, f"{push.base}/subscribe/orders")
    await push.post_order({"seq": -1})
    first = (await sse.take(1))[0]
    sse.response.close()  # the client goes away; 100 events are published meanwhile
    ids = [await push.post_order({"seq": i}) for i in range(100)]
    resumed = await open_sse(push.http, f"{push.base}/subscribe/orders", headers={"Last-Event-ID": str(first.id)})
    msgs = await resumed.take(100)
    assert [m.json()["id"] for m in msgs] == ids
    assert [m.json()["data"]["seq"] for m in msgs] == list(range(100))
    # ... then live, without a gap or a duplicate at the seam.
    live_id = await push.post_order({"seq": 100})
    nxt = await resumed.next()
    assert nxt is not None
    assert nxt.json()["id"] == live_id
    assert int(nxt.id or 0) > int(msgs[-1].id or 0)
    resumed.response.close()

    # The same with the query parameter EventSource-less clients use.
    again = await open_sse(push.http, f"{push.base}/subscribe/orders", lastEventId=str(msgs[49].id))
    tail = await again.take(51)
    assert [m.json()["id"] for m in tail] == [*ids[50:], live_id]
    again.response.close()


async def test_websocket_resumes_with_after(push: Push) -> None:
    ws = await push.http.ws_connect(f"{push.ws_base}/subscribe/orders", protocols=["cloudevents.json"])
    await push.post_order({"seq": "first"})
    first = json.loads((await ws_take(ws, 1))[0].data)
    await ws.close()
    ids = [await push.post_order({"seq": i}) for i in range(100)]
    ws = await push.http.ws_connect(
        f"{push.ws_base}/subscribe/orders?after={first['mediatorcursor']}", protocols=["cloudevents.json"]
    )
    docs = [json.loads(m.data) for m in await ws_take(ws, 100)]
    assert [d["id"] for d in docs] == ids
    await ws.close()


async def test_a_cursor_older_than_the_ring_gets_the_oldest_retained_and_a_gap_notice(push: Push) -> None:
    before = await metric(push.http, push.base, "mediator_push_resume_gaps_total", outbound="tiny")
    ids = [await push.post_event("com.example.tiny", {"n": i}) for i in range(30)]
    # The ring keeps 10: wait until all 30 were committed to it (this test is the only one that uses it).
    async with asyncio.timeout(20):
        while await metric(push.http, push.base, "mediator_deliveries_sent_total", outbound="tiny") < 30:
            await asyncio.sleep(0.05)
    live = await open_sse(push.http, f"{push.base}/tiny/tiny", lastEventId="0")
    comment = await live.until_comment("gap")
    assert "missed" in comment
    got: list[str] = []
    async with asyncio.timeout(20):
        while not got or got[-1] != ids[-1]:
            msg = await live.next()
            assert msg is not None
            got.append(msg.json()["id"])
    msgs = got
    # The oldest retained first (a suffix of what was published), in order, none repeated.
    assert msgs == ids[-10:]
    assert await metric(push.http, push.base, "mediator_push_resume_gaps_total", outbound="tiny") == before + 1
    live.response.close()


# ---------------------------------------------------------------- the wire


async def _raw_sse(port: int, path: str, version: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """An SSE request on a raw socket; returns the reader, the writer and the response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def test_sse_is_chunked_for_http_1_1_and_plain_for_http_1_0_also_when_events_are_coalesced(push: Push) -> None:
    """Live events reach a caught-up stream straight from the fan-out, several per write when they come
    together: on HTTP/1.1 each write is one well-formed chunk holding whole SSE messages; on HTTP/1.0 the
    body is the event stream itself, ended by the connection's close."""
    port = push.qs.http_port
    r11, w11, head11 = await _raw_sse(port, "/subscribe/orders", "1.1")
    r10, w10, head10 = await _raw_sse(port, "/subscribe/orders", "1.0")
    try:
        assert head11.startswith(b"HTTP/1.1 200"), head11
        assert b"transfer-encoding: chunked" in head11.lower(), head11
        assert head10.startswith(b"HTTP/1.0 200") or head10.startswith(b"HTTP/1.1 200"), head10
        assert b"transfer-encoding" not in head10.lower(), head10
        assert b"content-length" not in head10.lower(), head10
        chunks: list[bytes] = []
        plain = b""
        async with asyncio.timeout(10):
            while b": subscribed" not in b"".join(chunks):  # the head: the stream is registered
                size = int((await r11.readuntil(b"\r\n")).strip(), 16)
                chunks.append(await r11.readexactly(size))
                assert await r11.readexactly(2) == b"\r\n"
            while b": subscribed" not in plain:
                plain += await r10.read(65536)
        ids = await asyncio.gather(*(push.post_order({"wire": i}) for i in range(30)))  # arrive together

        def ids_in(body: bytes) -> list[str]:
            return [json.loads(line[6:])["id"] for line in body.split(b"\n") if line.startswith(b"data: ")]

        live: list[bytes] = []
        async with asyncio.timeout(20):
            while len(ids_in(b"".join(live))) < 30:
                size = int((await r11.readuntil(b"\r\n")).strip(), 16)
                assert size > 0, "the stream ended"
                live.append(await r11.readexactly(size))
                assert await r11.readexactly(2) == b"\r\n", "a chunk longer than its size line says"
            while len(ids_in(plain)) < 30:
                more = await r10.read(65536)
                assert more, "the HTTP/1.0 stream ended"
                plain += more
        assert sorted(ids_in(b"".join(live))) == sorted(ids)  # every one, once
        cursors = [int(line[4:]) for line in b"".join(live).split(b"\n") if line.startswith(b"id: ")]
        assert cursors == sorted(cursors)
        assert len(set(cursors)) == 30
        for chunk in live:  # a chunk is whole messages: it never splits one
            assert chunk.startswith(b"id: "), chunk[:80]
            assert chunk.endswith(b"\n\n"), chunk[-80:]
        assert ids_in(plain[plain.index(b": subscribed") :]) == ids_in(b"".join(live))  # the same stream
    finally:
        for w in (w11, w10):
            w.close()


# ---------------------------------------------------------------- slow subscribers


async def test_a_subscriber_that_never_reads_is_cut_off_while_the_rest_keep_flowing(push: Push) -> None:
    queue = await bound_queue(push.channel, push.qs.orders_exchange, "slow.flow")
    reader = await open_sse(push.http, f"{push.base}/slow/slow")
    stalled = StalledSubscriber(push.qs.http_port, "/slow/slow")
    stalled.open()
    try:
        async with asyncio.timeout(10):
            while (
                await metric(push.http, push.base, "mediator_push_subscribers", outbound="slowpush", address="slow") < 2
            ):
                await asyncio.sleep(0.05)
        count = 600
        payload = "x" * 2000
        reading = asyncio.create_task(reader.take(count, timeout_s=60))  # reads as the events arrive
        ids = [await push.post_event("com.example.slow", {"n": i, "pad": payload}) for i in range(count)]
        got = [m.json()["id"] for m in await reading]
        assert got == ids  # the reading subscriber got every event, in order
        assert sorted(await drain_queue(queue, count)) == sorted(ids)  # the route's other destination too
        async with asyncio.timeout(10):
            while (
                await metric(
                    push.http, push.base, "mediator_push_disconnects_total", outbound="slowpush", reason="slow_consumer"
                )
                < 1
            ):
                await asyncio.sleep(0.05)
        seen, ended = stalled.drain()
        assert ended
        assert b"disconnected: slow_consumer" in seen, seen[-300:]
    finally:
        stalled.close()
        reader.response.close()
    assert await metric(push.http, push.base, "mediator_push_subscribers", outbound="slowpush", address="slow") <= 1


async def test_a_websocket_subscriber_that_never_reads_is_closed_with_1008(push: Push) -> None:
    before = await metric(
        push.http, push.base, "mediator_push_disconnects_total", outbound="slowpush", reason="slow_consumer"
    )
    reader = await push.http.ws_connect(f"{push.ws_base}/slow/slow", protocols=["cloudevents.json"])
    stalled = StalledSubscriber(push.qs.http_port, "/slow/slow", websocket=True)
    stalled.open()
    try:
        async with asyncio.timeout(10):
            while (
                await metric(push.http, push.base, "mediator_push_subscribers", outbound="slowpush", address="slow") < 2
            ):
                await asyncio.sleep(0.05)
        count = 400
        reading = asyncio.create_task(ws_take(reader, count, timeout_s=60))
        ids = [await push.post_event("com.example.slow", {"n": i, "pad": "y" * 2000}) for i in range(count)]
        assert [json.loads(m.data)["id"] for m in await reading] == ids
        async with asyncio.timeout(10):
            while (
                await metric(
                    push.http, push.base, "mediator_push_disconnects_total", outbound="slowpush", reason="slow_consumer"
                )
                < before + 1
            ):
                await asyncio.sleep(0.05)
        seen, ended = stalled.drain()
        assert seen.startswith(b"HTTP/1.1 101"), seen[:200]
        assert ended  # the daemon closed it
        # The close frame (opcode 8, code 1008) is its last frame when the socket could still take it.
        if b"\x88" in seen[-64:]:
            assert b"\x03\xf0slow consumer" in seen[-64:], seen[-64:]
    finally:
        stalled.close()
        await reader.close()


async def test_a_websocket_subscriber_that_does_not_answer_pings_is_closed(push: Push) -> None:
    silent = StalledSubscriber(push.qs.http_port, "/tiny/quiet", websocket=True)  # never answers a ping
    silent.open()
    try:
        async with asyncio.timeout(10):
            while await metric(push.http, push.base, "mediator_push_subscribers", outbound="tiny", address="quiet") < 1:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):  # heartbeat_s = 0.5: a ping, no pong within half of it, closed
            while await metric(push.http, push.base, "mediator_push_subscribers", outbound="tiny", address="quiet") > 0:
                await asyncio.sleep(0.05)
        seen, ended = silent.drain()
        assert ended
        assert b"\x89\x00" in seen, seen[-100:]  # the daemon's ping frame (opcode 9, empty)
    finally:
        silent.close()


async def test_sse_heartbeat_comments_keep_an_idle_stream(push: Push) -> None:
    idle = await open_sse(push.http, f"{push.base}/tiny/nothing-here")
    await idle.until_comment("heartbeat", timeout_s=5)
    idle.response.close()


# ---------------------------------------------------------------- the WebSocket inbound


async def test_websocket_publish_reaches_an_amqp_consumer_with_matching_acks(push: Push) -> None:
    queue = await bound_queue(push.channel, push.qs.orders_exchange, "orders.created")
    ws = await push.http.ws_connect(f"{push.ws_base}/ws", protocols=["cloudevents.json"])
    assert ws.protocol == "cloudevents.json"
    ids = [f"ws-{uuid.uuid4()}" for _ in range(20)]
    for i, event_id in enumerate(ids):
        await ws.send_str(
            json.dumps({"specversion": "1.0", "id": event_id, "source": "/ws", "type": ORDER, "data": {"i": i}})
        )
    acks = [json.loads(m.data) for m in await ws_take(ws, 20)]
    assert sorted(a["ack"] for a in acks) == sorted(ids), acks
    assert sorted(await drain_queue(queue, 20)) == sorted(ids)

    # Protobuf frames on cloudevents.proto.
    proto = await push.http.ws_connect(f"{push.ws_base}/ws", protocols=["cloudevents.proto"])
    env = envelope_pb2.Envelope(id=f"wsp-{uuid.uuid4()}", source="/ws", spec_version="1.0", type=ORDER)
    env.binary_data = b'{"proto": true}'
    env.attributes["datacontenttype"].ce_string = "application/json"
    await proto.send_bytes(env.SerializeToString())
    ack = json.loads((await ws_take(proto, 1))[0].data)
    assert ack == {"ack": env.id}
    assert await drain_queue(queue, 1) == [env.id]
    await proto.close()
    await ws.close()


async def test_bad_frames_get_error_frames_or_close_codes_and_the_daemon_keeps_serving(push: Push) -> None:
    ws = await push.http.ws_connect(f"{push.ws_base}/ws", protocols=["cloudevents.json"])
    await ws.send_str("{not json")
    err = json.loads((await ws_take(ws, 1))[0].data)
    assert err["error"] == "invalid"
    assert "JSON" in err["reason"]
    assert err["id"] is None
    await ws.send_str(json.dumps({"specversion": "1.0", "id": "x1", "source": "/ws"}))  # no type
    err = json.loads((await ws_take(ws, 1))[0].data)
    assert err["error"] == "invalid", err
    assert "type" in err["reason"], err
    await ws.send_bytes(b"\x00\x01binary")  # a binary frame on the JSON subprotocol
    err = json.loads((await ws_take(ws, 1))[0].data)
    assert err["error"] == "unsupported_media", err
    assert "text frames" in err["reason"], err
    await ws.send_str("x" * 5000)  # over max_frame_bytes
    async with asyncio.timeout(10):
        msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE, (msg.type, msg.data, msg.extra)
    assert msg.data == 1009, (msg.type, msg.data, msg.extra)
    await ws.close()

    wrong = await push.http.ws_connect(f"{push.ws_base}/ws", protocols=["mqtt"])
    async with asyncio.timeout(10):
        msg = await wrong.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE, (msg.type, msg.data, msg.extra)
    assert msg.data == 1002, (msg.type, msg.data, msg.extra)
    await wrong.close()

    sub = await push.http.ws_connect(f"{push.ws_base}/subscribe/orders", protocols=["cloudevents.json"])
    await sub.send_str("hello")  # a subscription only delivers
    async with asyncio.timeout(10):
        msg = await sub.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE, (msg.type, msg.data, msg.extra)
    assert msg.data == 1003, (msg.type, msg.data, msg.extra)
    await sub.close()

    # Still serving: a good frame on a new socket is acknowledged.
    good = await push.http.ws_connect(f"{push.ws_base}/ws")  # no subprotocol offered: JSON
    event_id = f"ok-{uuid.uuid4()}"
    await good.send_str(
        json.dumps({"specversion": "1.0", "id": event_id, "source": "/ws", "type": "com.example.other"})
    )
    assert json.loads((await ws_take(good, 1))[0].data) == {"ack": event_id}
    await good.close()


# ---------------------------------------------------------------- security


async def test_subscriptions_on_a_listener_with_auth_are_authenticated_and_authorized(push: Push) -> None:
    url = f"{push.secure}/subscribe/orders.eu"
    async with push.http.get(url, headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 401, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/json")
        assert "WWW-Authenticate" in resp.headers
    async with push.http.get(url, headers={"Authorization": "Bearer mk_wrong-" + "w" * 30}) as resp:
        assert resp.status == 401
    async with push.http.get(url, headers={"X-API-Key": KEY_OTHER}) as resp:
        assert resp.status == 403
        assert "may not subscribe" in (await resp.json())["reason"]
    async with push.http.get(f"{push.secure}/subscribe/%23", headers={"X-API-Key": KEY_DASH}) as resp:
        assert resp.status == 403  # "#" reaches beyond orders.#

    # WebSocket: the refusal is a close with 1008 (browsers see no HTTP status of a failed upgrade).
    ws = await push.http.ws_connect(f"ws://{push.secure.removeprefix('http://')}/subscribe/orders.eu")
    async with asyncio.timeout(10):
        msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE, (msg.type, msg.data, msg.extra)
    assert msg.data == 1008, (msg.type, msg.data, msg.extra)
    await ws.close()

    # Allowed: by header, and by the query token this listener allows (on loopback, so over plain HTTP).
    sse = await open_sse(push.http, url, headers={"X-API-Key": KEY_DASH})
    order = await push.post_order({"secure": True})
    pushed = await sse.next()
    assert pushed is not None
    assert pushed.json()["id"] == order
    sse.response.close()
    via_query = await open_sse(push.http, url, access_token=KEY_DASH)
    via_query.response.close()
    logs = push.daemon.logs()
    assert KEY_DASH not in logs  # the token in the query string is never logged


async def test_a_listener_admits_max_subscribers_streams_across_its_outbounds(push: Push) -> None:
    """[listeners.secure] max_subscribers = 3: the fourth stream is refused 503 before it starts (a
    WebSocket sees it as the status of its handshake), whatever the per-outbound and per-principal limits
    allow; once one closes, a new one is admitted."""
    url = f"{push.secure}/subscribe/orders.eu"
    held = [await open_sse(push.http, url, headers={"X-API-Key": KEY_DASH}) for _ in range(3)]
    try:
        async with push.http.get(url, headers={"Accept": "text/event-stream", "X-API-Key": KEY_DASH}) as resp:
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"] == "1"
            assert "max_subscribers" in (await resp.json())["reason"]
        ws_url = f"ws://{push.secure.removeprefix('http://')}/subscribe/orders.eu"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await push.http.ws_connect(ws_url, headers={"X-API-Key": KEY_DASH})
        assert refused.value.status == 503
        order = await push.post_order({"held": 3})
        for stream in held:  # the admitted ones keep flowing
            pushed = await stream.next()
            assert pushed is not None
            assert pushed.json()["id"] == order
    finally:
        for stream in held:
            stream.response.close()
    async with asyncio.timeout(10):  # the listener notices the closed streams at their next read or write
        while True:
            async with push.http.get(url, headers={"Accept": "text/event-stream", "X-API-Key": KEY_DASH}) as resp:
                if resp.status == 200:
                    break
                assert resp.status == 503, await resp.text()
            await asyncio.sleep(0.05)


def own_address() -> str:
    """This machine's address on its outgoing interface (not loopback): what another host would connect to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: a UDP connect only picks the route
        address: str = probe.getsockname()[0]
    assert not address.startswith("127."), "this test needs an interface besides loopback"
    return address


async def test_a_query_token_is_refused_over_plain_http_off_loopback(push: Push) -> None:
    url = f"http://{own_address()}:{push.secure.rsplit(':', 1)[1]}/subscribe/orders.eu"
    async with push.http.get(url, params={"access_token": KEY_DASH}) as resp:
        assert resp.status == 400
        assert "needs TLS" in (await resp.json())["reason"]
    stream = await open_sse(push.http, url, headers={"X-API-Key": KEY_DASH})  # the header is fine
    stream.response.close()
    assert KEY_DASH not in push.daemon.logs()


async def test_origins_are_checked_and_allowed_ones_get_cors_headers(push: Push) -> None:
    url = f"{push.secure}/subscribe/orders.eu"
    headers = {"X-API-Key": KEY_DASH, "Accept": "text/event-stream"}
    async with push.http.get(url, headers={**headers, "Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
        assert "origin" in (await resp.json())["reason"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await push.http.ws_connect(
            f"ws://{push.secure.removeprefix('http://')}/subscribe/orders.eu",
            headers={"Origin": "https://evil.example", "X-API-Key": KEY_DASH},
        )
    assert refused.value.status == 403
    # The plain listener has no CORS at all: a page from elsewhere is refused there too.
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await push.http.ws_connect(f"{push.ws_base}/subscribe/orders", headers={"Origin": ALLOWED_ORIGIN})
    stream = await open_sse(push.http, url, headers={**headers, "Origin": ALLOWED_ORIGIN})
    assert stream.response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    stream.response.close()
    ws = await push.http.ws_connect(
        f"ws://{push.secure.removeprefix('http://')}/subscribe/orders.eu",
        headers={"Origin": ALLOWED_ORIGIN, "X-API-Key": KEY_DASH},
        protocols=["cloudevents.json"],
    )
    assert ws.protocol == "cloudevents.json"
    await ws.close()


async def test_status_and_metrics_report_the_push_outbound(push: Push) -> None:
    sse = await open_sse(push.http, f"{push.base}/subscribe/orders")
    async with push.http.get(f"{push.base}/admin/status") as resp:
        status = await resp.json()
    browsers = next(o for o in status["outbounds"] if o["name"] == "browsers")
    assert browsers["kind"] == "push"
    assert browsers["ready"] is True
    subs = browsers["subscriptions"]
    assert subs["subscribers"] >= 1
    assert subs["by_address"].get("orders", 0) >= 1
    assert subs["ring"]["events"] >= 1
    assert subs["ring"]["newest"] >= subs["ring"]["oldest"]
    assert (
        await metric(push.http, push.base, "mediator_push_ring_events", outbound="browsers") == subs["ring"]["events"]
    )
    assert (
        await metric(push.http, push.base, "mediator_push_events_pushed_total", outbound="browsers", transport="sse")
        > 0
    )
    text = render(status)  # what `mediator status` prints on a terminal
    assert "PUSH OUTBOUND" in text
    row = next(line for line in text.splitlines() if line.startswith("browsers ") and ".." in line)
    assert row.split()[1] == str(subs["subscribers"]), text
    sse.response.close()


async def test_not_found_and_not_acceptable(push: Push) -> None:
    async with push.http.get(f"{push.base}/subscribe/") as resp:
        assert resp.status == 404
    async with push.http.get(f"{push.base}/subscribe/orders..x") as resp:
        assert resp.status == 400
    async with push.http.get(f"{push.base}/subscribe/orders", headers={"Accept": "application/json"}) as resp:
        assert resp.status == 406
    async with push.http.get(f"{push.base}/subscribe/orders", params={"after": "abc"}) as resp:
        assert resp.status == 400
