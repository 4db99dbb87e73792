"""Every dead letter is counted under the class its reason belongs to (mediator.core.deadletter), through
the real daemon: one event per class, and ``mediator_dead_letters_total`` and the dead-letter listing's
``class`` say the same, exactly.

- unroutable: a publish to the AMQP exchange (shared RabbitMQ) under a routing key no queue is bound to
  (the mandatory publish comes back: NO_ROUTE), and an address the event cannot fill (``{subject}``);
- transform_failed: an Avro conversion of data the schema cannot hold;
- terminal: a webhook (run by the test) answering 400; exhausted: one answering 503, max_attempts = 2;
- unmatched: a type no route takes; ingress: an AMQP message whose structured body is not JSON;
- stage: an enrichment miss (Redis on 6379, no such hash) with on_miss = "dead_letter".
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web

from tests.observability.test_metrics_e2e import scrape, value
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = [pytest.mark.timeout(60)]

SCHEMA = {"type": "record", "name": "Order", "fields": [{"name": "qty", "type": "int"}]}


def extra(hook: str, uid: str) -> str:
    return f"""
[outbound.hook]
kind = "http"
url = "{hook}"
retry = {{ max_attempts = 2, backoff_initial_s = 0.05, backoff_max_s = 0.1 }}

[[routes]]
name = "dl-nobind"
match = {{ type = ["com.example.dl.nobind"] }}
to = [{{ outbound = "orders-exchange", address = "dl.nobody" }}]

[[routes]]
name = "dl-render"
match = {{ type = ["com.example.dl.render"] }}
to = [{{ outbound = "orders-exchange", address = "dl.{{subject}}" }}]

[[routes]]
name = "dl-convert"
match = {{ type = ["com.example.dl.convert"] }}
to = [{{ outbound = "orders-exchange", address = "dl.avro", convert = {{ to = "avro", avro_schema = "o.avsc" }} }}]

[[routes]]
name = "dl-refused"
match = {{ type = ["com.example.dl.refused"] }}
to = [{{ outbound = "hook", address = "/400" }}]

[[routes]]
name = "dl-exhausted"
match = {{ type = ["com.example.dl.exhausted"] }}
to = [{{ outbound = "hook", address = "/503" }}]

[[routes]]
name = "dl-stage"
match = {{ type = ["com.example.dl.stage"] }}
to = [{{ outbound = "hook", address = "/ok" }}]

[[enrich]]
name = "dl-crm"
types = ["com.example.dl.stage"]
kind = "redis"
url = "redis://127.0.0.1:6379/0"
key = "{uid}:customer:{{data.customerId}}"
into = "data.customer"
timeout_s = 2.0
on_miss = "dead_letter"
on_error = "retry"
"""


EXPECTED = {  # event type -> (outbound, class)
    "com.example.dl.nobind": ("orders-exchange", "unroutable"),
    "com.example.dl.render": ("orders-exchange", "unroutable"),
    "com.example.dl.convert": ("orders-exchange", "transform_failed"),
    "com.example.dl.refused": ("hook", "terminal"),
    "com.example.dl.exhausted": ("hook", "exhausted"),
    "com.example.dl.nothing": ("", "unmatched"),
    "com.example.dl.stage": ("", "stage"),
}


async def test_each_dead_letter_class_is_counted_and_listed_as_such(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=int(request.path.strip("/")) if request.path != "/ok" else 204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    (tmp_path / "o.avsc").write_text(json.dumps(SCHEMA))
    qs = Quickstart(tmp_path)
    qs.extra_toml = extra(f"http://127.0.0.1:{port}", qs.uid)
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await daemon.start()
    base = f"http://127.0.0.1:{qs.http_port}"
    ids: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for type_ in EXPECTED:
                ids[type_] = uuid.uuid4().hex
                data: dict[str, Any] = {"qty": "three"} if type_.endswith("convert") else {"customerId": "nobody"}
                headers = {
                    "ce-specversion": "1.0",
                    "ce-id": ids[type_],
                    "ce-source": "/dl-test",
                    "ce-type": type_,
                    "Content-Type": "application/json",
                }
                async with http.post(base + "/events", data=json.dumps(data), headers=headers) as resp:
                    assert resp.status == 202, await resp.text()
            # Ingress: a broker inbound's message that cannot be decoded (a structured event that is not JSON).
            conn = await aio_pika.connect(RABBIT_URL)
            async with conn:
                channel = await conn.channel()
                exchange = await channel.declare_exchange(
                    qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                await exchange.publish(
                    aio_pika.Message(b"{not json", content_type="application/cloudevents+json"), routing_key="d1"
                )

            want = {(o, c): 0.0 for o, c in EXPECTED.values()}
            for o, c in EXPECTED.values():
                want[o, c] += 1
            want["", "ingress"] = 1.0
            deadline = time.monotonic() + 20
            while True:
                m = await scrape(http, base + "/metrics")
                got = {
                    (dict(labels)["outbound"], dict(labels)["reason"]): v
                    for (name, labels), v in m.items()
                    if name == "mediator_dead_letters_total" and v
                }
                if got == want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert got == want, daemon.logs()[-3000:]
            failed = value(m, "mediator_delivery_attempts_failed_total", outbound="orders-exchange", reason="terminal")
            assert failed == 1, "NO_ROUTE is still a terminal attempt; its dead letter is unroutable"

            async with http.get(base + "/admin/dead-letters", params={"limit": "1000"}) as resp:
                assert resp.status == 200
                letters = (await resp.json())["dead_letters"]
    finally:
        code = await daemon.stop(signal.SIGTERM)
        await runner.cleanup()
        assert code == 0, daemon.logs()
    by_event = {d["event_id"]: d for d in letters}
    for type_, (outbound, cls) in EXPECTED.items():
        letter = by_event[ids[type_]]
        assert (letter["outbound"], letter["class"]) == (outbound, cls), letter
    assert by_event[ids["com.example.dl.nobind"]]["reason"].startswith("unroutable: exchange ")
    assert by_event[ids["com.example.dl.render"]]["reason"].startswith("unroutable: ")
    assert by_event[ids["com.example.dl.exhausted"]]["reason"].startswith("gave up after 2 attempts: HTTP 503")
    [ingress] = [d for d in letters if d["inbound"] == "commands"]
    assert ingress["class"] == "ingress"
    assert ingress["reason"].startswith("undecodable: ")
    assert len(letters) == len(EXPECTED) + 1, letters
