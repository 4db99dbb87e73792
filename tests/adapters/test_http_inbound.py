"""HTTP inbound and listener against real sockets: an aiohttp client posting to our listener."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from adapters.http import HttpListenerConfig
from adapters.http.listener import HttpListener
from mediator.core import formats
from mediator.core.envelope import attribute, data_bytes, new_event
from mediator.core.errors import NotReady, RejectCode, Rejected
from mediator.core.health import Health
from mediator.v1.envelope_pb2 import Provenance
from tests.adapters.test_http_support import Running, serve

# accept: these tests post any media type (aiohttp sends application/octet-stream for bytes); the default,
# JSON only, is tested in tests/content/.
PLAIN = {"path": "/orders", "type": "com.example.order.created", "source": "/orders", "accept": ["*/*"]}
TEMPLATED = {
    "path": "/devices/{device}/telemetry",
    "type": "com.example.telemetry",
    "source": "urn:dev:{topic.1}",
    "accept": ["*/*"],
}
CE = {"path": "/events", "mode": "cloudevents", "max_batch": 3}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    async with serve({"orders-http": PLAIN, "telemetry": TEMPLATED, "cloudevents-http": CE}) as r:
        yield r


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def post(
    client: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with client.post(url, data=body, headers=headers) as resp:
        payload = await resp.json(content_type=None)
        return resp.status, payload, dict(resp.headers)


# ---------------------------------------------------------------- plain mode


async def test_an_inbound_named_like_a_python_keyword_serves(client: aiohttp.ClientSession) -> None:
    # aiohttp refuses route names with a keyword in them; an admin's name must never crash the listener.
    async with serve({"in": PLAIN, "class": {**PLAIN, "path": "/class"}}) as r:
        for path in ("/orders", "/class"):
            status, reply, _ = await post(client, r.base + path, b"{}", {"Content-Type": "application/json"})
            assert status == 202, reply
        assert len(r.sink.events) == 2


async def test_plain_post_is_accepted_as_a_new_event(running: Running, client: aiohttp.ClientSession) -> None:
    body = b'{"order": 42, "note": "caf\xc3\xa9"}'
    status, reply, _ = await post(
        client, running.base + "/orders", body, {"Content-Type": "application/json; charset=utf-8"}
    )
    assert status == 202
    (env,) = running.sink.events
    assert reply == {"id": env.id, "duplicate": False}
    assert env.type == "com.example.order.created"
    assert env.source == "/orders"
    assert env.spec_version == "1.0"
    assert attribute(env, "datacontenttype") == "application/json; charset=utf-8"
    assert env.attributes["time"].ce_timestamp.seconds > 0
    assert data_bytes(env) == body  # untouched
    prov = env.provenance
    assert (prov.inbound, prov.protocol, prov.topic, prov.topic_separator) == ("orders-http", "http", "orders", "/")
    assert prov.received.seconds > 0
    assert prov.id_minted  # no Idempotency-Key: the gateway made the id up


async def test_plain_idempotency_key_and_traceparent(running: Running, client: aiohttp.ClientSession) -> None:
    headers = {"Idempotency-Key": "order-42", "traceparent": TRACEPARENT, "Content-Type": "text/plain"}
    status, reply, _ = await post(client, running.base + "/orders", b"hello", headers)
    assert (status, reply) == (202, {"id": "order-42", "duplicate": False})
    (env,) = running.sink.events
    assert env.id == "order-42"
    assert not env.provenance.id_minted
    assert attribute(env, "traceparent") == TRACEPARENT


async def test_plain_ignores_a_malformed_traceparent(running: Running, client: aiohttp.ClientSession) -> None:
    status, _, _ = await post(client, running.base + "/orders", b"x", {"traceparent": "garbage"})
    assert status == 202
    assert attribute(running.sink.events[0], "traceparent") is None


async def test_plain_templates_render_against_the_path(running: Running, client: aiohttp.ClientSession) -> None:
    status, _, _ = await post(client, running.base + "/devices/d-7/telemetry", b"21.5")
    assert status == 202
    (env,) = running.sink.events
    assert env.source == "urn:dev:d-7"
    assert env.provenance.topic == "devices/d-7/telemetry"


async def test_plain_template_that_cannot_render_is_400() -> None:
    section = {"path": "/o", "type": "t", "source": "urn:{subject}", "accept": ["*/*"]}
    async with serve({"o": section}) as running, aiohttp.ClientSession() as client:
        status, reply, _ = await post(client, running.base + "/o", b"{}")
    assert status == 400
    assert "subject" in reply["reason"]
    assert running.sink.calls == 0


async def test_plain_path_with_ce_specversion_is_binary_mode(running: Running, client: aiohttp.ClientSession) -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "b-1",
        "ce-type": "com.example.other",
        "ce-source": "/elsewhere",
        "Content-Type": "application/json",
    }
    status, reply, _ = await post(client, running.base + "/orders", b"{}", headers)
    assert (status, reply) == (202, {"id": "b-1", "duplicate": False})
    (env,) = running.sink.events
    assert (env.type, env.source) == ("com.example.other", "/elsewhere")
    assert env.provenance.inbound == "orders-http"


# ---------------------------------------------------------------- CloudEvents modes


async def test_binary_mode(running: Running, client: aiohttp.ClientSession) -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "1234-1234-1234",
        "ce-type": "com.example.someevent",
        "ce-source": "/mycontext/subcontext",
        "ce-time": "2018-04-05T03:56:24Z",
        "ce-subject": "Euro%20%E2%82%AC%20%F0%9F%98%80",
        "ce-comexampleext": "value",
        "Content-Type": "application/xml",
        "traceparent": TRACEPARENT,
    }
    status, reply, _ = await post(client, running.base + "/events", b"<much wow='xml'/>", headers)
    assert (status, reply) == (202, {"id": "1234-1234-1234", "duplicate": False})
    (env,) = running.sink.events
    assert env.type == "com.example.someevent"
    assert env.source == "/mycontext/subcontext"
    assert attribute(env, "time") == "2018-04-05T03:56:24Z"
    assert attribute(env, "subject") == "Euro \u20ac \U0001f600"
    assert attribute(env, "comexampleext") == "value"
    assert attribute(env, "datacontenttype") == "application/xml"
    assert attribute(env, "traceparent") == TRACEPARENT  # the HTTP header, as the event had none
    assert data_bytes(env) == b"<much wow='xml'/>"
    assert env.provenance.topic == "events"


async def test_structured_mode(running: Running, client: aiohttp.ClientSession) -> None:
    event = {
        "specversion": "1.0",
        "id": "s-1",
        "type": "com.example.s",
        "source": "/s",
        "datacontenttype": "application/json",
        "data": {"a": [1, 2]},
        "count": 3,
    }
    headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    status, reply, _ = await post(client, running.base + "/events", json.dumps(event).encode(), headers)
    assert (status, reply) == (202, {"id": "s-1", "duplicate": False})
    (env,) = running.sink.events
    assert json.loads(data_bytes(env)) == {"a": [1, 2]}
    assert env.attributes["count"].ce_integer == 3
    assert env.provenance.inbound == "cloudevents-http"


async def test_batch_mode_accepts_all_at_once(running: Running, client: aiohttp.ClientSession) -> None:
    events = [{"specversion": "1.0", "id": f"b-{i}", "type": "t", "source": "/b", "data": i} for i in range(3)]
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    status, reply, _ = await post(client, running.base + "/events", json.dumps(events).encode(), headers)
    assert (status, reply) == (202, {"ids": ["b-0", "b-1", "b-2"], "duplicate": [False, False, False]})
    assert [e.id for e in running.sink.events] == ["b-0", "b-1", "b-2"]
    assert running.sink.calls == 1  # one unit


async def test_batch_is_all_or_nothing(running: Running, client: aiohttp.ClientSession) -> None:
    events: list[dict[str, Any]] = [{"specversion": "1.0", "id": "ok", "type": "t", "source": "/b"}]
    events.append({"specversion": "1.0", "id": "bad", "source": "/b"})  # no type
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    status, reply, _ = await post(client, running.base + "/events", json.dumps(events).encode(), headers)
    assert status == 400
    assert reply["error"] == "invalid"
    assert "event [1]" in reply["reason"]
    assert running.sink.calls == 0


async def test_batch_over_max_batch_is_too_large(running: Running, client: aiohttp.ClientSession) -> None:
    events = [{"specversion": "1.0", "id": f"b-{i}", "type": "t", "source": "/b"} for i in range(4)]
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    status, reply, _ = await post(client, running.base + "/events", json.dumps(events).encode(), headers)
    assert (status, reply["error"]) == (413, "too_large")
    assert running.sink.calls == 0


async def test_empty_batch_commits_nothing(running: Running, client: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    status, reply, _ = await post(client, running.base + "/events", b"[]", headers)
    assert (status, reply) == (202, {"ids": [], "duplicate": []})
    assert running.sink.calls == 0


async def test_protobuf_mode_discards_a_forged_provenance(running: Running, client: aiohttp.ClientSession) -> None:
    env = new_event(type="com.example.pb", source="/pb", data=b"\x00\x01\xff", content_type="application/x")
    env.provenance.CopyFrom(Provenance(inbound="forged", principal="admin"))
    body = env.SerializeToString()  # provenance included on purpose
    headers = {"Content-Type": "application/cloudevents+protobuf"}
    status, reply, _ = await post(client, running.base + "/events", body, headers)
    assert (status, reply) == (202, {"id": env.id, "duplicate": False})
    (got,) = running.sink.events
    assert data_bytes(got) == b"\x00\x01\xff"
    assert got.provenance.inbound == "cloudevents-http"
    assert got.provenance.principal == ""


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s"}, b"{}"),  # no ce-type
        ({"ce-specversion": "0.3", "ce-id": "x", "ce-source": "/s", "ce-type": "t"}, b"{}"),
        ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "t", "ce-time": "noon"}, b""),
        ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "%C0%A0"}, b""),  # overlong
        ({"Content-Type": "application/cloudevents+json"}, b"{not json"),
        ({"Content-Type": "application/cloudevents+json"}, b'{"specversion": "1.0"}'),
        ({"Content-Type": "application/cloudevents-batch+json"}, b'{"not": "an array"}'),
        ({"Content-Type": "application/cloudevents+protobuf"}, b"\xff\xff\xff"),
    ],
)
async def test_invalid_cloudevent_is_400(
    running: Running, client: aiohttp.ClientSession, headers: dict[str, str], body: bytes
) -> None:
    status, reply, _ = await post(client, running.base + "/events", body, headers)
    assert status == 400
    assert reply["error"] == "invalid"
    assert reply["reason"]
    assert running.sink.calls == 0


async def test_no_cloudevent_is_415(running: Running, client: aiohttp.ClientSession) -> None:
    status, reply, _ = await post(client, running.base + "/events", b"{}", {"Content-Type": "application/json"})
    assert (status, reply["error"]) == (415, "unsupported_media")


async def test_other_methods_are_405(running: Running, client: aiohttp.ClientSession) -> None:
    async with client.get(running.base + "/orders") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]


async def test_unknown_paths_are_404_and_health_answers_head(running: Running, client: aiohttp.ClientSession) -> None:
    """The listener's own dispatch (exact routes straight to their handler) leaves the rest to aiohttp's
    router: these answers are the router's."""
    async with client.post(running.base + "/nowhere", data=b"{}") as resp:
        assert resp.status == 404
    async with client.post(running.base + "/orders/", data=b"{}") as resp:
        assert resp.status == 404  # no trailing-slash leniency
    async with client.head(running.base + "/healthz") as resp:
        assert resp.status == 200
    async with client.post(running.base + "/healthz", data=b"{}") as resp:
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"]


