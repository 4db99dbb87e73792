"""A reload that covers the whole config, through the real daemon over real sockets: listeners, brokers,
inbounds and outbounds added and removed while events flow (counted by sequence number), what did not
change left alone (the MQTT session is not reconnected, the HTTP listener not restarted), a reload that
cannot bind rolled back whole, and a truncated or half-written file never loaded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomqtt
import pytest

from tests.e2e.conftest import daemon
from tests.e2e.test_quickstart import get_one
from tests.support.daemon import ROOT, DaemonProcess, Quickstart, _declared
from tests.support.net import RABBIT_URL, free_port, unique

pytestmark = pytest.mark.timeout(90)


__all__ = ["daemon"]  # the end-to-end fixture, over this module's quickstart


@pytest.fixture
def quickstart(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> Quickstart:
    return Quickstart(tmp_path, overrides={"daemon": {"drain_timeout_s": 3.0}})


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    """The daemon's log lines (JSON: it does not run on a terminal) whose event is ``name``."""
    out = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            out.append(record)
    return out


async def wait_event(daemon: DaemonProcess, name: str, count: int, timeout_s: float = 20.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while len(found := events(daemon, name)) < count:
            await asyncio.sleep(0.05)
    return found[count - 1]


def reload(daemon: DaemonProcess, text: str) -> None:
    daemon.config.write_text(text)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)


async def bound_queue(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str) -> aio_pika.abc.AbstractQueue:
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(ex, key)
    return queue


