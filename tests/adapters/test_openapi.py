"""``GET /openapi.json`` (adapters/http/openapi.py) is true for the config being served.

A daemon (in this process, on real sockets, so the test can read its listener's router) serves a config with
every kind of path a listener has: plain, CloudEvents, templated and request-reply inbounds, a webhook
handshake, the delivery status, the admin API, health, metrics, a push outbound's subscriptions and a
WebSocket inbound. The description must be valid OpenAPI 3.1, name exactly the routes served, and
schemathesis, calling every operation with generated requests, must find no 5xx and no answer (status,
content type, body) the description does not allow.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.core.result import Ok
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from adapters.http.listener import HttpListener
from mediator.config import load
from mediator.daemon import Daemon
from mediator.registry import load_specs
from tests.support.net import RABBIT_URL, free_port, unique, wait_until
from tests.support.responders import echo, responder

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
EXAMPLES_PER_OPERATION = 25
"""Bounded: about 15 operations, a few milliseconds each (the request-reply one waits its 0.3 s timeout)."""


def config(tmp: Path, port: int, rpc_queue: str) -> str:
    return f"""
[daemon]
log_level = "warning"
log_format = "json"
drain_timeout_s = 2.0

[outbox]
path = "{tmp / "outbox.sqlite"}"

[listeners.web]
kind = "http"
host = "127.0.0.1"
port = {port}
max_body_bytes = 65536

[brokers.rabbit]
kind = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/"

[inbound.orders]
kind = "http"
listener = "web"
path = "/orders"
type = "com.example.order"
source = "/orders"

[inbound.events]
kind = "http"
listener = "web"
path = "/events"
mode = "cloudevents"
priority = "critical"
handshake = {{ allowed_origins = ["hooks.example.com"] }}

[inbound.devices]
kind = "http"
listener = "web"
path = "/devices/{{device}}/telemetry"
type = "com.example.telemetry"
source = "/devices"
accept = ["application/json", "text/plain"]

[inbound.rpc]
kind = "http"
listener = "web"
path = "/rpc"
type = "com.example.rpc"
source = "/rpc"
request = true
request_timeout_s = 0.3

[inbound.ws]
kind = "websocket"
listener = "web"
path = "/ws"

[outbound.browsers]
kind = "push"
listener = "web"
prefix = "/subscribe"

[outbound.rpc]
kind = "amqp"
broker = "rabbit"
exchange = ""
queues = ["{rpc_queue}"]

[[routes]]
name = "push"
match.inbound = ["orders", "events", "devices", "ws"]
to = [{{ outbound = "browsers", address = "all" }}]