@pytest.mark.parametrize("path", ["/orders", "/devices/d-9/telemetry"])
async def test_expect_100_continue_is_answered(running: Running, client: aiohttp.ClientSession, path: str) -> None:
    """A client that asks before sending its body (curl does for large bodies) gets 100 Continue, on an
    exact route and on a templated one."""
    async with client.post(running.base + path, data=b'{"n": 1}', expect100=True) as resp:
        assert resp.status == 202
    assert len(running.sink.events) == 1


async def test_oversized_body_is_413() -> None:
    async with (
        serve({"orders-http": PLAIN}, max_body_bytes=1000) as running,
        aiohttp.ClientSession() as client,
    ):
        status, reply, _ = await post(client, running.base + "/orders", b"x" * 1001)
        assert (status, reply["error"]) == (413, "too_large")
        status, _, _ = await post(client, running.base + "/orders", b"x" * 1000)
        assert status == 202


async def test_oversized_chunked_body_is_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 400

    async with (
        serve({"orders-http": PLAIN}, max_body_bytes=1000) as running,
        aiohttp.ClientSession() as client,
        client.post(running.base + "/orders", data=chunks()) as resp,
    ):
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
    assert running.sink.calls == 0


async def test_slow_body_is_408() -> None:
    async with serve({"orders-http": PLAIN}, read_timeout_s=0.3) as running:
        port = running.listener.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Promise 100 bytes, send 10, then stall: only our read timeout ends this request.
            writer.write(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"y" * 10)
            await writer.drain()
            async with asyncio.timeout(5):
                status_line = await reader.readline()
                rest = await reader.read()  # the server closes after the answer
        finally:
            writer.close()
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        assert b'"error": "timeout"' in rest
        assert running.sink.calls == 0


