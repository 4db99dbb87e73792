"""Delivery status and Prefer: wait (issue 21), against the real daemon, real brokers and real consumers.

The orders route of the shipped config has four destinations: the AMQP exchange, MQTT (a Mosquitto the
test owns, so it can be stopped), the gRPC Subscribe streams (three real consumers here) and the push ring
of the browsers outbound (SSE / WebSocket subscribers read it at their pace)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest

from mediator.core.envelope import Envelope
from mediator.v1 import service_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import get_one
from tests.support.brokers import MosquittoInstance
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = pytest.mark.timeout(180)


@dataclass
class Running:
    qs: Quickstart
    daemon: DaemonProcess
    broker: MosquittoInstance

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.qs.http_port}"


async def start(tmp_path: Path, **kwargs: Any) -> Running:
    broker = MosquittoInstance(tmp_path / "mosq", port=free_port())
    await broker.start()
    qs = Quickstart(tmp_path, mqtt_port=broker.port, **kwargs)
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await daemon.start()
    return Running(qs, daemon, broker)


async def finish(run: Running) -> None:
    try:
        if run.daemon.proc is not None:
            code = await run.daemon.stop(signal.SIGTERM)
            assert code == 0, run.daemon.logs()
    finally:
        await run.broker.stop()


@pytest.fixture
async def running(tmp_path: Path, rabbitmq: str) -> AsyncIterator[Running]:
    run = await start(tmp_path)
    try:
        yield run
    finally:
        await finish(run)


async def bound_queue(channel: aio_pika.abc.AbstractChannel, qs: Quickstart) -> aio_pika.abc.AbstractQueue:
    exchange = await channel.declare_exchange(qs.orders_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "orders.created")
    return queue


async def get_status(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with http.get(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def status_until(
    http: aiohttp.ClientSession, url: str, predicate: Any, timeout_s: float = 20.0, **kwargs: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    seen: object = None
    while time.monotonic() < deadline:
        code, doc = await get_status(http, url, **kwargs)
        seen = (code, doc)
        if code == 200 and predicate(doc):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"status never matched within {timeout_s} s; last seen {seen}")


def by_outbound(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["outbound"]: d for d in doc["destinations"]}


async def mqtt_down(run: Running) -> None:
    """Stop the test's Mosquitto and wait until the daemon's MQTT outbound says so."""
    await run.broker.stop()
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{run.base}/readyz") as resp:
                body = await resp.json()
            if not body["outbound:mqtt"]["ready"]:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the daemon never noticed the MQTT broker was down")


async def test_status_pending_then_delivered_to_three_real_consumers(running: Running) -> None:
    qs = running.qs
    topic = f"{qs.topic_prefix}orders/created"
    # An MQTT consumer with a persistent session: what the daemon publishes while it is away is queued for it.
    async with aiomqtt.Client("127.0.0.1", running.broker.port, identifier=f"c-{qs.uid}", clean_session=False) as c:
        await c.subscribe(topic, qos=1)
    conn = await aio_pika.connect(RABBIT_URL)
    channel_grpc = grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}")
    try:
        queue = await bound_queue(await conn.channel(), qs)
        stub = service_pb2_grpc.MediatorStub(channel_grpc)
        call = stub.Subscribe(service_pb2.SubscribeRequest(outbound="subscribers"))
        await call.initial_metadata()
        await mqtt_down(running)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{running.base}/orders", json={"order": 7}) as resp:
                assert resp.status == 202
                event_id = (await resp.json())["id"]
                location = resp.headers["Location"]
            assert location == f"/events/{event_id}/status"
            url = running.base + location
            # AMQP and gRPC confirm; MQTT is down, so the event stays pending.
            doc = await status_until(
                http,
                url,
                lambda d: (
                    by_outbound(d).get("orders-exchange", {}).get("state") == "delivered"
                    and by_outbound(d).get("subscribers", {}).get("state") == "delivered"
                ),
            )
            assert doc["id"] == event_id
            assert doc["state"] == "pending"
            assert doc["settled"] is False
            dests = by_outbound(doc)
            assert set(dests) == {"orders-exchange", "mqtt", "subscribers", "browsers"}
            assert dests["mqtt"]["state"] == "pending"
            assert dests["mqtt"]["address"] == topic
            assert dests["orders-exchange"]["address"] == "orders.created"
            assert "delivered_at" in dests["orders-exchange"]
            assert dests["orders-exchange"]["attempts"] == 0

            await running.broker.start()
            doc = await status_until(http, url, lambda d: d["state"] == "delivered", timeout_s=40)
            assert doc["settled"] is True
            assert all(d["state"] == "delivered" and "delivered_at" in d for d in doc["destinations"])
            assert "settled_at" in doc

        # Every consumer has it.
        msg = await get_one(queue, timeout_s=20)
        assert msg.message_id == event_id
        async with asyncio.timeout(20):
            event = await call.read()
        assert event.id == event_id
        async with (
            aiomqtt.Client("127.0.0.1", running.broker.port, identifier=f"c-{qs.uid}", clean_session=False) as c,
            asyncio.timeout(20),
        ):
            async for message in c.messages:
                assert json.loads(bytes(message.payload)) == {"order": 7}
                break
    finally:
        await channel_grpc.close()
        await conn.close()


async def test_partially_dead_when_one_destination_refuses(running: Running) -> None:
    """Nothing is bound to the orders exchange: RabbitMQ returns the mandatory publish (unroutable), a
    terminal failure. ``Prefer: wait`` answers 200 as soon as that destination is dead-lettered."""
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.post(f"{running.base}/orders", json={"order": 8}, headers={"Prefer": "wait=20"}) as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
            assert resp.headers["Preference-Applied"] == "wait=20"
            location = resp.headers["Location"]
        assert time.monotonic() - started < 15
        assert doc["state"] in ("partially-dead", "dead")
        dead = by_outbound(doc)["orders-exchange"]
        assert dead["state"] == "dead"
        assert "unroutable" in dead["reason"].lower()
        assert "dead_at" in dead
        final = await status_until(http, running.base + location, lambda d: d["settled"])
        assert final["state"] == "partially-dead"
        states = {name: d["state"] for name, d in by_outbound(final).items()}
        assert states == {
            "orders-exchange": "dead",
            "mqtt": "delivered",
            "subscribers": "delivered",
            "browsers": "delivered",
        }


async def test_prefer_wait_answers_200_once_consumers_confirm(running: Running) -> None:
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        queue = await bound_queue(await conn.channel(), running.qs)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{running.base}/orders", json={"order": 9}, headers={"Prefer": "wait=10"}) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["Preference-Applied"] == "wait=10"
                doc = await resp.json()
            assert doc["state"] == "delivered"
            assert doc["settled"] is True
            assert {d["state"] for d in doc["destinations"]} == {"delivered"}
            # Capped by the listener's max_wait_s (30 by default).
            async with http.post(f"{running.base}/orders", json={"order": 10}, headers={"Prefer": "wait=999"}) as resp:
                assert resp.status == 200
                assert resp.headers["Preference-Applied"] == "wait=30"
        msg = await get_one(queue, timeout_s=20)
        assert msg.message_id == doc["id"]
    finally:
        await conn.close()


async def test_prefer_wait_answers_202_after_n_seconds_when_a_broker_is_stopped(running: Running) -> None:
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        await bound_queue(await conn.channel(), running.qs)
        await mqtt_down(running)
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            async with http.post(f"{running.base}/orders", json={"order": 11}, headers={"Prefer": "wait=2"}) as resp:
                took = time.monotonic() - started
                assert resp.status == 202, await resp.text()
                event_id = (await resp.json())["id"]
                assert resp.headers["Location"] == f"/events/{event_id}/status"
                assert resp.headers["Preference-Applied"] == "wait=2"
            assert 1.9 <= took < 6, took
            code, doc = await get_status(http, running.base + f"/events/{event_id}/status")
            assert code == 200
            assert doc["state"] == "pending"
            assert by_outbound(doc)["mqtt"]["state"] == "pending"
            # Nothing was left waiting.
            async with http.get(f"{running.base}/metrics") as resp:
                text = await resp.text()
            assert "mediator_status_waiting_requests 0.0" in text
    finally:
        await conn.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def test_a_thousand_waiting_requests_with_bounded_rss(tmp_path: Path, rabbitmq: str) -> None:
    run = await start(tmp_path, overrides={"listeners.http": {"max_connections": 4000}})
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        queue = await bound_queue(await conn.channel(), run.qs)
        await mqtt_down(run)
        pid = run.daemon.pid
        assert pid is not None
        n = 1000
        connector = aiohttp.TCPConnector(limit=n + 10)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
            before = rss_kib(pid)

            async def one(i: int) -> tuple[int, dict[str, Any]]:
                async with http.post(f"{run.base}/orders", json={"order": i}, headers={"Prefer": "wait=60"}) as resp:
                    return resp.status, await resp.json()

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            deadline = time.monotonic() + 60
            peak = before
            async with aiohttp.ClientSession() as probe:
                while (waiting := await metric(probe, run.base, "mediator_status_waiting_requests")) < n:
                    assert time.monotonic() < deadline, f"only {waiting} of {n} requests waiting"
                    assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()][:3]
                    peak = max(peak, rss_kib(pid))
                    await asyncio.sleep(0.1)
                peak = max(peak, rss_kib(pid))
                await run.broker.start()  # every destination confirms now: each waiter is answered 200
                results = await asyncio.gather(*tasks)
                assert await metric(probe, run.base, "mediator_status_waiting_requests") == 0
            codes = [code for code, _ in results]
            assert codes == [200] * n, {c: codes.count(c) for c in set(codes)}
            assert {doc["state"] for _, doc in results} == {"delivered"}
        grown = peak - before
        print(f"\nRSS before {before} KiB, with {n} waiting {peak} KiB: +{grown} KiB ({grown / n:.1f} KiB per waiter)")
        assert grown < 150 * 1024, f"RSS grew {grown} KiB for {n} waiting requests"
        got = 0
        async with asyncio.timeout(30):
            while got < n:
                msg = await queue.get(fail=False)
                if msg is None:
                    await asyncio.sleep(0.05)
                else:
                    got += 1
    finally:
        await conn.close()
        await finish(run)


async def test_status_expires_after_the_window(tmp_path: Path, rabbitmq: str) -> None:
    run = await start(tmp_path, overrides={"outbox": {"status_window_s": 1.0}})
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        await bound_queue(await conn.channel(), run.qs)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{run.base}/orders", json={"order": 12}, headers={"Prefer": "wait=10"}) as resp:
                assert resp.status == 200
                url = run.base + resp.headers["Location"]
            deadline = time.monotonic() + 20
            while True:
                async with http.get(url) as resp:
                    if resp.status == 404:
                        assert resp.content_type == "application/problem+json"
                        problem = await resp.json(content_type=None)
                        break
                    assert resp.status == 200
                assert time.monotonic() < deadline, "the status never expired"
                await asyncio.sleep(0.1)
            assert problem["status"] == 404
            assert problem["type"] == "urn:mediator:problem:expired"
            assert "expired" in problem["detail"]
            async with http.get(f"{run.base}/events/never-seen/status") as resp:
                assert resp.status == 404
                unknown = await resp.json(content_type=None)
            assert unknown["type"] == "urn:mediator:problem:not_found"
    finally:
        await conn.close()
        await finish(run)


KEY_ALICE = "mk_alice-" + "a" * 32
KEY_BOB = "mk_bob-" + "b" * 32
KEY_ROOT = "mk_root-" + "r" * 32


def _entry(principal: str, key: str, roles: str) -> str:
    return (
        f'[[keys]]\nprincipal = "{principal}"\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\nroles = {roles}\n'
    )


async def test_another_principals_status_read_is_refused(tmp_path: Path, rabbitmq: str) -> None:
    os.environ["STATUS_TEST_KEYS"] = (
        _entry("alice", KEY_ALICE, '["publisher"]')
        + _entry("bob", KEY_BOB, '["publisher"]')
        + _entry("root", KEY_ROOT, '["admin"]')
    )
    run = await start(
        tmp_path,
        overrides={"listeners.http": {"auth": ["keys"]}, "listeners.grpc": {"auth": ["keys"]}},
        extra_toml='[auth.keys]\nkind = "api_key"\nkeys_env = "STATUS_TEST_KEYS"\n',
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{run.qs.grpc_port}")
    try:
        async with aiohttp.ClientSession() as http:
            alice = {"Authorization": f"Bearer {KEY_ALICE}"}
            async with http.post(f"{run.base}/orders", json={"order": 13}, headers=alice) as resp:
                assert resp.status == 202
                url = run.base + resp.headers["Location"]
            code, doc = await get_status(http, url, headers=alice)
            assert code == 200
            assert doc["inbound"] == "orders-http"
            code, body = await get_status(http, url, headers={"Authorization": f"Bearer {KEY_BOB}"})
            assert code == 403, body
            assert body["error"] == "forbidden"
            async with http.get(url) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            code, _ = await get_status(http, url, headers={"Authorization": "Bearer mk_wrong-" + "x" * 32})
            assert code == 401
            code, doc = await get_status(http, url, headers={"Authorization": f"Bearer {KEY_ROOT}"})
            assert code == 200
            event_id = url.split("/")[-2]
            assert doc["id"] == event_id
        # The same over gRPC: GetStatus is guarded like the read over HTTP.
        stub = service_pb2_grpc.MediatorStub(channel)
        request = service_pb2.StatusRequest(id=event_id)
        for key, code in ((KEY_BOB, grpc.StatusCode.PERMISSION_DENIED), (None, grpc.StatusCode.UNAUTHENTICATED)):
            metadata = (("authorization", f"Bearer {key}"),) if key else ()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetStatus(request, metadata=metadata, timeout=10)
            assert info.value.code() == code, info.value.details()
        for key in (KEY_ALICE, KEY_ROOT):
            status = await stub.GetStatus(request, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
            assert status.id == event_id
        # And from the CLI, with the publisher's token (by environment variable) or another's.
        for key, expected in ((KEY_ALICE, 0), (KEY_BOB, 1)):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mediator", "status", event_id, "--config", str(run.daemon.config), "--json",
                "--token-env", "STATUS_TEST_TOKEN",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
                env={**os.environ, "STATUS_TEST_TOKEN": key},
            )  # fmt: skip
            async with asyncio.timeout(30):
                out, err = await proc.communicate()
            assert proc.returncode == expected, (out, err)
            if expected == 0:
                assert json.loads(out)["id"] == event_id
            else:
                assert "403" in err.decode()
    finally:
        del os.environ["STATUS_TEST_KEYS"]
        await channel.close()
        await finish(run)


async def test_grpc_get_status_and_publish_with_prefer_wait(running: Running) -> None:
    conn = await aio_pika.connect(RABBIT_URL)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.qs.grpc_port}")
    try:
        await bound_queue(await conn.channel(), running.qs)
        stub = service_pb2_grpc.MediatorStub(channel)
        event = Envelope(id=f"grpc-{running.qs.uid}", source="/test", type="com.example.order.created")
        event.spec_version = "1.0"
        event.text_data = '{"order": 14}'
        event.attributes["datacontenttype"].ce_string = "application/json"
        reply = await stub.Publish(event, metadata=(("prefer", "wait=10"),), timeout=20)
        assert reply.id == event.id
        assert reply.status.state == "delivered"
        assert reply.status.settled
        assert {d.outbound for d in reply.status.destinations} == {"orders-exchange", "mqtt", "subscribers", "browsers"}
        status = await stub.GetStatus(service_pb2.StatusRequest(id=event.id), timeout=10)
        assert status.id == event.id
        assert status.state == "delivered"
        assert all(d.state == "delivered" and d.HasField("at") for d in status.destinations)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetStatus(service_pb2.StatusRequest(id="never-seen"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Without the metadata: the reply comes at commit, with no status.
        event.id = f"grpc2-{running.qs.uid}"
        reply = await stub.Publish(event, timeout=20)
        assert not reply.HasField("status")
    finally:
        await channel.close()
        await conn.close()


async def test_cli_status_of_an_event(running: Running) -> None:
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        await bound_queue(await conn.channel(), running.qs)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{running.base}/orders", json={"order": 15}, headers={"Prefer": "wait=10"}) as resp,
        ):
            assert resp.status == 200
            event_id = (await resp.json())["id"]
        for args, check in (
            (("--json",), lambda out: json.loads(out)["state"] == "delivered"),
            ((), lambda out: "delivered" in out and "orders-exchange" in out and event_id in out),
        ):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mediator", "status", event_id, "--config", str(running.daemon.config), *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            )  # fmt: skip
            async with asyncio.timeout(30):
                out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert check(out.decode()), out.decode()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mediator", "status", "never-seen", "--config", str(running.daemon.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 1
        assert "no event 'never-seen'" in err.decode()
    finally:
        await conn.close()


async def test_workers_answer_the_status_of_each_others_events(tmp_path: Path, rabbitmq: str) -> None:
    """``workers = 2``: each worker has its own outbox; a status read reaching the other worker (the kernel
    picks one per connection) is answered from the sibling that holds the event."""
    run = await start(tmp_path, overrides={"daemon": {"workers": 2}})
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        await bound_queue(await conn.channel(), run.qs)
        deadline = time.monotonic() + 30  # /readyz answers once one worker is up: wait for both
        while True:
            async with aiohttp.ClientSession() as http, http.get(f"{run.base}/admin/status") as resp:
                state = await resp.json() if resp.status == 200 else {}
            answering = state.get("workers_answering")
            if answering == 2 and state.get("ready"):  # "ready": true only when true in every worker
                break
            assert time.monotonic() < deadline, f"workers answering: {answering}"
            await asyncio.sleep(0.1)
        ids = []
        for i in range(20):
            # A connection per request: the kernel spreads them over both workers.
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
                http.post(f"{run.base}/orders", json={"order": i}, headers={"Prefer": "wait=10"}) as resp,
            ):
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["id"])
        # Both workers hold some (a sibling's part of /metrics is up to a second old: polled).
        deadline = time.monotonic() + 10
        while True:
            async with aiohttp.ClientSession() as http, http.get(f"{run.base}/metrics") as resp:
                text = await resp.text()
            per_worker = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("mediator_events_accepted_total{") and 'inbound="orders-http"' in line
            ]
            if sum(per_worker) == 20:
                break
            assert time.monotonic() < deadline, per_worker
            await asyncio.sleep(0.2)
        assert len(per_worker) == 2, per_worker
        assert all(n > 0 for n in per_worker), per_worker
        for event_id in ids:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                code, doc = await get_status(http, f"{run.base}/events/{event_id}/status")
            assert code == 200, (event_id, doc)
            assert doc["id"] == event_id
            assert doc["state"] == "delivered"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            code, doc = await get_status(http, f"{run.base}/events/never-seen/status")
        assert code == 404
        assert doc["type"] == "urn:mediator:problem:not_found"
    finally:
        await conn.close()
        await finish(run)


async def test_a_client_that_disconnects_leaves_no_waiter(running: Running) -> None:
    """A waiting HTTP client that closes its connection, and a gRPC call that gives up (its deadline),
    leave nothing waiting: the gauge drops back to 0 long before their wait=60 would end."""
    conn = await aio_pika.connect(RABBIT_URL)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.qs.grpc_port}")
    try:
        await bound_queue(await conn.channel(), running.qs)
        await mqtt_down(running)
        n = 100
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n + 10))

        async def one(i: int) -> None:
            async with http.post(f"{running.base}/orders", json={"order": i}, headers={"Prefer": "wait=60"}) as resp:
                await resp.read()

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        async with aiohttp.ClientSession() as probe:
            deadline = time.monotonic() + 30
            while (waiting := await metric(probe, running.base, "mediator_status_waiting_requests")) < n:
                assert time.monotonic() < deadline, f"only {waiting} of {n} waiting"
                await asyncio.sleep(0.1)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await http.close()  # the connections close: the daemon's waiters end
            started = time.monotonic()
            while (waiting := await metric(probe, running.base, "mediator_status_waiting_requests")) > 0:
                assert time.monotonic() - started < 10, f"{waiting} waiters left after the clients went"
                await asyncio.sleep(0.1)

            stub = service_pb2_grpc.MediatorStub(channel)
            event = Envelope(id=f"gone-{running.qs.uid}", source="/test", type="com.example.order.created")
            event.spec_version = "1.0"
            event.text_data = "{}"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Publish(event, metadata=(("prefer", "wait=60"),), timeout=2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            started = time.monotonic()
            while (waiting := await metric(probe, running.base, "mediator_status_waiting_requests")) > 0:
                assert time.monotonic() - started < 10, f"{waiting} gRPC waiters left after the deadline"
                await asyncio.sleep(0.1)
    finally:
        await channel.close()
        await conn.close()


async def test_the_status_outlives_a_restart(tmp_path: Path, rabbitmq: str) -> None:
    """The SQLite outbox keeps a row per completed delivery (and its dead letters): a restart within the
    window still answers delivered, with each destination's address, and partially-dead."""
    run = await start(tmp_path)
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{run.base}/orders", json={"order": 16}, headers={"Prefer": "wait=10"}) as resp:
                assert resp.status == 200
                dead_url = run.base + resp.headers["Location"]  # nothing bound yet: AMQP unroutable
            await status_until(http, dead_url, lambda d: d["settled"])
            await bound_queue(await conn.channel(), run.qs)
            async with http.post(f"{run.base}/orders", json={"order": 17}, headers={"Prefer": "wait=10"}) as resp:
                assert resp.status == 200
                url = run.base + resp.headers["Location"]
                before = await resp.json()
        assert before["state"] == "delivered"
        assert await run.daemon.stop(signal.SIGTERM) == 0
        await run.daemon.start()
        async with aiohttp.ClientSession() as http:
            code, after = await get_status(http, url)
            assert code == 200, after
            assert after["state"] == "delivered"
            assert {(d["outbound"], d["address"], d["state"]) for d in after["destinations"]} == {
                (d["outbound"], d["address"], "delivered") for d in before["destinations"]
            }
            code, dead = await get_status(http, dead_url)
            assert code == 200, dead
            assert dead["state"] == "partially-dead"
            assert "unroutable" in by_outbound(dead)["orders-exchange"]["reason"].lower()
    finally:
        await conn.close()
        await finish(run)


async def test_a_batch_names_each_events_status(running: Running) -> None:
    """A CloudEvents batch is answered 202 with one status URL per event (no Location: it names one
    resource); each resolves. Prefer: wait is for single events: a batch is answered at once."""
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        await bound_queue(await conn.channel(), running.qs)
        uid = running.qs.uid
        batch = [
            {
                "specversion": "1.0",
                "id": f"b{i}-{uid}",
                "source": "/batch",
                "type": "com.example.order.created",
                "datacontenttype": "application/json",
                "data": {"order": i},
            }
            for i in range(3)
        ]
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{running.base}/events",
                data=json.dumps(batch),
                headers={"Content-Type": "application/cloudevents-batch+json", "Prefer": "wait=10"},
            ) as resp,
        ):
            assert resp.status == 202
            assert "Location" not in resp.headers
            assert "Preference-Applied" not in resp.headers
            body = await resp.json()
            assert body["ids"] == [e["id"] for e in batch]
            assert body["status"] == [f"/events/{e['id']}/status" for e in batch]
            for url in body["status"]:
                doc = await status_until(http, running.base + url, lambda d: d["state"] == "delivered")
                assert doc["source"] == "/batch"
    finally:
        await conn.close()
