"""Tracing end to end: the real daemon with ``[tracing]`` on, exporting over real OTLP/HTTP to a receiver
this test runs (aiohttp, ``POST /v1/traces``, protobuf bodies decoded with opentelemetry-proto), and real
consumers on the shared RabbitMQ and Mosquitto reading the carriers the daemon wrote.

Each test checks the trace a consumer sees against the spans the receiver got: the same trace id as the
sender's, and a parent span id that is the daemon's send span."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.parser import text_string_to_metric_families

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue, get_one, user_props
from tests.push.clients import open_sse
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = [pytest.mark.timeout(60), pytest.mark.broker]

HOOKED, DOOMED = "com.example.hooked", "com.example.doomed"


def new_trace() -> tuple[str, str]:
    """A trace id and a span id as a caller's tracer would make them."""
    return uuid.uuid4().hex, uuid.uuid4().hex[:16]


def parent_of(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01"), traceparent
    return trace_id, span_id


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded."""

    port: int = field(default_factory=free_port)
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        self.requests += 1
        for resource in export.resource_spans:
            names = {a.key: a.value.string_value for a in resource.resource.attributes}
            assert names["service.name"] == "mediator-test"
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def of_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id.hex() == trace_id]

    async def wait(self, trace_id: str, done: Callable[[list[Span]], bool], timeout_s: float = 15.0) -> list[Span]:
        async with asyncio.timeout(timeout_s):
            while not done(self.of_trace(trace_id)):
                await asyncio.sleep(0.05)
        return self.of_trace(trace_id)


SENDS = ("send orders-exchange", "send mqtt")


def named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def one(spans: list[Span], name: str) -> Span:
    found = named(spans, name)
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def attrs(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


@dataclass
class Webhook:
    """A webhook that answers from a script per path (then 200), recording the traceparent of each call."""

    port: int = field(default_factory=free_port)
    script: dict[str, list[int]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (path, traceparent)
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.calls.append((path, request.headers.get("traceparent", "")))
        answers = self.script.get(path, [])
        return web.Response(status=answers.pop(0) if answers else 200)


@dataclass
class Traced:
    quickstart: Quickstart
    daemon: DaemonProcess
    receiver: OtlpReceiver
    webhook: Webhook


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[Traced]:
    receiver, webhook = OtlpReceiver(), Webhook(script={"flaky": [503], "refuse": [400, 400]})
    await receiver.start()
    await webhook.start()
    extra = f"""
[outbound.hook]
kind = "http"
url = "http://127.0.0.1:{webhook.port}"
retry = {{ max_attempts = 3, backoff_initial_s = 0.05, backoff_max_s = 0.1 }}

[[routes]]
name = "hooked"
match = {{ type = ["{HOOKED}"] }}
to = [{{ outbound = "hook", address = "/flaky" }}]

[[routes]]
name = "doomed"
match = {{ type = ["{DOOMED}"] }}
to = [{{ outbound = "hook", address = "/refuse" }}]

[tracing]
enabled = true
endpoint = "http://127.0.0.1:{receiver.port}/v1/traces"
service_name = "mediator-test"
schedule_delay_s = 0.05
"""
    qs = Quickstart(tmp_path, extra_toml=extra)
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield Traced(qs, proc, receiver, webhook)
    finally:
        await proc.stop()
        await webhook.stop()
        await receiver.stop()


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        yield await conn.channel()


async def test_http_to_amqp_and_mqtt5_one_trace_parented_on_the_send_spans(
    traced: Traced, amqp: aio_pika.abc.AbstractChannel
) -> None:
    qs, receiver = traced.quickstart, traced.receiver
    trace_id, client_span = new_trace()
    caller = f"00-{trace_id}-{client_span}-01"
    queue = await bound_queue(amqp, qs.orders_exchange, "orders.created")
    topic = f"{qs.topic_prefix}orders/created"
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.subscribe(topic, qos=1)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{qs.http_port}/orders",
                json={"order": 1},
                headers={"traceparent": caller, "tracestate": "vendor=x"},
            ) as resp,
        ):
            assert resp.status == 202, await resp.text()
            event_id = (await resp.json())["id"]
        async with asyncio.timeout(15):
            message = await anext(aiter(mqtt.messages))
    got = await get_one(queue)

    spans = await receiver.wait(trace_id, lambda s: all(named(s, n) for n in ("POST /orders", *SENDS)))
    server = one(spans, "POST /orders")
    assert server.kind == Span.SPAN_KIND_SERVER
    assert server.parent_span_id.hex() == client_span  # the caller's span is the receive span's parent
    assert attrs(server)["messaging.message.id"] == event_id

    # AMQP: the traceparent header is the send span; cloudEvents_traceparent is the event's creation context.
    amqp_trace, amqp_parent = parent_of(str(got.headers["traceparent"]))
    assert amqp_trace == trace_id
    send_amqp = one(spans, "send orders-exchange")
    assert send_amqp.kind == Span.SPAN_KIND_PRODUCER
    assert send_amqp.span_id.hex() == amqp_parent
    assert send_amqp.parent_span_id == server.span_id
    assert got.headers["cloudEvents_traceparent"] == caller  # unchanged across the hop
    assert got.headers["tracestate"] == "vendor=x"
    assert not send_amqp.links  # the creation context is an ancestor in this trace: no link needed
    assert attrs(send_amqp)["messaging.destination.name"] == "orders.created"
    assert attrs(send_amqp)["messaging.system"] == "rabbitmq"

    # MQTT 5: the traceparent user property is the send span (it wins over the event's attribute of that name).
    mqtt_trace, mqtt_parent = parent_of(user_props(message)["traceparent"])
    assert mqtt_trace == trace_id
    send_mqtt = one(spans, "send mqtt")
    assert send_mqtt.span_id.hex() == mqtt_parent
    assert send_mqtt.parent_span_id == server.span_id
    assert send_amqp.status.code == Status.STATUS_CODE_UNSET

    # The daemon counts what it exported: every span the receiver got, nothing dropped or failed.
    async with aiohttp.ClientSession() as http, asyncio.timeout(15):
        while True:
            async with http.get(f"http://127.0.0.1:{qs.http_port}/metrics") as resp:
                outcomes = {
                    s.labels["outcome"]: s.value
                    for family in text_string_to_metric_families(await resp.text())
                    if family.name == "mediator_spans"
                    for s in family.samples
                    if s.name == "mediator_spans_total"
                }
            if outcomes.get("exported", 0) >= len(receiver.spans):
                break
            await asyncio.sleep(0.05)
    assert outcomes["exported"] >= len(spans) >= 4
    assert outcomes["dropped"] == outcomes["failed"] == 0


async def test_a_pushed_event_continues_the_callers_trace(traced: Traced) -> None:
    """The shipped orders route also pushes to ``browsers`` at ``orders``: the subscriber's event carries the
    creation context (the CloudEvents ``traceparent`` extension, the caller's), and the daemon's push is a
    PRODUCER span of that trace, parented on the receive span, naming the address."""
    qs, receiver = traced.quickstart, traced.receiver
    trace_id, client_span = new_trace()
    caller = f"00-{trace_id}-{client_span}-01"
    base = f"http://127.0.0.1:{qs.http_port}"
    async with aiohttp.ClientSession() as http:
        stream = await open_sse(http, f"{base}/subscribe/orders")
        async with http.post(f"{base}/orders", json={"order": "traced"}, headers={"traceparent": caller}) as resp:
            assert resp.status == 202, await resp.text()
            event_id = (await resp.json())["id"]
        pushed = await stream.next()
        stream.response.close()
    assert pushed is not None
    event = pushed.json()
    assert (event["id"], event["traceparent"]) == (event_id, caller)
    spans = await receiver.wait(trace_id, lambda s: bool(named(s, "POST /orders") and named(s, "send browsers")))
    server, push = one(spans, "POST /orders"), one(spans, "send browsers")
    assert push.kind == Span.SPAN_KIND_PRODUCER
    assert push.parent_span_id == server.span_id
    assert attrs(push)["messaging.system"] == "push"
    assert attrs(push)["messaging.destination.name"] == "orders"
    assert attrs(push)["messaging.message.id"] == event_id
    assert push.status.code == Status.STATUS_CODE_UNSET


async def test_grpc_to_amqp(traced: Traced, amqp: aio_pika.abc.AbstractChannel) -> None:
    qs, receiver = traced.quickstart, traced.receiver
    trace_id, client_span = new_trace()
    queue = await bound_queue(amqp, qs.orders_exchange, "orders.created")
    env = envelope_pb2.Envelope(
        id=f"grpc-{uuid.uuid4()}", source="/grpc-test", spec_version="1.0", type="com.example.order.created"
    )
    env.binary_data = b'{"order": 2}'
    async with grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as channel:
        stub = service_pb2_grpc.MediatorStub(channel)
        await stub.Publish(env, metadata=(("traceparent", f"00-{trace_id}-{client_span}-01"),))
    got = await get_one(queue)
    while got.message_id != env.id:
        got = await get_one(queue)

    spans = await receiver.wait(
        trace_id, lambda s: all(named(s, n) for n in ("mediator.v1.Mediator/Publish", "send orders-exchange"))
    )
    server = one(spans, "mediator.v1.Mediator/Publish")
    assert server.kind == Span.SPAN_KIND_SERVER
    assert server.parent_span_id.hex() == client_span
    consumer_trace, consumer_parent = parent_of(str(got.headers["traceparent"]))
    send = one(spans, "send orders-exchange")
    assert (consumer_trace, consumer_parent) == (trace_id, send.span_id.hex())
    assert send.parent_span_id == server.span_id
    # The event came without a CloudEvents traceparent: it was created here, in the receive span.
    assert got.headers["cloudEvents_traceparent"] == f"00-{trace_id}-{server.span_id.hex()}-01"


async def test_amqp_to_mqtt5_hop_header_parents_the_consumer_span(
    traced: Traced, amqp: aio_pika.abc.AbstractChannel
) -> None:
    """The AMQP ``traceparent`` header is the hop (the consumer span's parent), ``cloudEvents_traceparent``
    the event's own (a link of the send span); on MQTT 5 the send span wins the ``traceparent`` property."""
    qs, receiver = traced.quickstart, traced.receiver
    trace_id, upstream_send = new_trace()
    created_trace, created_span = new_trace()
    creation = f"00-{created_trace}-{created_span}-01"
    exchange = await amqp.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    topic = f"{qs.topic_prefix}devices/dev7/commands"
    headers: dict[str, object] = {
        "cloudEvents_specversion": "1.0",
        "cloudEvents_id": f"cmd-{uuid.uuid4()}",
        "cloudEvents_source": "/back-office",
        "cloudEvents_type": "com.example.device.command",
        "cloudEvents_traceparent": creation,
        "traceparent": f"00-{trace_id}-{upstream_send}-01",
    }
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
        await mqtt.subscribe(topic, qos=1)
        await exchange.publish(
            aio_pika.Message(b"reboot", content_type="text/plain", headers=headers),  # type: ignore[arg-type]
            routing_key="dev7",
        )
        async with asyncio.timeout(15):
            message = await anext(aiter(mqtt.messages))

    spans = await receiver.wait(trace_id, lambda s: all(named(s, n) for n in ("process commands", "send mqtt")))
    consumer = one(spans, "process commands")
    assert consumer.kind == Span.SPAN_KIND_CONSUMER
    assert consumer.parent_span_id.hex() == upstream_send
    assert attrs(consumer)["messaging.system"] == "rabbitmq"
    send = one(spans, "send mqtt")
    assert send.parent_span_id == consumer.span_id
    assert parent_of(user_props(message)["traceparent"]) == (trace_id, send.span_id.hex())
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in send.links] == [(created_trace, created_span)]


async def test_a_retry_is_two_send_spans_and_the_webhook_sees_the_second(traced: Traced) -> None:
    qs, receiver, webhook = traced.quickstart, traced.receiver, traced.webhook
    trace_id, client_span = new_trace()
    await _post_binary(qs, HOOKED, f"00-{trace_id}-{client_span}-01")
    spans = await receiver.wait(trace_id, lambda s: len(named(s, "send hook")) >= 2 and bool(named(s, "POST /events")))
    server = one(spans, "POST /events")
    first, second = sorted(named(spans, "send hook"), key=lambda s: s.start_time_unix_nano)
    assert first.status.code == Status.STATUS_CODE_ERROR
    assert "HTTP 503" in first.status.message
    assert second.status.code == Status.STATUS_CODE_UNSET
    assert first.parent_span_id == second.parent_span_id == server.span_id
    assert first.span_id != second.span_id
    # Each attempt carried its own span as the receiver's parent.
    assert [parent_of(tp) for path, tp in webhook.calls if path == "flaky"] == [
        (trace_id, first.span_id.hex()),
        (trace_id, second.span_id.hex()),
    ]


async def test_a_dead_letter_span_has_error_status_and_the_reason(traced: Traced) -> None:
    qs, receiver = traced.quickstart, traced.receiver
    trace_id, client_span = new_trace()
    await _post_binary(qs, DOOMED, f"00-{trace_id}-{client_span}-01")
    spans = await receiver.wait(
        trace_id, lambda s: all(named(s, n) for n in ("dead_letter hook", "send hook", "POST /events"))
    )
    dead = one(spans, "dead_letter hook")
    assert dead.status.code == Status.STATUS_CODE_ERROR
    assert "HTTP 400" in dead.status.message
    assert attrs(dead)["error.type"] == "dead_letter"
    assert attrs(dead)["mediator.delivery.attempts"] == 1
    send = one(spans, "send hook")
    assert send.status.code == Status.STATUS_CODE_ERROR
    assert dead.parent_span_id == send.parent_span_id == one(spans, "POST /events").span_id


async def _post_binary(qs: Quickstart, type_: str, traceparent: str) -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": str(uuid.uuid4()),
        "ce-source": "/tests",
        "ce-type": type_,
        "Content-Type": "application/json",
        "traceparent": traceparent,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{qs.http_port}/events", data=b"{}", headers=headers) as resp,
    ):
        assert resp.status == 202, await resp.text()