class Seen:
    """Sequence numbers received on one queue (duplicates counted, not hidden)."""

    def __init__(self) -> None:
        self.seqs: list[int] = []

    async def consume(self, queue: aio_pika.abc.AbstractQueue) -> None:
        async with queue.iterator() as messages:
            async for msg in messages:
                await msg.ack()
                self.seqs.append(int(json.loads(msg.body)["seq"]))

    async def wait_for(self, wanted: set[int], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not wanted <= set(self.seqs):
                await asyncio.sleep(0.05)


async def post(http: aiohttp.ClientSession, port: int, path: str, seq: int) -> bool:
    async with http.post(f"http://127.0.0.1:{port}{path}", json={"seq": seq}) as resp:
        return resp.status == 202


def extras(q: Quickstart, port: int) -> str:
    """A listener with an inbound, a broker with an inbound, and an outbound with its route."""
    u = q.uid
    return f"""
[listeners.extra-http]
kind = "http"
port = {port}

[inbound.extra-orders]
kind = "http"
listener = "extra-http"
path = "/extra"
type = "com.example.extra"
source = "/extra"

[brokers.mosquitto2]
kind = "mqtt"
host = "127.0.0.1"
port = {q.mqtt_port}
protocol = "5"
client_id = "mediator2-{u}"

[inbound.extra-devices]
kind = "mqtt"
broker = "mosquitto2"
topics = ["{u}/extra/+"]
qos = 1
type = "com.example.extra"
source = "mqtt://127.0.0.1/extra"

[outbound.extra-exchange]
kind = "amqp"
broker = "rabbit"
exchange = "extra-{u}"
exchange_type = "topic"

[[routes]]
name = "extra"
match = {{ type = ["com.example.extra"] }}
to = [{{ outbound = "extra-exchange", address = "extra.in" }}]
"""


async def test_units_added_and_removed_while_events_flow(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    base = daemon.config.read_text()
    extra_port = free_port()
    extra_exchange = f"extra-{quickstart.uid}"
    _declared.append(([extra_exchange], []))
    devices_client = f"mediator-{quickstart.uid}-devices"
    async with (
        await aio_pika.connect(RABBIT_URL) as amqp,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as http,
    ):
        channel = await amqp.channel()
        orders, extra = Seen(), Seen()
        consumers = [
            asyncio.create_task(
                orders.consume(await bound_queue(channel, quickstart.orders_exchange, "orders.created"))
            ),
            asyncio.create_task(extra.consume(await bound_queue(channel, extra_exchange, "extra.in"))),
        ]
        accepted: set[int] = set()
        stop = asyncio.Event()

        async def flow() -> None:  # the unchanged listener's inbound, on kept-alive connections
            seq = 0
            while not stop.is_set():
                if await post(http, quickstart.http_port, "/orders", seq):
                    accepted.add(seq)
                seq += 1
                await asyncio.sleep(0.01)

        flowing = asyncio.create_task(flow())
        try:
            await asyncio.sleep(0.5)
            reload(daemon, base + extras(quickstart, extra_port))
            applied = await wait_event(daemon, "config.reloaded", 1)
            assert sorted(applied["started"]) == [
                "inbound:extra-devices",
                "listener:extra-http",
                "outbound:extra-exchange",
            ]
            assert applied["restarted"] == []
            assert applied["stopped"] == []
            # New listener with its inbound, new broker with its inbound, new outbound: all carry events.
            async with aiohttp.ClientSession() as other:
                assert all([await post(other, extra_port, "/extra", i) for i in range(20)])
            async with aiomqtt.Client("127.0.0.1", quickstart.mqtt_port, protocol=aiomqtt.ProtocolVersion.V5) as m:
                await wait_event(daemon, "inbound.connected", 2)  # devices at start, extra-devices now
                for i in range(20, 40):
                    await m.publish(f"{quickstart.uid}/extra/dev1", json.dumps({"seq": i}), qos=1)
            await extra.wait_for(set(range(40)))
            await asyncio.sleep(0.5)
            reload(daemon, base)
            removed = await wait_event(daemon, "config.reloaded", 2)
            assert sorted(removed["stopped"]) == sorted(applied["started"])
            assert removed["started"] == []
            assert removed["restarted"] == []
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as other:
                    await post(other, extra_port, "/extra", 99)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await flowing
        await orders.wait_for(accepted)
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    lost = accepted - set(orders.seqs)
    assert len(accepted) > 50
    assert not lost, f"lost {len(lost)} of {len(accepted)}"
    assert sorted(extra.seqs) == list(range(40))
    # What did not change was not touched: one MQTT session for `devices`, one start of the HTTP listener.
    assert [e.get("client_id") for e in events(daemon, "inbound.connected")].count(devices_client) == 1
    started = [e.get("port") for e in events(daemon, "listener.started")]
    assert started.count(quickstart.http_port) == 1
    assert started.count(extra_port) == 1


async def test_a_reload_that_cannot_bind_is_rolled_back_whole(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    base = daemon.config.read_text()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        async with await aio_pika.connect(RABBIT_URL) as amqp, aiohttp.ClientSession() as http:
            channel = await amqp.channel()
            queue = await bound_queue(channel, quickstart.orders_exchange, "orders.*")
            # A changed route, a changed outbound (restarted, then restored), and a listener that cannot bind.
            bad = base.replace('address = "orders.created"', 'address = "orders.revised"', 1)
            bad = bad.replace('[outbound.mqtt]\nkind = "mqtt"', '[outbound.mqtt]\nkind = "mqtt"\nmax_in_flight = 8', 1)
            bad += f'\n[listeners.taken]\nkind = "http"\nport = {port}\n'
            bad += '\n[inbound.taken]\nkind = "http"\nlistener = "taken"\npath = "/t"\ntype = "t"\nsource = "/t"\n'
            reload(daemon, bad)
            failed = await wait_event(daemon, "config.reload_failed", 1)
            assert "listener:taken" in str(failed["reason"])
            assert events(daemon, "config.reloaded") == []
            assert await post(http, quickstart.http_port, "/orders", 1)
            msg = await get_one(queue)  # polls with a deadline: aio-pika's queue.get is one basic.get
            assert msg.routing_key == "orders.created"  # the old routes still serve
            assert daemon.proc is not None
            assert daemon.proc.returncode is None
            # `mediator reload` finds the daemon by its pid file and prints the outcome (the same refusal).
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "mediator", "reload", "--config", str(daemon.config)),
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            out, _ = await cli.communicate()
            assert cli.returncode == 1
            status = json.loads(out)
            assert status["outcome"] == "failed"
            assert status["rolled_back"] is True
    finally:
        taken.close()
    started = [e.get("port") for e in events(daemon, "listener.started")]
    assert started.count(quickstart.http_port) == 1  # the unchanged listener was never stopped


async def test_truncated_and_half_written_files_are_refused(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    base = daemon.config.read_text()
    async with await aio_pika.connect(RABBIT_URL) as amqp, aiohttp.ClientSession() as http:
        channel = await amqp.channel()
        queue = await bound_queue(channel, quickstart.orders_exchange, "orders.*")

        async def delivered_key(seq: int) -> str:
            assert await post(http, quickstart.http_port, "/orders", seq)
            msg = await get_one(queue)  # polls with a deadline: aio-pika's queue.get is one basic.get
            assert json.loads(msg.body)["seq"] == seq
            return str(msg.routing_key)

        # The shipped config cut to its first 300 bytes (back to the last whole line, so that it is valid
        # TOML: the case) has no routes, no inbound, no listener: refused, and says so.
        truncated = base[:300]
        truncated = truncated[: truncated.rindex("\n") + 1]
        assert "routes" not in tomllib.loads(truncated)
        reload(daemon, truncated)
        refused = await wait_event(daemon, "config.reload_refused", 1)
        problems = " ".join(refused["problems"])
        assert "no routes" in problems
        assert "no inbound" in problems
        assert "no listener" in problems
        assert await delivered_key(1) == "orders.created"
        # Cut in the middle of a line instead: a TOML error, refused as well.
        reload(daemon, base[: base.index("[[routes]]") + 5])
        refused = await wait_event(daemon, "config.reload_refused", 2)
        assert "TOML syntax error" in " ".join(refused["problems"])
        assert await delivered_key(2) == "orders.created"

        # Written slowly, 200 bytes every 0.1 s, with a SIGHUP after the first chunk: only the whole is loaded.
        final = base.replace('address = "orders.created"', 'address = "orders.revised"', 1)
        assert daemon.proc is not None
        with daemon.config.open("w") as f:
            for i in range(0, len(final), 200):
                f.write(final[i : i + 200])
                f.flush()
                if i == 0:
                    daemon.proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.1)
        applied = await wait_event(daemon, "config.reloaded", 1)
        assert applied["version"] == hashlib.sha256(final.encode()).hexdigest()[:12]
        assert len(events(daemon, "config.reload_refused")) == 2  # the two above: nothing half-written
        assert await delivered_key(3) == "orders.revised"

        # No routes at all: refused by `mediator reload`, applied by `mediator reload --force`.
        daemon.config.write_text(final[: final.index("[[routes]]")])
        await wait_event(daemon, "config.reload_refused", 3)
        for force, code in ((False, 1), (True, 0)):
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "mediator", "reload", "--config", str(daemon.config)),
                *(["--force"] if force else []),
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            out, _ = await cli.communicate()
            assert cli.returncode == code, out
        assert json.loads(out)["outcome"] == "applied"
        assert await post(http, quickstart.http_port, "/orders", 4)  # accepted, and dead-lettered: no route
        await wait_event(daemon, "route.unmatched", 1)


def test_unit_plan_keys(tmp_path: Path) -> None:
    """The units of the shipped config: listeners with what they serve, broker connections on their own."""
    from mediator.config import load
    from mediator.registry import load_specs
    from mediator.units import plan

    config = load(Quickstart(tmp_path, uid=unique("u")).write(), load_specs())
    units = plan(config, frozenset({"authorization"}), frozenset({"admin"}))
    assert sorted(units) == [
        "inbound:commands",
        "inbound:devices",
        "inbound:rpc-mqtt",
        "listener:grpc",
        "listener:http",
        "listener:registry",  # the schema registry's own listener (8081 in the shipped config)
        "outbound:browsers",  # a push outbound is a unit of its own: it mounts itself on listener:http
        "outbound:mqtt",
        "outbound:mqtt-rpc",
        "outbound:orders-exchange",
        "outbound:rpc",
        "outbound:telemetry-exchange",
    ]
    assert sorted(units["listener:http"].section.inbounds) == [
        "cloudevents-http",
        "orders-http",
        "rpc-echo",
        "rpc-price",
    ]
    assert sorted(units["listener:grpc"].section.outbounds) == ["subscribers"]
    assert list(units["inbound:devices"].section.brokers) == ["mosquitto"]