async def test_non_utf8_header_bytes_are_400_not_500() -> None:
    async with serve({"orders-http": PLAIN, "cloudevents-http": CE}) as running:
        port = running.listener.port
        assert port is not None
        for request in (
            b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \xff\xfe\r\nContent-Length: 0\r\n\r\n",
            b"POST /events HTTP/1.1\r\nHost: x\r\nce-specversion: 1.0\r\nce-id: \xff\r\nce-type: t\r\n"
            b"ce-source: /s\r\nContent-Length: 0\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                await writer.drain()
                async with asyncio.timeout(5):
                    status_line = await reader.readline()
            finally:
                writer.close()
            assert status_line.startswith(b"HTTP/1.1 400"), status_line
        assert running.sink.calls == 0


async def test_malformed_chunked_framing_is_400() -> None:
    async with serve({"orders-http": PLAIN}) as running:
        port = running.listener.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /orders HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n")
            await writer.drain()
            async with asyncio.timeout(5):
                status_line = await reader.readline()
        finally:
            writer.close()
        assert status_line[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400"), status_line
        assert running.sink.calls == 0


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (RejectCode.INVALID, 400),
        (RejectCode.UNAUTHENTICATED, 401),
        (RejectCode.FORBIDDEN, 403),
        (RejectCode.TOO_LARGE, 413),
        (RejectCode.UNSUPPORTED_MEDIA, 415),
        (RejectCode.RATE_LIMITED, 429),
    ],
)
async def test_sink_rejection_maps_to_status(
    running: Running, client: aiohttp.ClientSession, code: RejectCode, status: int
) -> None:
    running.sink.fail_with = Rejected(code, "stage said no")
    got, reply, _ = await post(client, running.base + "/orders", b"{}")
    assert got == status
    assert {k: reply[k] for k in ("error", "reason")} == {"error": code.value, "reason": "stage said no"}


