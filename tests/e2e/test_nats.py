"""NATS end to end: the daemon on the shipped config plus a NATS broker (the shared server, a stream it
declares), driven by nats-py, aio-pika, aiomqtt and HTTP clients as users would:

- core NATS -> JetStream and AMQP: a raw reading on ``sensors.<id>.temperature`` (a queue-group
  subscription with a wildcard) is stored in the stream with ``ce-`` headers and ``Nats-Msg-Id`` = its id,
  and reaches a RabbitMQ queue;
- JetStream -> MQTT: a binary-mode CloudEvent from the stream reaches an MQTT subscriber, and the durable
  consumer has nothing left unacknowledged;
- HTTP request-reply to a nats-py responder on the subject's reply subject, and 503 with no responder;
- ops: /readyz, /metrics, /admin/status name the NATS components; ``mediator check`` names a bad key.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from tests.adapters.test_amqp import get_one
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]


def nats_toml(u: str, url: str) -> str:
    return f"""
[brokers.nats]
kind = "nats"
servers = ["{url}"]
name = "mediator-test"

[[brokers.nats.streams]]
name = "T_{u}"
subjects = ["{u}.js.>"]
storage = "memory"

[inbound.nats-sensors]
kind = "nats"
broker = "nats"
subjects = ["{u}.sensors.*.temperature"]
queue_group = "mediator"
type = "com.example.sensor.temperature"
source = "nats://sensors/{{topic.2}}"

[inbound.nats-js]
kind = "nats"
broker = "nats"
jetstream = true
stream = "T_{u}"
subjects = ["{u}.js.in.>"]
ack_wait_s = 2.0            # what a killed daemon had fetched comes back after it

[outbound.nats-js]
kind = "nats"
broker = "nats"
jetstream = true
stream = "T_{u}"

[outbound.nats-rpc]
kind = "nats"
broker = "nats"
requests = true

[inbound.rpc-nats]
kind = "http"
listener = "http"
path = "/rpc/nats"
type = "com.example.rpc.nats"
source = "/rpc/nats"
request = true
request_timeout_s = 3.0

[[routes]]
name = "nats-sensors"
match = {{ inbound = ["nats-sensors"], topic = ["{u}.sensors.*.temperature"] }}
to = [
  {{ outbound = "nats-js", address = "{u}.js.out.{{topic.2}}" }},
  {{ outbound = "telemetry-exchange", address = "nats.{{topic.2}}" }},
]

[[routes]]
name = "nats-js"
match = {{ inbound = ["nats-js"], topic = ["{u}.js.in.>"] }}
to = [{{ outbound = "mqtt", address = "{u}/nats/{{topic.-1}}" }}]

[[routes]]
name = "rpc-nats"
match = {{ inbound = ["rpc-nats"] }}
to = [{{ outbound = "nats-rpc", address = "{u}.rpc.echo" }}]
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int], nats_url: str
) -> AsyncIterator[tuple[Quickstart, DaemonProcess, str]]:
    """One daemon for the module (each test uses subjects of its own under the module's prefix)."""
    tmp_path = tmp_path_factory.mktemp("nats-e2e")
    qs = Quickstart(tmp_path)
    u = qs.uid.replace("-", "")
    qs.extra_toml = nats_toml(u, nats_url)
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield qs, proc, u
    finally:
        code = await proc.stop(signal.SIGTERM)
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(f"T_{u}")
        finally:
            await nc.close()
        assert code == 0, f"daemon exited with {code} on SIGTERM:\n{proc.logs()}"


async def test_core_nats_to_jetstream_and_amqp(run: tuple[Quickstart, DaemonProcess, str], nats_url: str) -> None:
    qs, _, u = run
    conn = await aio_pika.connect(RABBIT_URL)
    nc = await nats.connect(nats_url)
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(qs.telemetry_exchange, "topic", durable=True)
        queue = await ch.declare_queue(exclusive=True)
        await queue.bind(ex, routing_key="nats.s7")
        await nc.publish(f"{u}.sensors.s7.temperature", b'{"celsius":21.5}')
        await nc.publish(f"{u}.sensors.s7.humidity", b'{"percent":40}')  # no subscription matches: not taken
        amqp_msg = await get_one(queue)
        sub = await nc.jetstream().pull_subscribe(f"{u}.js.out.>", stream=f"T_{u}")
        (stored,) = await sub.fetch(1, timeout=10)
        await stored.ack()
    finally:
        await nc.close()
        await conn.close()
    headers = stored.headers or {}
    assert stored.subject == f"{u}.js.out.s7"
    assert stored.data == b'{"celsius":21.5}'
    assert headers["ce-type"] == "com.example.sensor.temperature"
    assert headers["ce-source"] == "nats://sensors/s7"
    assert headers["Nats-Msg-Id"] == headers["ce-id"]  # the stream deduplicates a republish by event id
    assert amqp_msg.body == b'{"celsius":21.5}'
    assert (amqp_msg.headers or {})["cloudEvents_id"] == headers["ce-id"]


