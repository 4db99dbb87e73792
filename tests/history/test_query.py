"""The event store of a real daemon on the shipped config: events taken over HTTP, MQTT, AMQP and gRPC are
queryable by type, source, subject and time, paged with the opaque cursor both ways, filtered by a CEL
``where`` that examines a bounded number of rows per page, fetched by id, and listed by the CLI; all of
it admin-guarded."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.e2e.test_one_daemon import mediator
from tests.history.support import admin, all_events, batch_of, publish_batch, start, wait_stored
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(120)

TOKEN_ENV = "MEDIATOR_HISTORY_TEST_TOKEN"
EXAMINED = 7


async def test_events_of_all_four_protocols_are_queryable_and_paged(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_ENV, token)
    qs, daemon = start(
        tmp_path,
        overrides={"listeners.http": {"admin_token_env": TOKEN_ENV}, "store": {"query_max_examined": EXAMINED}},
    )
    await daemon.start()
    port = qs.http_port
    kind = f"com.example.hist.{qs.uid}"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as anon:
            await admin(anon, port, "GET", "events", want=401)
        async with aiohttp.ClientSession(headers=auth) as http:
            # HTTP: plain JSON on /orders, CloudEvents batches on /events (half before `middle`, half after)
            for i in range(3):
                async with http.post(f"http://127.0.0.1:{port}/orders", json={"order": i}) as resp:
                    assert resp.status == 202, await resp.text()
            events = batch_of(["/hist/a", "/hist/b"], 30, kind)
            await publish_batch(http, port, events[:15])
            await asyncio.sleep(0.05)
            middle = datetime.now(UTC).isoformat()
            await asyncio.sleep(0.05)
            await publish_batch(http, port, events[15:])
            # MQTT telemetry, AMQP commands, gRPC Publish
            async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
                for i in range(2):
                    await mqtt.publish(f"{qs.topic_prefix}devices/dev42/telemetry", f'{{"t": {i}}}', qos=1)
            conn = await aio_pika.connect(RABBIT_URL)
            async with conn:
                channel = await conn.channel()
                ex = await channel.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
                for i in range(2):
                    await ex.publish(aio_pika.Message(b"reboot", message_id=f"cmd-{qs.uid}-{i}"), routing_key="dev7")
            grpc_ids = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as ch:
                stub = service_pb2_grpc.MediatorStub(ch)
                for i in range(2):
                    env = envelope_pb2.Envelope(
                        id=f"grpc-{qs.uid}-{i}",
                        source="/grpc-hist",
                        spec_version="1.0",
                        type="com.example.order.created",
                    )
                    env.attributes["subject"].ce_string = "grpc-subject"
                    env.binary_data = b"{}"
                    await stub.Publish(env)
                    grpc_ids.append(env.id)
            await wait_stored(http, port, 2, type="com.example.device.telemetry")
            await wait_stored(http, port, 2, type="com.example.device.command")

            # by type, with the inbound that took each event
            by_type = {
                "com.example.device.telemetry": ("devices", 2),
                "com.example.device.command": ("commands", 2),
                kind: ("cloudevents-http", 30),
            }
            for etype, (inbound, count) in by_type.items():
                found = await all_events(http, port, type=etype)
                assert len(found) == count, (etype, found)
                assert {e["inbound"] for e in found} == {inbound}
                assert all(e["event"]["type"] == etype for e in found)
            orders = await all_events(http, port, type="com.example.order.created")
            assert sorted(e["inbound"] for e in orders) == ["grpc", "grpc", "orders-http", "orders-http", "orders-http"]
            glob = await all_events(http, port, type="com.example.device.*")
            assert len(glob) == 4
            # by source and subject
            assert {e["event"]["id"] for e in await all_events(http, port, source="/hist/a")} == {
                f"{kind}-{i}" for i in range(0, 30, 2)
            }
            subj = await all_events(http, port, subject="item-0", type=kind)
            assert sorted(e["event"]["data"]["n"] for e in subj) == [0, 5, 10, 15, 20, 25]
            grpc_found = await all_events(http, port, subject="grpc-subject")
            assert sorted(e["event"]["id"] for e in grpc_found) == grpc_ids
            # by time
            later = await all_events(http, port, type=kind, since=middle)
            assert sorted(e["event"]["data"]["n"] for e in later) == list(range(15, 30))
            earlier = await all_events(http, port, type=kind, until=middle, since="10m")
            assert sorted(e["event"]["data"]["n"] for e in earlier) == list(range(15))
            assert await all_events(http, port, type=kind, until="10m") == []
            # paging: pages of 4, both ways, every event once, in order
            pages = 0
            cursor = None
            seen: list[int] = []
            while True:
                page = await admin(
                    http, port, "GET", "events",
                    params={"type": kind, "order": "oldest", "limit": "4", **({"cursor": cursor} if cursor else {})},
                )  # fmt: skip
                pages += 1
                seen += [e["event"]["data"]["n"] for e in page["events"]]
                cursor = page["next"]
                if cursor is None:
                    break
            assert (seen, pages) == (list(range(30)), 8)
            newest = await all_events(http, port, type=kind, limit="7")
            assert [e["event"]["data"]["n"] for e in newest] == list(range(29, -1, -1))
            # where: CEL over data, at most EXAMINED rows a page, the cursor going on from the last examined
            first = await admin(
                http, port, "GET", "events", params={"type": kind, "where": "data.n % 3 == 0", "order": "oldest"}
            )
            assert first["examined"] <= EXAMINED, first
            assert first["next"] is not None, first
            assert [e["event"]["data"]["n"] for e in first["events"]] == [0, 3, 6]
            matched = await all_events(http, port, type=kind, where="data.n % 3 == 0 && source == '/hist/b'")
            assert sorted(e["event"]["data"]["n"] for e in matched) == [3, 9, 15, 21, 27]
            for bad in ({"where": "data.n +"}, {"cursor": "nope"}, {"since": "yesterday"}, {"limit": "0"}, {"x": "1"}):
                problem = await admin(http, port, "GET", "events", want=400, params=bad)
                assert problem["error"] == "invalid", problem
            # one event by id: the structured event and the gateway's facts
            one = await admin(http, port, "GET", f"events/{grpc_ids[0]}")
            assert (one["event"]["subject"], one["inbound"]) == ("grpc-subject", "grpc"), one
            assert abs(datetime.fromisoformat(one["received"].replace("Z", "+00:00")).timestamp() - time.time()) < 60
            await admin(http, port, "GET", "events/no-such-id", want=404)
            status = await admin(http, port, "GET", "status")
            assert status["store"]["events"] >= 39, status["store"]
            assert status["store"]["bytes"] > 0, status["store"]

        # the CLI, with the admin token by variable
        cli = ("--config", str(daemon.config), "--token-env", TOKEN_ENV)
        code, out, err, _ = await mediator("events", "list", "--type", kind, "--source", "/hist/b", "--since", "10m",
                                           "--json", *cli)  # fmt: skip
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [e["event"]["data"]["n"] for e in lines] == list(range(29, 0, -2))
        code, out, err, _ = await mediator(
            "events", "list", "--type", kind, "--limit", "3", "--where", "data.n > 26", *cli
        )
        assert code == 0, err
        assert out.splitlines()[0].split() == ["RECEIVED", "TYPE", "SOURCE", "SUBJECT", "INBOUND", "ID"], out
        assert [line.split()[-1] for line in out.splitlines()[1:4]] == [f"{kind}-{n}" for n in (29, 28, 27)], out
        code, out, err, _ = await mediator("events", "show", grpc_ids[1], *cli)
        assert code == 0, err
        assert json.loads(out)["event"]["id"] == grpc_ids[1]
    finally:
        assert await daemon.stop() == 0, daemon.logs()