async def test_not_ready_is_503_with_retry_after(running: Running, client: aiohttp.ClientSession) -> None:
    running.sink.fail_with = NotReady("outbox full", retry_after_s=2.2)
    status, reply, headers = await post(client, running.base + "/orders", b"{}")
    assert status == 503
    assert headers["Retry-After"] == "3"
    assert reply == {"error": "not_ready", "reason": "outbox full"}
    running.sink.fail_with = NotReady("draining", retry_after_s=0.01)
    status, _, headers = await post(client, running.base + "/orders", b"{}")
    assert (status, headers["Retry-After"]) == (503, "1")


# ---------------------------------------------------------------- health


async def test_healthz_and_readyz_follow_health(running: Running, client: aiohttp.ClientSession) -> None:
    async with client.get(running.base + "/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    async with client.get(running.base + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["listener:web"]["ready"] is True
    running.health.register("outbound:mqtt")  # registered, not yet connected
    async with client.get(running.base + "/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["outbound:mqtt"] == {"ready": False, "detail": "starting"}
    running.health.set("outbound:mqtt", True, "connected")
    async with client.get(running.base + "/readyz") as resp:
        assert resp.status == 200
    running.health.draining = True
    async with client.get(running.base + "/readyz") as resp:
        assert resp.status == 503
    async with client.get(running.base + "/healthz") as resp:
        assert resp.status == 200


async def test_bind_failure_raises_at_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        health = Health()
        listener = HttpListener("web", HttpListenerConfig(port=port), [], health)
        async with asyncio.timeout(5):
            with pytest.raises(OSError, match="address already in use"):
                await listener.run()
        assert health.snapshot()["listener:web"]["ready"] is False


async def test_cancellation_stops_listening() -> None:
    async with serve({"orders-http": PLAIN}) as running:
        port = running.listener.port
        assert running.health.snapshot()["listener:web"]["ready"] is True
    assert running.health.snapshot()["listener:web"] == {"ready": False, "detail": "stopped"}
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_structured_roundtrip_of_formats_helper(running: Running, client: aiohttp.ClientSession) -> None:
    env = new_event(type="t.x", source="/x", data=b"plain text", content_type="text/plain", subject="s")
    headers = {"Content-Type": formats.JSON_CONTENT_TYPE}
    status, _, _ = await post(client, running.base + "/events", formats.to_structured(env), headers)
    assert status == 202
    (got,) = running.sink.events
    assert (got.id, data_bytes(got), attribute(got, "subject")) == (env.id, b"plain text", "s")


async def test_handles_concurrent_requests() -> None:
    async with serve({"orders-http": PLAIN}) as running, aiohttp.ClientSession() as client:
        results = await asyncio.gather(*(post(client, running.base + "/orders", str(i).encode()) for i in range(50)))
        assert [r[0] for r in results] == [202] * 50
        assert sorted(int(data_bytes(e)) for e in running.sink.events) == list(range(50))