[[routes]]
name = "rpc"
match.inbound = ["rpc"]
to = [{{ outbound = "rpc", address = "{rpc_queue}" }}]
"""


@dataclass
class Running:
    daemon: Daemon
    listener: HttpListener
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def served(tmp_path: Path, rabbitmq: str) -> AsyncIterator[Running]:
    port = free_port()
    path = tmp_path / "config.toml"
    rpc_queue = unique("t.openapi.rpc")
    path.write_text(config(tmp_path, port, rpc_queue))
    daemon = Daemon(load(path, load_specs()))
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        [listener] = [s for s in daemon.services if isinstance(s, HttpListener)]
        async with asyncio.timeout(30):
            await listener.started.wait()
        await wait_until(lambda: daemon.health.ready, timeout_s=30, what=f"ready: {daemon.health.snapshot()}")
        async with await aio_pika.connect_robust(RABBIT_URL) as amqp:
            await responder(amqp, rpc_queue, echo)  # the service behind the request-reply inbound
            yield Running(daemon, listener, port)
    finally:
        daemon.request_stop()
        async with asyncio.timeout(30):
            await task


async def fetch(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        doc = json.loads(await resp.read())
        assert isinstance(doc, dict)
        return doc


def described(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m in METHODS}


async def test_every_route_served_is_described_and_nothing_else(served: Running) -> None:
    doc = await fetch(served.base_url + "/openapi.json")
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema
    assert doc["openapi"] == "3.1.0"
    routes = {
        (r.method, r.resource.canonical)
        for r in served.listener._router.routes()
        if r.resource is not None and r.method != "HEAD"  # aiohttp's automatic HEAD for each GET
    }
    # Mounts are served before the router (mediator.core.seams.Mounts): a prefix, or a prefix and an address.
    mounts = {
        ("GET", m.prefix + "/{address}" if m.component.startswith("outbound:") else m.prefix)
        for m in served.daemon.mounts.served("web")
    }
    assert mounts == {("GET", "/subscribe/{address}"), ("GET", "/ws")}
    assert described(doc) == routes | mounts
    assert ("POST", "/devices/{device}/telemetry") in routes
    ops = {op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in METHODS}
    assert len(ops) == len(described(doc)), "operation ids must be unique"
    publish = doc["paths"]["/events"]["post"]
    assert "critical" in publish["description"]
    assert set(publish["responses"]) >= {"202", "200", "400", "401", "403", "413", "415", "429", "503"}
    rpc = doc["paths"]["/rpc"]["post"]["responses"]
    assert {"200", "502", "503", "504"} <= set(rpc)
    assert "202" not in rpc


async def test_the_description_follows_a_reload(served: Running, tmp_path: Path) -> None:
    path = Path(served.daemon.config.file)
    text = (await asyncio.to_thread(path.read_text)).replace('path = "/orders"', 'path = "/v2/orders"')
    await asyncio.to_thread(path.write_text, text)
    served.daemon.request_reload()

    async def paths() -> set[str]:
        return set((await fetch(served.base_url + "/openapi.json"))["paths"])

    async with asyncio.timeout(30):
        while "/v2/orders" not in await paths():
            await asyncio.sleep(0.1)
    assert "/orders" not in await paths()


def make_check(
    operation: Any, counts: dict[int, int], excluded: list[Any], session: requests.Session, base_url: str
) -> Any:
    """The hypothesis test of one operation (a function per operation: hypothesis takes no defaults)."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Case[Any]) -> None:
        response = case.call_and_validate(base_url=base_url, session=session, excluded_checks=excluded, timeout=10)
        counts[response.status_code] = counts.get(response.status_code, 0) + 1

    return check


def exercise(schema_url: str, base_url: str) -> dict[str, dict[int, int]]:
    """Every operation that is not a stream, with generated requests; raises at the first answer that breaks
    the description (schemathesis's checks: no 5xx, status code, content type, headers, body schema).
    Returns, per operation, how many answers of each status were seen."""
    schema = schemathesis.openapi.from_url(schema_url)
    seen: dict[str, dict[int, int]] = {}
    took: dict[str, float] = {}
    session = requests.Session()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        if operation.definition.raw.get("x-mediator-stream") or operation.definition.raw.get("x-mediator-page"):
            continue
        counts = seen.setdefault(operation.label, {})
        # A publish's content is checked against its own datacontenttype and the [validation] limits (data
        # that says JSON must parse, for one), which a JSON Schema of the envelope cannot say: a refusal of
        # such a schema-valid event is right, and its answer is still checked (status, media type, body).
        publish = "inbound" in operation.definition.raw.get("tags", [])
        # The admin actions' bodies (which ids, which replay) are described as objects: a generated {} is
        # schema-valid and rightly refused 400 for what it leaves out; the answer is still checked.
        loose = operation.definition.raw.get("x-mediator-loose-body", False)
        excluded = [positive_data_acceptance] if publish or loose else []
        started = time.monotonic()

        make_check(operation, counts, excluded, session, base_url)()
        took[operation.label] = round(time.monotonic() - started, 2)
    print("schemathesis: seconds per operation", took)
    return seen


async def test_schemathesis_finds_no_server_error_and_nothing_undescribed(served: Running) -> None:
    seen = await asyncio.to_thread(exercise, served.base_url + "/openapi.json", served.base_url)
    assert len(seen) >= 12, seen
    statuses = {s for counts in seen.values() for s in counts}
    assert not {s for s in statuses if s >= 500}, seen  # the checks raise first; this says it plainly
    assert 202 in seen["POST /orders"], seen  # generated publishes were taken, not only refused
    assert 200 in seen["GET /admin/status"], seen
    assert 200 in seen["POST /rpc"], seen  # the responder's echo
