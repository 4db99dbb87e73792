"""Well-formed or refused, through the real daemon on every protocol: malformed JSON, invalid UTF-8,
100,000 nested brackets, a media type the endpoint does not take, bad attributes and undecodable gRPC
bytes are refused (HTTP 400/415 with a problem body, gRPC INVALID_ARGUMENT, MQTT and AMQP a dead letter
with the reason, then the ack), the daemon stays up and the next good event is delivered."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mediator.v1 import envelope_pb2, service_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(90)

ORDER = "com.example.order.created"


@pytest.fixture
async def daemon(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[tuple[Quickstart, DaemonProcess]]:
    qs = Quickstart(tmp_path, extra_toml="[validation]\nmax_depth = 32\n")
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield qs, proc
    finally:
        assert await proc.stop(signal.SIGTERM) == 0, proc.logs()


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


def ce(type_: str = ORDER, **more: str) -> dict[str, str]:
    return {"ce-specversion": "1.0", "ce-id": uuid.uuid4().hex, "ce-source": "/t", "ce-type": type_, **more}


async def dead_letters(http: aiohttp.ClientSession, port: int) -> list[dict[str, Any]]:
    async with http.get(f"http://127.0.0.1:{port}/admin/dead-letters") as resp:
        letters: list[dict[str, Any]] = (await resp.json())["dead_letters"]
        return letters


async def test_malformed_events_refused_on_every_protocol(
    daemon: tuple[Quickstart, DaemonProcess], tmp_path: Path
) -> None:
    qs, proc = daemon
    base = f"http://127.0.0.1:{qs.http_port}"
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn, aiohttp.ClientSession() as http:
        channel = await conn.channel()
        orders = await bound_queue(channel, qs.orders_exchange, "orders.created")
        telemetry = await bound_queue(channel, qs.telemetry_exchange, "#")

        # ---------------------------------------------------------------- HTTP, plain inbound /orders
        json_ct = {"Content-Type": "application/json"}
        cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
            ("truncated JSON", b'{"a": ', json_ct, 400, "line 1 column 7"),
            ("invalid UTF-8 in JSON", b'{"a": "\xff"}', json_ct, 400, "UTF-8"),
            ("100,000 nested brackets", b"[" * 100_000, json_ct, 400, "depth"),
            ("33 levels, over max_depth = 32", b"[" * 33 + b"]" * 33, json_ct, 400, "deeper than 32"),
            ("NaN", b'{"a": NaN}', json_ct, 400, "not valid JSON"),
            ("XML to a JSON endpoint", b"<a/>", {"Content-Type": "application/xml"}, 415, "application/json"),
            ("no Content-Type", b"{}", {"Content-Type": ""}, 415, "Content-Type is required"),
        ]
        for what, body, headers, status, needle in cases:
            got, reply, resp_headers = await post(http, base + "/orders", body, headers)
            assert got == status, f"{what}: {got} {reply}"
            assert resp_headers["Content-Type"].startswith("application/problem+json"), what
            assert (reply["status"], reply["error"]) == (status, reply["type"].rsplit(":", 1)[1]), what
            assert reply["title"], what
            assert reply["detail"] == reply["reason"], what
            assert needle in reply["detail"], f"{what}: {reply['detail']}"
            if status == 415:
                assert resp_headers["Accept-Post"] == "application/json", what

        # Binary-mode CloudEvents (/events): bad attributes, invalid UTF-8 text; the errors name the attribute.
        got, reply, _ = await post(
            http, base + "/events", b"caf\xe9", {**ce(), "Content-Type": "text/plain; charset=utf-8"}
        )
        assert (got, reply["error"]) == (400, "invalid")
        assert "not valid UTF-8 at byte 3" in reply["detail"]
        got, reply, _ = await post(http, base + "/events", b"{}", {**ce(), "ce-dataschema": "not a uri", **json_ct})
        assert got == 400
        assert reply["errors"] == [{"detail": "'not a uri' is not an absolute URI", "attribute": "dataschema"}]
        got, reply, _ = await post(
            http,
            base + "/events",
            b"{}",
            {**ce(), "ce-comexampleext": "a%07b", **json_ct},  # a BEL once percent-decoded
        )
        assert got == 400, reply
        assert reply["errors"][0]["attribute"] == "comexampleext"

        # Deep nesting in the structured and batch formats is a 400, not a 500 (the json module recurses).
        deep = b'{"specversion": "1.0", "id": "d", "source": "/d", "type": "t", "data": ' + b"[" * 100_000 + b"}"
        for ct, body in (
            ("application/cloudevents+json", deep),
            ("application/cloudevents-batch+json", b"[" * 100_000),
        ):
            got, reply, _ = await post(http, base + "/events", body, {"Content-Type": ct})
            assert (got, reply["error"]) == (400, "invalid"), (ct, got, reply)
            assert "nested too deeply" in reply["detail"], ct

        # A structured CloudEvent posted to the plain inbound is read as a CloudEvent, never as opaque data.
        event = {"specversion": "1.0", "id": "structured-1", "source": "/s", "type": ORDER, "data": {"n": 1}}
        got, reply, _ = await post(
            http, base + "/orders", json.dumps(event).encode(), {"Content-Type": "application/cloudevents+json"}
        )
        assert (got, reply) == (202, {"id": "structured-1", "duplicate": False})
        delivered = await get_one(orders)
        assert delivered.message_id == "structured-1"
        assert json.loads(delivered.body) == {"n": 1}

        # And the daemon still takes good JSON.
        got, reply, _ = await post(http, base + "/orders", b'{"order": 7}', json_ct)
        assert got == 202
        assert (await get_one(orders)).body == b'{"order": 7}'

        # ---------------------------------------------------------------- gRPC
        async with grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as ch:
            stub = service_pb2_grpc.MediatorStub(ch)
            bad = envelope_pb2.Envelope(id="g-bad", source="/g", spec_version="1.0", type=ORDER, binary_data=b'{"a": ')
            bad.attributes["datacontenttype"].ce_string = "application/json"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Publish(bad, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not valid JSON" in (refused.value.details() or "")

            time_as_text = envelope_pb2.Envelope(id="g-t", source="/g", spec_version="1.0", type=ORDER)
            time_as_text.attributes["time"].ce_string = "yesterday"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Publish(time_as_text, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'time'" in (refused.value.details() or "")
            assert "RFC 3339" in (refused.value.details() or "")

            # Bytes that are no Envelope at all: INVALID_ARGUMENT from our handler, not grpcio's UNKNOWN.
            raw = ch.unary_unary("/mediator.v1.Mediator/Publish")  # identity (de)serializers: bytes in and out
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw(b"\xff\xff\xff\xff", timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
            assert "not a mediator.v1.Envelope message" in (refused.value.details() or "")

            # PublishStream: the undecodable message gets a refused ack, and the stream goes on.
            good = envelope_pb2.Envelope(id="g-ok-1", source="/g", spec_version="1.0", type=ORDER, binary_data=b"{}")
            good2 = envelope_pb2.Envelope(id="g-ok-2", source="/g", spec_version="1.0", type=ORDER, binary_data=b"{}")
            stream = ch.stream_stream("/mediator.v1.Mediator/PublishStream")
            call = stream(iter([good.SerializeToString(), b"\xff\xff\xff\xff", good2.SerializeToString()]))
            acks = [service_pb2.PublishAck.FromString(m) async for m in call]
            assert [(a.sequence, a.code) for a in acks] == [
                (0, 0),
                (1, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
                (2, 0),
            ]
            assert "not a mediator.v1.Envelope message" in acks[1].reason
            assert {(await get_one(orders)).message_id for _ in range(2)} == {"g-ok-1", "g-ok-2"}

        # ---------------------------------------------------------------- MQTT and AMQP: dead letter, then ack
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = "application/json"
        commands_ex = await channel.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
            await mqtt.subscribe(f"{qs.topic_prefix}devices/+/commands", qos=1)
            await mqtt.publish(f"{qs.topic_prefix}devices/d1/telemetry", b'{"t": ', qos=1, properties=props)
            await commands_ex.publish(
                aio_pika.Message(b'{"cmd": ', content_type="application/json", message_id="amqp-bad"), routing_key="d1"
            )
            # Then good ones, which are delivered.
            await mqtt.publish(f"{qs.topic_prefix}devices/d2/telemetry", b'{"t": 21.5}', qos=1, properties=props)
            await commands_ex.publish(
                aio_pika.Message(b'{"cmd": "reboot"}', content_type="application/json", message_id="amqp-ok"),
                routing_key="d2",
            )
            assert (await get_one(telemetry)).body == b'{"t": 21.5}'
            async with asyncio.timeout(15):
                message = await anext(aiter(mqtt.messages))
            assert message.payload == b'{"cmd": "reboot"}'

        async with asyncio.timeout(15):
            while True:
                letters = await dead_letters(http, qs.http_port)
                reasons = {d["inbound"]: d["reason"] for d in letters}
                if {"devices", "commands"} <= set(reasons):
                    break
                await asyncio.sleep(0.1)
        assert "not valid JSON" in reasons["devices"], reasons
        assert "not valid JSON" in reasons["commands"], reasons
        assert [d["event_id"] for d in letters if d["inbound"] == "commands"] == ["amqp-bad"]
        queue = await channel.declare_queue(qs.commands_queue, durable=True, passive=True)
        assert queue.declaration_result.message_count == 0, "the dead-lettered command was not acknowledged"
        assert proc.proc is not None
        assert proc.proc.returncode is None, "the daemon must still run"
