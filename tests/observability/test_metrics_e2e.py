"""Prometheus metrics and /admin/status of the real daemon: a known mix of events through the four
protocols (refusals, a duplicate, an unmatched event and a dead letter among them), then /metrics scraped
and parsed with prometheus-client's parser and every counter asserted exactly; `mediator status` too."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = pytest.mark.timeout(120)

ORDER = "com.example.order.created"
KEY_OPS = "mk_ops-" + "o" * 30
KEY_PUB = "mk_pub-" + "p" * 30
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def extra_toml(secured_port: int) -> str:
    return f"""
[auth.keys]
kind = "api_key"
keys_file = "api-keys.toml"

[listeners.secured]
kind = "http"
port = {secured_port}
auth = ["keys"]

[inbound.secured-http]
kind = "http"
listener = "secured"
path = "/secure"
mode = "cloudevents"
"""


@dataclass
class Observed:
    daemon: DaemonProcess
    quickstart: Quickstart
    base: str
    secured: str
    config: Path


@pytest.fixture
async def observed(tmp_path: Path) -> AsyncIterator[Observed]:
    secured_port = free_port()
    qs = Quickstart(tmp_path, extra_toml=extra_toml(secured_port))
    (tmp_path / "api-keys.toml").write_text(
        f'[[keys]]\nprincipal = "ops"\nsha256 = "{sha(KEY_OPS)}"\nroles = ["admin"]\n\n'
        f'[[keys]]\nprincipal = "pub"\nsha256 = "{sha(KEY_PUB)}"\nroles = ["publisher"]\n'
    )
    config = qs.write()
    daemon = DaemonProcess(config, qs.http_port, tmp_path / "daemon.log")
    await daemon.start()
    try:
        yield Observed(daemon, qs, f"http://127.0.0.1:{qs.http_port}", f"http://127.0.0.1:{secured_port}", config)
    finally:
        await daemon.stop()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Samples:
    async with http.get(url, headers=headers or {}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await resp.text())


def ce_headers(event_id: str, type_: str = ORDER) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/metrics-test",
        "ce-type": type_,
        "Content-Type": "application/json",
    }


async def test_metrics_count_a_known_mix_exactly(observed: Observed) -> None:
    qs = observed.quickstart
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn, aiohttp.ClientSession() as http:
        channel = await conn.channel()
        created = await bound_queue(channel, qs.orders_exchange, "orders.created")  # orders.priority: unbound
        telemetry = await bound_queue(channel, qs.telemetry_exchange, "telemetry.#")

        async def post(url: str, body: bytes, headers: dict[str, str], status: int) -> None:
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == status, await resp.text()

        json_ct = {"Content-Type": "application/json"}
        # HTTP plain: 3 orders, 1 priority order (a second route; its orders.priority key is unbound: a dead
        # letter), 1 malformed body (400, refused by the wellformed stage).
        for n in range(3):
            await post(f"{observed.base}/orders", json.dumps({"n": n}).encode(), json_ct, 202)
        await post(f"{observed.base}/orders", b'{"total": 1500.0}', json_ct, 202)
        await post(f"{observed.base}/orders", b'{"n": ', json_ct, 400)
        # Refused by the HTTP inbound itself, before the stages: a media type /orders does not take (415).
        await post(f"{observed.base}/orders", b"<order/>", {"Content-Type": "application/xml"}, 415)
        # HTTP CloudEvents: one order twice (the repeat is a duplicate), one event no route matches.
        repeated = f"dup-{uuid.uuid4()}"
        await post(f"{observed.base}/events", b"{}", ce_headers(repeated), 202)
        await post(f"{observed.base}/events", b"{}", ce_headers(repeated), 202)
        await post(f"{observed.base}/events", b"{}", ce_headers(str(uuid.uuid4()), "com.example.nothing"), 202)
        # The listener with auth: one caller without a key (401), one publisher.
        await post(f"{observed.secured}/secure", b"{}", ce_headers(str(uuid.uuid4())), 401)
        await post(f"{observed.secured}/secure", b"{}", {**ce_headers(str(uuid.uuid4())), "X-API-Key": KEY_PUB}, 202)
        # gRPC: two orders.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as rpc:
            stub = service_pb2_grpc.MediatorStub(rpc)
            for n in range(2):
                env = envelope_pb2.Envelope(id=str(uuid.uuid4()), source="/grpc", spec_version="1.0", type=ORDER)
                env.binary_data = json.dumps({"g": n}).encode()
                await stub.Publish(env)
        # MQTT: two telemetry messages, one at a time (each its own commit); AMQP: one command.
        async with aiomqtt.Client("127.0.0.1", 1883) as mqtt:
            for dev in ("d1", "d2"):
                await mqtt.publish(f"{qs.topic_prefix}devices/{dev}/telemetry", b"1", qos=1)
                got = await get_one(telemetry)
                assert got.routing_key == f"telemetry.{dev}"
        exchange = await channel.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await exchange.publish(aio_pika.Message(b"reboot", content_type="text/plain"), routing_key="d1")
        for _ in range(8):
            await get_one(created)

        sent = {"orders-exchange": 8, "mqtt": 9, "subscribers": 10, "telemetry-exchange": 2}
        url = f"{observed.base}/metrics"
        async with asyncio.timeout(20):
            while True:
                m = await scrape(http, url)
                settled = all(value(m, "mediator_deliveries_sent_total", outbound=o) >= n for o, n in sent.items())
                if settled and value(m, "mediator_dead_letters_total", outbound="orders-exchange", reason="unroutable"):
                    break
                await asyncio.sleep(0.1)

    received = {"orders-http": 6, "cloudevents-http": 3, "secured-http": 2, "grpc": 2, "devices": 2, "commands": 1}
    accepted = {"orders-http": 4, "cloudevents-http": 2, "secured-http": 1, "grpc": 2, "devices": 2, "commands": 1}
    for inbound, n in received.items():
        assert value(m, "mediator_events_received_total", inbound=inbound) == n, inbound
        assert value(m, "mediator_events_accepted_total", inbound=inbound) == accepted[inbound], inbound
    refused = {tuple(sorted(lab)): v for (name, lab), v in m.items() if name == "mediator_events_refused_total" and v}
    assert refused == {
        (("inbound", "orders-http"), ("reason", "invalid")): 1.0,
        (("inbound", "orders-http"), ("reason", "unsupported_media")): 1.0,
        (("inbound", "secured-http"), ("reason", "unauthenticated")): 1.0,
    }
    assert value(m, "mediator_events_duplicate_total", inbound="cloudevents-http") == 1
    assert value(m, "mediator_events_unmatched_total", inbound="cloudevents-http") == 1
    routed = {dict(labels)["route"]: v for (name, labels), v in m.items() if name == "mediator_events_routed_total"}
    assert routed == {"orders": 8, "priority-orders": 1, "telemetry": 2, "commands": 1}
    for outbound, n in sent.items():
        assert value(m, "mediator_deliveries_sent_total", outbound=outbound) == n, outbound
        # Every confirmed delivery has its receipt-to-confirmation latency observed once.
        assert value(m, "mediator_delivery_latency_seconds_count", outbound=outbound) == n, outbound
        assert value(m, "mediator_delivery_latency_seconds_bucket", outbound=outbound, le="+Inf") == n
        assert 0 < value(m, "mediator_delivery_latency_seconds_sum", outbound=outbound) < 20 * n
        assert value(m, "mediator_backlog_deliveries", outbound=outbound) == 0
        assert value(m, "mediator_breaker_open", outbound=outbound) == 0
    dead = {tuple(sorted(labels)): v for (name, labels), v in m.items() if name == "mediator_dead_letters_total" and v}
    assert dead == {
        (("outbound", ""), ("reason", "unmatched")): 1.0,
        (("outbound", "orders-exchange"), ("reason", "unroutable")): 1.0,  # NO_ROUTE: orders.priority is unbound
    }
    failed = {
        tuple(sorted(lab)): v for (name, lab), v in m.items() if name == "mediator_delivery_attempts_failed_total" and v
    }
    assert failed == {(("outbound", "orders-exchange"), ("reason", "terminal")): 1.0}
    assert not [k for k, v in m.items() if k[0] == "mediator_deliveries_retried_total" and v]
    # One commit per accepted call: HTTP 4 + 3 + 1, gRPC 2, MQTT 2, AMQP 1 (the refused ones never commit).
    assert value(m, "mediator_outbox_commit_seconds_count") == 13
    assert value(m, "mediator_outbox_transaction_operations_sum") >= 13
    assert value(m, "mediator_outbox_transaction_seconds_count") == value(
        m, "mediator_outbox_transaction_operations_count"
    )
    # Derived at scrape time: readiness, broker connections, the config's version; the process collectors.
    for component in ("listener:http", "listener:secured", "inbound:devices", "outbound:mqtt", "inbound:commands"):
        assert value(m, "mediator_component_ready", component=component) == 1, component
    assert value(m, "mediator_broker_connected", broker="mosquitto", component="inbound:devices") == 1
    assert value(m, "mediator_broker_connected", broker="rabbit", component="outbound:orders-exchange") == 1
    assert value(m, "mediator_broker_reconnects_total", broker="rabbit", component="inbound:commands") == 0
    version = hashlib.sha256(observed.config.read_bytes()).hexdigest()[:12]
    assert value(m, "mediator_config_info", version=version) == 1
    assert value(m, "process_cpu_seconds_total") > 0
    assert any(name == "python_gc_collections_total" for name, _ in m)
    # Labels are names the admin chose and fixed classes: no event id anywhere.
    assert not [k for k in m if repeated in str(k)]


async def test_metrics_on_a_listener_with_auth_follow_the_admin_rule(observed: Observed) -> None:
    url = f"{observed.secured}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 401
        async with http.get(url, headers={"X-API-Key": KEY_PUB}) as resp:
            assert resp.status == 403  # authenticated, without the admin role
        samples = await scrape(http, url, {"X-API-Key": KEY_OPS})
        assert value(samples, "mediator_component_ready", component="listener:secured") == 1
        # Admin requests are no events: the 401 and 403 above counted no refusal.
        assert not [k for k, v in samples.items() if k[0] == "mediator_events_refused_total" and v]
        async with http.get(f"{observed.secured}/admin/status") as resp:
            assert resp.status == 401
        async with http.get(f"{observed.base}/metrics") as resp:  # no auth on this listener: open
            assert resp.status == 200


async def test_admin_status_and_the_status_command(observed: Observed) -> None:
    qs = observed.quickstart
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{observed.base}/orders", json={"n": 1}) as resp:  # orders-exchange: unbound
            assert resp.status == 202
        async with asyncio.timeout(15):
            while True:
                async with http.get(f"{observed.base}/admin/status") as resp:
                    assert resp.status == 200
                    doc = await resp.json()
                out = {o["name"]: o for o in doc["outbounds"]}
                # The dead letter's row is readable once written, its counter once it is durable: both.
                if (
                    out["mqtt"]["sent"] == 1
                    and out["browsers"]["sent"] == 1  # the shipped orders route's push destination
                    and doc["outbox"]["pending"] == 0  # a done delivery's row goes in a lazy write (<= 0.2 s)
                    and out["orders-exchange"]["dead_lettered"]
                    and doc["outbox"]["dead_letters"]
                ):
                    break
                await asyncio.sleep(0.1)
    assert doc["ready"] is True
    assert doc["draining"] is False
    assert doc["config"]["version"] == hashlib.sha256(observed.config.read_bytes()).hexdigest()[:12]
    assert doc["config"]["file"] == str(observed.config)
    assert doc["config"]["loaded_at"].endswith("Z")
    assert {x["name"]: (x["kind"], x["ready"]) for x in doc["listeners"]} == {
        "http": ("http", True),
        "grpc": ("grpc", True),
        "registry": ("http", True),  # the shipped config's schema registry listener
        "secured": ("http", True),
    }
    brokers = {b["name"]: {c["component"]: c["ready"] for c in b["connections"]} for b in doc["brokers"]}
    assert brokers["mosquitto"] == {
        "inbound:devices": True,
        "inbound:rpc-mqtt": True,
        "outbound:mqtt": True,
        "outbound:mqtt-rpc": True,
    }
    assert brokers["rabbit"] == {
        "inbound:commands": True,
        "outbound:orders-exchange": True,
        "outbound:rpc": True,
        "outbound:telemetry-exchange": True,
    }
    orders = next(i for i in doc["inbounds"] if i["name"] == "orders-http")
    assert (orders["via"], orders["received"], orders["accepted"], orders["refused"]) == ("http", 1, 1, {})
    assert out["orders-exchange"]["dead_lettered"] == {"unroutable": 1}
    assert out["orders-exchange"]["breaker"] == "closed"
    assert (out["subscribers"]["sent"], out["subscribers"]["backlog"]) == (1, 0)
    assert {r["name"]: r["routed"] for r in doc["routes"]}["orders"] == 1
    assert doc["outbox"]["kind"] == "sqlite"
    assert doc["outbox"]["pending"] == 0
    assert doc["outbox"]["oldest_pending"] is None

    def status(*flags: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mediator", "status", "--config", str(observed.config), *flags]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)

    as_json = await asyncio.to_thread(status, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["config"]["version"] == doc["config"]["version"]
    as_table = await asyncio.to_thread(status, "--table")
    assert as_table.returncode == 0, as_table.stderr
    lines = as_table.stdout.splitlines()
    assert lines[0].endswith(": ready")
    assert any(line.split()[:4] == ["orders-exchange", "amqp", "ready", "0"] for line in lines), as_table.stdout
    assert any(line.split()[:3] == ["orders-http", "http", "http"] for line in lines), as_table.stdout
    assert "outbox (sqlite): 0 pending, 1 dead letters" in as_table.stdout
    assert qs.uid  # the daemon ran on its own names


async def test_status_of_an_outbox_with_a_pending_delivery(tmp_path: Path) -> None:
    """The outbox's stats: count and the oldest pending delivery, from its own thread (SQLite) or memory."""
    from mediator.core.envelope import Envelope
    from mediator.core.router import Delivery
    from mediator.outbox import MemoryOutbox, SqliteOutbox
    from mediator.outbox.base import Accepted

    for outbox in (SqliteOutbox(tmp_path / "o.sqlite"), MemoryOutbox()):
        await outbox.open()
        try:
            assert (await outbox.stats()).pending == 0
            first, second = Envelope(id="a"), Envelope(id="b")
            first.provenance.received.FromSeconds(1_700_000_000)
            second.provenance.received.FromSeconds(1_700_000_100)
            to = [Delivery("r", "out", "x", "binary")]
            await outbox.commit([Accepted(first, to), Accepted(second, to)])
            stats = await outbox.stats()
            assert (stats.pending, stats.dead_letters, stats.oldest_outbound, stats.oldest_route) == (2, 0, "out", "r")
            assert stats.oldest_received == 1_700_000_000
        finally:
            await outbox.close()


async def test_metrics_off_count_nothing_and_the_events_still_flow(tmp_path: Path) -> None:
    """``[metrics] enabled = false``: no ``/metrics``, ``/admin/status`` says it counts nothing, and the
    pipe is what it was (an order posted over HTTP reaches its AMQP consumer)."""
    qs = Quickstart(tmp_path, extra_toml="\n[metrics]\nenabled = false\n")
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await daemon.start()
    base = f"http://127.0.0.1:{qs.http_port}"
    try:
        conn = await aio_pika.connect(RABBIT_URL)
        async with conn, aiohttp.ClientSession() as http:
            channel = await conn.channel()
            created = await bound_queue(channel, qs.orders_exchange, "orders.created")
            async with http.post(f"{base}/orders", json={"n": 7}) as resp:
                assert resp.status == 202
            assert json.loads((await get_one(created)).body) == {"n": 7}
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 404
            async with http.get(f"{base}/admin/status") as resp:
                assert resp.status == 200
                doc = await resp.json()
            assert doc["counting"] is False
            assert {o["name"]: o["sent"] for o in doc["outbounds"]}["orders-exchange"] == 0
    finally:
        await daemon.stop()
