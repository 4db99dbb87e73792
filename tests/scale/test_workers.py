"""``[daemon] workers = 2`` on the shipped quickstart config: one supervisor, two worker processes.

Counted per worker through what the daemon itself reports for the whole daemon: one ``/metrics`` on the
shared HTTP port, whose samples carry ``worker="K"`` (``mediator_events_accepted_total`` per inbound and
worker), checked against one ``/admin/status`` (summed) and against the events the consumers counted by
sequence number. The producers spread the way clients do: HTTP opens a new connection per request and gRPC
a new channel every few events (SO_REUSEPORT hashes each connection to a worker), MQTT goes through the
shared subscription (Mosquitto hands each message to one worker's session), AMQP through the one queue
both workers consume. Mosquitto is the test's own (a worker killed with ``kill -9`` leaves its session's
messages queued there until its replacement reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from mediator.v1 import service_pb2_grpc
from tests.faults.test_crash_faults import (
    RETRY_S,
    SEND_TIMEOUT_S,
    Books,
    MqttReceiver,
    Producers,
    Sent,
    amqp_producer,
    consuming,
    declare_queue,
    delete_queue,
    drain,
    fast,
    grpc_event,
    http_producer,
    mosquitto_own,
    mqtt_producer,
    until,
)
from tests.support.brokers import MosquittoInstance
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import unique

__all__ = ["mosquitto_own"]  # the fixture, imported for the tests below

MAX_EVENTS = 400  # per producer
PACE_S = 0.003
INBOUNDS = ("orders-http", "grpc", "devices", "commands")


async def grpc_spread(port: int, uid: str, sent: Sent, stop: asyncio.Event, limit: int = MAX_EVENTS) -> None:
    """Unary Publish, a new channel (connection) every 10 events."""
    seq = 0
    while seq < limit and not stop.is_set():
        try:
            # A channel of its own connection: by default channels to one target share a subchannel.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = service_pb2_grpc.MediatorStub(channel)
                for _ in range(10):
                    if seq >= limit or stop.is_set():
                        break
                    sent.attempted.add(seq)
                    await stub.Publish(grpc_event(uid, (sent.pid, seq)), timeout=SEND_TIMEOUT_S)
                    sent.acked.add(seq)
                    seq += 1
                    await asyncio.sleep(PACE_S)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(RETRY_S)


async def get(port: int, path: str) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        assert resp.status == 200, (path, resp.status, await resp.text())
        if resp.content_type == "application/json":
            return await resp.json()
        return await resp.text()


def accepted_by_worker(metrics: str) -> dict[tuple[str, str], float]:
    """(inbound, worker) -> mediator_events_accepted_total, from one exposition."""
    out: dict[tuple[str, str], float] = {}
    for line in metrics.splitlines():
        if not line.startswith("mediator_events_accepted_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        out[(labels["inbound"], labels["worker"])] = float(line.rsplit(" ", 1)[1])
    return out


async def worker_pids(port: int) -> dict[str, int]:
    status = await get(port, "/admin/status")
    return {k: int(v["pid"]) for k, v in status["workers"].items()}


async def all_answering(port: int) -> bool:
    try:
        status = await get(port, "/admin/status")
    except (AssertionError, aiohttp.ClientError, TimeoutError):
        return False
    return bool(status.get("workers_answering") == 2 and status.get("ready"))


class Rig:
    """The daemon with two workers, its consumers and producers on all four inbounds."""

    def __init__(self, tmp: Path, rabbitmq: str, mosquitto: MosquittoInstance) -> None:
        self.qs = Quickstart(tmp, mqtt_port=mosquitto.port, overrides=fast({"daemon": {"workers": 2}}))
        self.rabbitmq = rabbitmq
        self.mosquitto = mosquitto
        self.tmp = tmp
        self.books = Books()
        self.producers = Producers()
        self.queue = unique("scale.workers")
        self.daemon = DaemonProcess(self.qs.write(), self.qs.http_port, tmp / "daemon.log")
        self.books.flow("http->amqp", "amqp", ["h0", "h1"])
        self.books.flow("grpc->amqp", "amqp", ["g0", "g1"])
        self.books.flow("mqtt->amqp", "amqp", ["m0", "m1"])
        self.books.flow("amqp->mqtt", "mqtt", ["a0", "a1"])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        qs = self.qs
        await declare_queue(
            self.rabbitmq,
            self.queue,
            [(qs.orders_exchange, "orders.created"), (qs.telemetry_exchange, "telemetry.#")],
        )
        receiver = MqttReceiver(self.mosquitto.port, [f"{qs.topic_prefix}devices/+/commands"], self.books, "mqtt")
        try:
            await self.daemon.start(timeout_s=60)
            await self._until_both_answer()
            async with consuming(self.rabbitmq, self.queue, self.books, "amqp"), receiver:
                yield
        finally:
            await self.producers.cancel()
            if self.daemon.proc is not None and self.daemon.proc.returncode is None:
                try:
                    await self.daemon.stop(timeout_s=30)
                except TimeoutError:
                    await self.daemon.kill()
            await delete_queue(self.rabbitmq, self.queue)

    async def _until_both_answer(self) -> None:
        async with asyncio.timeout(60):
            while not await all_answering(self.qs.http_port):
                await asyncio.sleep(0.2)

    def start(self, limit: int = MAX_EVENTS) -> None:
        qs, books, stop = self.qs, self.books, self.producers.stop
        for pid in ("h0", "h1"):
            self.producers.start(
                pid, http_producer(qs.http_port, books.sender(pid), stop, PACE_S, limit=limit, new_connections=True)
            )
        for pid in ("g0", "g1"):
            self.producers.start(pid, grpc_spread(qs.grpc_port, qs.uid, books.sender(pid), stop, limit))
        for pid in ("m0", "m1"):
            topic = f"{qs.topic_prefix}devices/{pid}/telemetry"
            self.producers.start(pid, mqtt_producer(self.mosquitto.port, topic, books.sender(pid), stop, PACE_S))
        for pid in ("a0", "a1"):
            self.producers.start(
                pid, amqp_producer(self.rabbitmq, qs.commands_exchange, pid, books.sender(pid), stop, PACE_S)
            )

    async def until_each_acked(self, n: int, timeout_s: float = 40) -> None:
        senders = self.books.senders.values()
        await until(lambda: all(len(s.acked) >= n for s in senders), timeout_s, f"{n} acks each", self.why)

    def why(self) -> str:
        return self.books.report("so far") + "\n" + self.daemon.logs()[-4000:]

    async def sigterm(self) -> None:
        code = await self.daemon.stop(signal.SIGTERM, timeout_s=40)
        logs = self.daemon.log_path.read_text(errors="replace")
        assert code == 0, f"the supervisor exited with {code}:\n{self.daemon.logs()}"
        stopped = re.findall(r'"worker": (\d), "pid": \d+, "code": (-?\d+), "event": "worker.stopped"', logs)
        assert sorted(stopped) == [("1", "0"), ("2", "0")], stopped
        assert '"undelivered": 0, "event": "daemon.stopped", "worker": 1' in logs
        assert '"undelivered": 0, "event": "daemon.stopped", "worker": 2' in logs


@pytest.mark.timeout(90)
async def test_two_workers_share_all_four_inbounds_and_answer_as_one(
    tmp_path: Path, rabbitmq: str, mosquitto_own: MosquittoInstance
) -> None:
    """Events over HTTP, gRPC, MQTT and AMQP are accepted by both workers (per-worker counters of the one
    /metrics), the one /admin/status sums them, every acknowledged event arrives, dead letters of both
    outboxes are listed and replayed through the shared port, and SIGTERM drains both workers (exit 0)."""
    rig = Rig(tmp_path, rabbitmq, mosquitto_own)
    async with rig.running():
        port = rig.qs.http_port
        rig.start(limit=150)
        await rig.until_each_acked(150)
        await rig.producers.finish(timeout_s=40)
        await drain(rig.books, rig.daemon, "workers = 2")
        rig.books.check("workers = 2", max_duplicates=0)

        metrics = await get(port, "/metrics")
        per_worker = accepted_by_worker(metrics)
        for inbound in INBOUNDS:
            counts = {w: per_worker.get((inbound, w), 0.0) for w in ("1", "2")}
            print(f"{inbound}: accepted per worker {counts}")
            assert all(n > 0 for n in counts.values()), f"{inbound} did not reach both workers: {counts}"
        status = await get(port, "/admin/status")
        assert status["workers_answering"] == 2
        assert status["ready"] is True
        summed = {i["name"]: i["accepted"] for i in status["inbounds"]}
        for inbound, flow in (("orders-http", "http->amqp"), ("grpc", "grpc->amqp"), ("devices", "mqtt->amqp")):
            from_metrics = sum(n for (i, _), n in per_worker.items() if i == inbound)
            assert summed[inbound] == from_metrics == len(rig.books.flows[flow].acked()), (inbound, summed)

        # Dead letters of both outboxes, through whichever worker takes the request: an order over 1000 also
        # goes to orders.priority, which no queue is bound to, so each worker that accepts one keeps a
        # (replayable) dead letter of it.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for i in range(20):
                headers = {"ce-id": f"dl-{i}", "ce-source": "/scale", "ce-type": "com.example.order.created"}
                headers |= {"ce-specversion": "1.0", "content-type": "application/json"}
                body = b'{"total": 5000}'
                async with http.post(f"http://127.0.0.1:{port}/events", data=body, headers=headers) as resp:
                    assert resp.status == 202
        # A dead letter is written once the broker has returned the unroutable publish: after the 202.
        deadline = time.monotonic() + 15
        while True:
            letters = (await get(port, "/admin/dead-letters?limit=100"))["dead_letters"]
            ours = [d for d in letters if d["source"] == "/scale" and d["replayable"]]
            if len(ours) >= 20 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert {d["worker"] for d in ours} == {1, 2}, ours
        assert len({d["id"] for d in letters}) == len(letters)
        assert len(ours) == 20
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{port}/admin/dead-letters/replay", json={"ids": [ours[0]["id"]]}) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["replayed"] == 1
        await rig.sigterm()


@pytest.mark.timeout(90)
async def test_worker_killed_with_kill9_is_replaced_and_nothing_is_lost(
    tmp_path: Path, rabbitmq: str, mosquitto_own: MosquittoInstance
) -> None:
    """kill -9 of one worker while all four inbounds carry events: the supervisor starts a new worker with
    the same index (and outbox), every event a producer saw acknowledged arrives, then SIGTERM drains."""
    rig = Rig(tmp_path, rabbitmq, mosquitto_own)
    async with rig.running():
        port = rig.qs.http_port
        before = await worker_pids(port)
        rig.start()
        await until(
            lambda: rig.books.acked() >= 300, 30, "the first acknowledgements", lambda: rig.books.report("kill")
        )
        victim = before["2"]
        os.kill(victim, signal.SIGKILL)
        at_kill = rig.books.acked()
        await until(
            lambda: '"worker": 2, "pid"' in rig.daemon.logs() and '"restarts": 1' in rig.daemon.logs(),
            20,
            "the replacement of worker 2",
            rig.daemon.logs,
        )
        await rig._until_both_answer()
        after = await worker_pids(port)
        assert after["1"] == before["1"], (before, after)
        assert after["2"] != victim, (before, after)
        await until(lambda: rig.books.acked() >= at_kill + 300, 30, "acks after the replacement", rig.why)
        await rig.producers.finish(timeout_s=40)
        await drain(rig.books, rig.daemon, "kill -9 of worker 2")
        print(f"acked at the kill: {at_kill}")
        rig.books.check("kill -9 of worker 2")
        assert f"{rig.qs.outbox_file}.w2" in rig.daemon.logs()  # the replacement opened worker 2's outbox
        await rig.sigterm()