async def test_jetstream_to_mqtt_acknowledged_after_the_commit(
    run: tuple[Quickstart, DaemonProcess, str], mosquitto: tuple[str, int], nats_url: str
) -> None:
    _, _, u = run
    host, port = mosquitto
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.subscribe(f"{u}/nats/+", qos=1)
        nc = await nats.connect(nats_url)
        try:
            headers = {
                "ce-specversion": "1.0",
                "ce-id": "js-1",
                "ce-type": "com.example.valve.opened",
                "ce-source": "/plant/3",
                "Content-Type": "application/json",
            }
            ack = await nc.jetstream().publish(f"{u}.js.in.valve7", b'{"open":true}', headers=headers)
            assert ack.stream == f"T_{u}"
            async with asyncio.timeout(15):
                message = await anext(aiter(mqtt.messages))
            js = nc.jetstream()

            async def pending() -> int:
                info = await js.consumer_info(f"T_{u}", "mediator-nats-js")
                return int(info.num_ack_pending or 0) + int(info.num_pending or 0)

            async with asyncio.timeout(10):
                while await pending():
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()
    assert message.topic.value == f"{u}/nats/valve7"
    assert message.payload == b'{"open":true}'
    props = dict(getattr(message.properties, "UserProperty", []))
    assert props["id"] == "js-1"
    assert props["type"] == "com.example.valve.opened"


async def test_request_reply_over_nats(run: tuple[Quickstart, DaemonProcess, str], nats_url: str) -> None:
    qs, _, u = run
    base = f"http://127.0.0.1:{qs.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/rpc/nats", json={"q": 1}) as resp:
            no_responder = (resp.status, await resp.text())
        nc = await nats.connect(nats_url)

        async def respond(msg: Msg) -> None:
            await msg.respond(msg.data.upper())

        try:
            await nc.subscribe(f"{u}.rpc.echo", cb=respond)
            await nc.flush()
            async with http.post(f"{base}/rpc/nats", json={"q": "price"}) as resp:
                answered = (resp.status, await resp.read())
        finally:
            await nc.close()
    assert no_responder[0] == 503, no_responder
    assert "no responder" in no_responder[1]
    assert answered == (200, b'{"Q": "PRICE"}')


async def test_ops_name_the_nats_components(run: tuple[Quickstart, DaemonProcess, str]) -> None:
    qs, proc, _ = run
    base = f"http://127.0.0.1:{qs.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/admin/status") as resp:
            doc = await resp.json()
        async with http.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
    brokers = {b["name"]: {c["component"]: c["ready"] for c in b["connections"]} for b in doc["brokers"]}
    assert brokers["nats"] == {
        "inbound:nats-sensors": True,
        "inbound:nats-js": True,
        "outbound:nats-js": True,
        "outbound:nats-rpc": True,
    }
    assert {i["name"]: i["via"] for i in doc["inbounds"]}["nats-js"] == "nats"
    assert 'outbound="nats-js"' in metrics
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mediator", "status", "--config", str(proc.config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "nats-js" in out.stdout, out.stdout + out.stderr


async def test_check_names_the_bad_nats_keys(tmp_path: Path) -> None:
    qs = Quickstart(tmp_path)
    text = qs.render() + nats_toml("x", "nats://127.0.0.1:4222")
    text = text.replace('subjects = ["x.sensors.*.temperature"]', 'subjects = ["x.sensors.*t.temperature"]')
    text = text.replace('jetstream = true\nstream = "T_x"\nsubjects', "jetstream = true\nsubjects")
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mediator", "check", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    report = out.stdout + out.stderr
    assert "inbound.nats-sensors.subjects" in report, report
    assert "a wildcard must be a whole token" in report
    assert "inbound.nats-js" in report, report
    assert "needs stream" in report


async def test_kill9_mid_stream_loses_nothing_from_the_stream(
    run: tuple[Quickstart, DaemonProcess, str], mosquitto: tuple[str, int], nats_url: str
) -> None:
    """kill -9 while JetStream messages are fetched and being committed: what the daemon had not committed
    was never acknowledged, so the restarted daemon's durable consumer gets it again; every message
    reaches the MQTT subscriber (duplicates allowed: at least once)."""
    _, proc, u = run
    host, port = mosquitto
    total = 1000
    seen: set[str] = set()
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.subscribe(f"{u}/nats/+", qos=1)

        async def collect() -> None:
            async for message in mqtt.messages:
                seen.add(dict(getattr(message.properties, "UserProperty", []))["id"])

        collector = asyncio.create_task(collect())
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            acks = [
                js.publish(
                    f"{u}.js.in.k",
                    b"{}",
                    headers={"ce-specversion": "1.0", "ce-id": f"k-{n}", "ce-type": "t.k", "ce-source": "/k"},
                )
                for n in range(total)
            ]
            await asyncio.gather(*acks)
            await wait_until(lambda: len(seen) >= 50, timeout_s=20, what="the first messages through")
            await proc.kill()
            killed_at = len(seen)
            await proc.start()
            await wait_until(lambda: len(seen) == total, timeout_s=60, what=f"all {total} after the restart")
        finally:
            await nc.close()
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
    assert killed_at < total, "the kill came after everything was through: it tested nothing"
    assert seen == {f"k-{n}" for n in range(total)}
