"""The AMQP adapter against the shared RabbitMQ: inbound decoding and acknowledgement, outbound publishing
read back by an independent aio-pika consumer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from adapters.amqp import ADAPTER, AmqpInbound, AmqpOutbound, build, speedups
from adapters.amqp import inbound as amqp_inbound
from adapters.amqp.config import AmqpBrokerConfig, AmqpInboundConfig, AmqpOutboundConfig
from mediator.core.deadletter import UNROUTABLE, classify
from mediator.core.envelope import Envelope, attribute, context_attributes, data_bytes, new_event
from mediator.core.errors import (
    ConfigError,
    NotReady,
    RetryableDeliveryError,
    TerminalDeliveryError,
)
from mediator.core.formats import from_protobuf, to_protobuf
from mediator.core.health import Health
from mediator.core.ingress import Origin
from mediator.core.seams import AdapterConfig, Runtime
from tests.support.fakes import ListSink
from tests.support.net import free_port, unique, wait_until

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers (also used by the restart test)


def is_ready(health: Health, component: str) -> Callable[[], bool]:
    return lambda: bool(health.snapshot().get(component, {}).get("ready"))


@contextlib.asynccontextmanager
async def running(service: AmqpInbound | AmqpOutbound) -> AsyncIterator[asyncio.Task[None]]:
    """Run a service (or an outbound's link) in a task; cancel it and check it stopped cleanly."""
    svc = service.link if isinstance(service, AmqpOutbound) else service
    task = asyncio.create_task(svc.run(), name=svc.name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task
        assert task.cancelled(), "run() must end by re-raising CancelledError"


def inbound_config(queue: str, exchange: str, **extra: Any) -> AmqpInboundConfig:
    return AmqpInboundConfig.model_validate(
        {
            "kind": "amqp",
            "broker": "rabbit",
            "queue": queue,
            "bindings": [{"exchange": exchange, "routing_key": "#"}],
            **extra,
        }
    )


def outbound_config(exchange: str, **extra: Any) -> AmqpOutboundConfig:
    return AmqpOutboundConfig.model_validate({"kind": "amqp", "broker": "rabbit", "exchange": exchange, **extra})


def broker_config(url: str, **extra: Any) -> AmqpBrokerConfig:
    return AmqpBrokerConfig.model_validate({"url": url, "reconnect_initial_s": 0.1, **extra})


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[AbstractChannel]:
    """An independent aio-pika client (plain connection) for publishing and reading back."""
    conn = await aio_pika.connect(url, timeout=5)
    try:
        yield await conn.channel()
    finally:
        await conn.close()


async def get_one(queue: AbstractQueue, timeout_s: float = 10.0) -> AbstractIncomingMessage:
    deadline = time.monotonic() + timeout_s
    while True:
        msg = await queue.get(fail=False, timeout=5)
        if msg is not None:
            await msg.ack()
            return msg
        if time.monotonic() > deadline:
            raise AssertionError(f"no message on {queue.name} within {timeout_s} s")
        await asyncio.sleep(0.02)


async def ready_count(url: str, queue: str) -> int:
    async with client(url) as ch:
        q = await ch.declare_queue(queue, passive=True)
        count = q.declaration_result.message_count
        assert count is not None
        return count


async def cleanup(url: str, queues: Sequence[str] = (), exchanges: Sequence[str] = ()) -> None:
    async with client(url) as ch:
        for q in queues:
            await ch.queue_delete(q)
        for ex in exchanges:
            await ch.exchange_delete(ex)


class _Inbound:
    """An inbound consuming ``queue`` bound to topic exchange ``exchange``, running against ``url``."""

    def __init__(self, url: str, sink: ListSink, name: str = "commands", **extra: Any) -> None:
        self.url = url
        self.sink = sink
        self.health = Health()
        self.queue = unique("t.in")
        self.exchange = unique("t.ex")
        self.name = name
        self.cfg = inbound_config(self.queue, self.exchange, **extra)
        self.service = AmqpInbound(name, self.cfg, broker_config(url), url, Runtime(sink=sink, health=self.health))

    @contextlib.asynccontextmanager
    async def started(self) -> AsyncIterator[None]:
        try:
            async with running(self.service):
                await wait_until(is_ready(self.health, f"inbound:{self.name}"), what="inbound ready")
                yield
        finally:
            await cleanup(self.url, [self.queue], [self.exchange])

    async def publish(self, message: aio_pika.Message, routing_key: str = "a.b.c") -> None:
        async with client(self.url) as ch:
            ex = await ch.get_exchange(self.exchange)
            await ex.publish(message, routing_key=routing_key)


# ---------------------------------------------------------------- config


def test_config_toml_amqp_sections_validate() -> None:
    doc = tomllib.loads((ROOT / "config.toml").read_text())
    brokers = {n: AmqpBrokerConfig.model_validate(s) for n, s in doc["brokers"].items() if s["kind"] == "amqp"}
    inbounds = {n: AmqpInboundConfig.model_validate(s) for n, s in doc["inbound"].items() if s["kind"] == "amqp"}
    outbounds = {n: AmqpOutboundConfig.model_validate(s) for n, s in doc["outbound"].items() if s["kind"] == "amqp"}
    assert set(brokers) == {"rabbit"}
    cmd = inbounds["commands"]
    assert cmd.connection() == "rabbit"
    assert cmd.bindings[0].exchange == "commands"
    assert cmd.bindings[0].routing_key == "#"
    assert cmd.prefetch == 256
    assert cmd.type.text == "com.example.device.command"
    assert outbounds["orders-exchange"].exchange == "orders"
    assert outbounds["orders-exchange"].header_prefix == "cloudEvents_"
    assert outbounds["orders-exchange"].format == "binary"
    assert ADAPTER.kind == "amqp"
    assert ADAPTER.inbound_model is AmqpInboundConfig


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"queue": "q", "type": "a.{nope.x}"}, "unknown placeholder"),
        ({"queue": "q", "queue_type": "quorum", "durable": False}, "quorum"),
        ({"queue": "q", "bogus": 1}, "bogus"),
        ({"queue": "q", "decode": "magic"}, "decode"),
        ({"queue": "q", "bindings": [{"exchange": ""}]}, "exchange"),
    ],
)
def test_inbound_config_errors(section: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AmqpInboundConfig.model_validate({"kind": "amqp", "broker": "rabbit", **section})


def test_outbound_and_broker_config_errors() -> None:
    with pytest.raises(ValueError, match="header_prefix"):
        outbound_config("x", header_prefix="x-")
    with pytest.raises(ValueError, match="amqp://"):
        AmqpBrokerConfig(url="http://localhost")
    with pytest.raises(ValueError, match="reconnect_max_s"):
        AmqpBrokerConfig(reconnect_initial_s=10, reconnect_max_s=1)


def test_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = AmqpBrokerConfig(url_env="T_MEDIATOR_AMQP_URL")
    monkeypatch.delenv("T_MEDIATOR_AMQP_URL", raising=False)
    cfg = AdapterConfig(
        brokers={"rabbit": broker},
        inbounds={"commands": inbound_config("q", "ex")},
    )
    rt = Runtime(sink=ListSink(), health=Health())
    with pytest.raises(ConfigError, match="T_MEDIATOR_AMQP_URL"):
        build(cfg, rt)
    monkeypatch.setenv("T_MEDIATOR_AMQP_URL", "amqp://u:p@127.0.0.1:5999/")
    built = build(cfg, rt)
    svc = built.services[0]
    assert isinstance(svc, AmqpInbound)
    assert svc.url == "amqp://u:p@127.0.0.1:5999/"


def test_build_registers_health_and_names() -> None:
    health = Health()
    cfg = AdapterConfig(
        brokers={"rabbit": AmqpBrokerConfig()},
        inbounds={"commands": inbound_config("q", "ex")},
        outbounds={"orders": outbound_config("orders")},
    )
    built = build(cfg, Runtime(sink=ListSink(), health=health))
    assert sorted(s.name for s in built.services) == ["inbound:commands", "outbound:orders"]
    assert built.outbounds["orders"].name == "orders"
    assert built.outbounds["orders"].max_in_flight == 256
    assert set(health.snapshot()) == {"inbound:commands", "outbound:orders"}
    assert not health.ready
    with pytest.raises(ConfigError, match=r"brokers\.nope"):
        build(AdapterConfig(outbounds={"o": outbound_config("x", broker="nope")}), Runtime(ListSink(), health))


# ---------------------------------------------------------------- inbound


async def test_inbound_raw(rabbitmq: str) -> None:
    sink = ListSink()
    inbound = _Inbound(rabbitmq, sink, type="com.example.{topic.0}", source="amqp://test/{topic.1}")
    async with inbound.started():
        when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
        await inbound.publish(
            aio_pika.Message(b"hello", content_type="text/plain", message_id="m-1", timestamp=when),
            routing_key="devices.d42.telemetry",
        )
        await inbound.publish(aio_pika.Message(b"bare"), routing_key="x.y")
        await sink.wait_for(2)
    first, second = sorted(sink.events, key=lambda e: e.id != "m-1")
    assert context_attributes(first) == {
        "specversion": "1.0",
        "id": "m-1",
        "source": "amqp://test/d42",
        "type": "com.example.devices",
        "time": "2024-01-02T03:04:05Z",
        "datacontenttype": "text/plain",
    }
    assert data_bytes(first) == b"hello"
    prov = first.provenance
    assert (prov.inbound, prov.protocol, prov.topic, prov.topic_separator) == (
        "commands",
        "amqp",
        "devices.d42.telemetry",
        ".",
    )
    assert abs(prov.received.seconds - time.time()) < 60
    uuid.UUID(second.id)  # no message_id: a fresh id
    assert abs(second.attributes["time"].ce_timestamp.seconds - time.time()) < 60
    assert "datacontenttype" not in second.attributes
    assert second.source == "amqp://test/y"
    assert data_bytes(second) == b"bare"


@pytest.mark.parametrize("prefix", ["cloudEvents_", "ce-"])
async def test_inbound_binary_mode(rabbitmq: str, prefix: str) -> None:
    sink = ListSink()
    inbound = _Inbound(rabbitmq, sink)
    headers: dict[str, Any] = {
        f"{prefix}specversion": "1.0",
        f"{prefix}id": "bin-1",
        f"{prefix}source": "/sensors",
        f"{prefix}type": "com.example.reading",
        f"{prefix}time": "2024-03-04T05:06:07.250Z",
        f"{prefix}count": 3,
        f"{prefix}flag": True,
        f"{prefix}raw": bytearray(b"bytes-value"),
        f"{prefix}when": datetime(2020, 1, 1, tzinfo=UTC),
    }
    async with inbound.started():
        await inbound.publish(
            aio_pika.Message(b'{"t":21.5}', content_type="application/json", headers=headers, message_id="other"),
            routing_key="sensors.s1",
        )
        await sink.wait_for(1)
    env = sink.events[0]
    assert context_attributes(env) == {
        "specversion": "1.0",
        "id": "bin-1",
        "source": "/sensors",
        "type": "com.example.reading",
        "time": "2024-03-04T05:06:07.250Z",
        "datacontenttype": "application/json",
        "count": "3",
        "flag": "true",
        "raw": "bytes-value",
        "when": "2020-01-01T00:00:00Z",
    }
    assert data_bytes(env) == b'{"t":21.5}'
    assert env.provenance.topic == "sensors.s1"


async def test_inbound_structured_and_protobuf(rabbitmq: str) -> None:
    sink = ListSink()
    inbound = _Inbound(rabbitmq, sink)
    doc = {
        "specversion": "1.0",
        "id": "st-1",
        "source": "/shop",
        "type": "com.example.order",
        "time": "2024-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "data": {"order": 9},
    }
    proto_event = new_event(type="com.example.proto", source="/p", data=b"\x01\x02", id="pb-1")
    async with inbound.started():
        await inbound.publish(aio_pika.Message(json.dumps(doc).encode(), content_type="application/cloudevents+json"))
        await inbound.publish(
            aio_pika.Message(to_protobuf(proto_event), content_type="application/cloudevents+protobuf")
        )
        await sink.wait_for(2)
    by_id = {e.id: e for e in sink.events}
    st = by_id["st-1"]
    assert (st.source, st.type, attribute(st, "time")) == ("/shop", "com.example.order", "2024-01-01T00:00:00Z")
    assert attribute(st, "datacontenttype") == "application/json"
    assert json.loads(data_bytes(st)) == {"order": 9}
    assert st.provenance.inbound == "commands"
    pb = by_id["pb-1"]
    assert context_attributes(pb) == context_attributes(proto_event)
    assert data_bytes(pb) == b"\x01\x02"


async def test_inbound_acks_only_after_accept(rabbitmq: str) -> None:
    sink = ListSink()
    sink.fail_with = NotReady("outbox full", retry_after_s=0.05)
    inbound = _Inbound(rabbitmq, sink)
    async with inbound.started():
        await inbound.publish(aio_pika.Message(b"keep me", message_id="k-1"))
        # Refused twice: each time nacked with requeue, and delivered again.
        await wait_until(lambda: sink.calls >= 3, what="redeliveries")
        assert sink.events == []
        sink.fail_with = None
        await sink.wait_for(1)
    assert [e.id for e in sink.events][:1] == ["k-1"]
    assert data_bytes(sink.events[0]) == b"keep me"


class _SlowSink(ListSink):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        self.in_flight += len(events)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            await super().accept(events, origin)
        finally:
            self.in_flight -= len(events)


async def test_inbound_takes_deliveries_in_batches_up_to_prefetch(rabbitmq: str) -> None:
    """What arrives while a commit runs is committed next, together: never more than prefetch at once, and
    not one at a time."""
    sink = _SlowSink(delay_s=0.3)
    inbound = _Inbound(rabbitmq, sink, prefetch=20)
    n = 60
    async with inbound.started():
        async with client(rabbitmq) as ch:
            ex = await ch.get_exchange(inbound.exchange)
            for i in range(n):
                await ex.publish(aio_pika.Message(str(i).encode(), message_id=f"c-{i}"), routing_key="c")
        started = time.monotonic()
        await sink.wait_for(n, timeout_s=30)
        elapsed = time.monotonic() - started
    assert sorted(int(data_bytes(e)) for e in sink.events) == list(range(n))
    assert 10 <= sink.max_in_flight <= 20  # never more than prefetch, and not one at a time
    assert sink.calls < n / 4
    assert elapsed < n * 0.3 / 4


async def _publish_numbered(url: str, exchange: str, numbers: range) -> None:
    async with client(url) as ch:
        ex = await ch.get_exchange(exchange)
        for i in numbers:
            await ex.publish(aio_pika.Message(str(i).encode(), message_id=f"c-{i}"), routing_key="c")


async def test_inbound_acks_a_batch_with_one_frame(rabbitmq: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch is settled by one multiple basic.ack, and every message is settled: none is left in
    the queue (ready or unacknowledged) once the consumer is gone."""
    acks: list[tuple[int, bool]] = []
    real_ack = aiormq.Channel.basic_ack

    async def counting_ack(self: aiormq.Channel, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        acks.append((delivery_tag, multiple))
        await real_ack(self, delivery_tag, multiple=multiple, wait=wait)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", counting_ack)
    sink = _SlowSink(delay_s=0.2)
    inbound = _Inbound(rabbitmq, sink, prefetch=20)
    n = 60
    try:
        async with running(inbound.service):
            await wait_until(is_ready(inbound.health, "inbound:commands"), what="ready")
            await _publish_numbered(rabbitmq, inbound.exchange, range(n))
            await sink.wait_for(n, timeout_s=30)
            await wait_until(lambda: len(acks) == sink.calls, what="the last ack")
        assert await ready_count(rabbitmq, inbound.queue) == 0  # unacknowledged ones would be back
    finally:
        await cleanup(rabbitmq, [inbound.queue], [inbound.exchange])
    assert sorted(int(data_bytes(e)) for e in sink.events) == list(range(n))
    assert len(acks) == sink.calls < n / 4
    assert all(multiple for _, multiple in acks)
    assert [tag for tag, _ in acks] == sorted(tag for tag, _ in acks)


async def test_a_failed_batch_is_not_acknowledged_by_the_next_one(
    rabbitmq: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails half-way leaves its messages unsettled (the broker redelivers them): a later
    batch on the same channel must not ack them in passing with its multiple ack."""
    sink = ListSink()
    inbound = _Inbound(rabbitmq, sink, prefetch=50)
    real_commit = inbound.service._commit
    failed: list[int] = []

    async def failing_once(batch: list[Any]) -> None:
        if not failed:
            failed.append(len(batch))
            raise RuntimeError("a bug in the first batch")
        await real_commit(batch)

    monkeypatch.setattr(inbound.service, "_commit", failing_once)
    monkeypatch.setattr(amqp_inbound, "ERROR_PAUSE_S", 0.0)
    try:
        async with running(inbound.service):
            await wait_until(is_ready(inbound.health, "inbound:commands"), what="ready")
            await _publish_numbered(rabbitmq, inbound.exchange, range(1))
            await wait_until(lambda: bool(failed), what="the failed batch")
            await _publish_numbered(rabbitmq, inbound.exchange, range(1, 11))
            await sink.wait_for(10, timeout_s=30)
        # The first message was neither committed nor acked: back in the queue once the consumer is gone.
        assert await ready_count(rabbitmq, inbound.queue) == 1
    finally:
        await cleanup(rabbitmq, [inbound.queue], [inbound.exchange])
    assert failed == [1]
    assert sorted(int(data_bytes(e)) for e in sink.events) == list(range(1, 11))


class _ChannelClosingSink(ListSink):
    """Accepts, but the first time closes the inbound's channel first: the ack then finds it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.inbound: AmqpInbound | None = None

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        if self.calls == 0 and self.inbound is not None and self.inbound._channel is not None:
            underlay = await self.inbound._channel.get_underlay_channel()
            await underlay.close()
        await super().accept(events, origin)


async def test_a_channel_closed_before_the_ack_is_survived_and_the_batch_redelivered(rabbitmq: str) -> None:
    """The ack of a committed batch finds its channel closed (the broker went away meanwhile): the inbound
    logs it and goes on; the robust channel comes back and the broker redelivers the batch."""
    sink = _ChannelClosingSink()
    inbound = _Inbound(rabbitmq, sink)
    sink.inbound = inbound.service
    async with inbound.started():
        await inbound.publish(aio_pika.Message(b"once", message_id="cc-1"))
        await sink.wait_for(2, timeout_s=20)  # committed, not acked, delivered again
        assert is_ready(inbound.health, "inbound:commands")()
    assert [e.id for e in sink.events] == ["cc-1", "cc-1"]


async def test_inbound_quorum_queue(rabbitmq: str) -> None:
    sink = ListSink()
    inbound = _Inbound(rabbitmq, sink, queue_type="quorum")
    async with inbound.started():
        await inbound.publish(aio_pika.Message(b"q", message_id="q-1"))
        await sink.wait_for(1)
    assert sink.events[0].id == "q-1"


async def test_inbound_starts_while_broker_is_down() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    sink = ListSink()
    inbound = _Inbound(url, sink)
    async with running(inbound.service) as task:
        await wait_until(
            lambda: "cannot connect" in str(inbound.health.snapshot()["inbound:commands"]["detail"]),
            what="a failed connection attempt",
        )
        assert not task.done()
        assert not inbound.health.ready


# ---------------------------------------------------------------- outbound


class _Outbound:
    def __init__(self, url: str, **extra: Any) -> None:
        self.url = url
        self.health = Health()
        self.exchange = unique("t.out")
        self.cfg = outbound_config(self.exchange, **extra)
        self.outbound = AmqpOutbound("orders", self.cfg, broker_config(url), url, self.health)

    @contextlib.asynccontextmanager
    async def started(self) -> AsyncIterator[AbstractQueue]:
        """Run the outbound; yield a queue (of an independent client) bound to its exchange with ``#``."""
        queue_name = unique("t.readback")
        try:
            async with running(self.outbound), client(self.url) as ch:
                await wait_until(is_ready(self.health, "outbound:orders"), what="outbound ready")
                queue = await ch.declare_queue(queue_name, auto_delete=False)
                await queue.bind(self.exchange, routing_key="#")
                yield queue
        finally:
            await cleanup(self.url, [queue_name], [self.exchange])


def order_event(event_id: str = "ord-1") -> Envelope:
    env = new_event(
        type="com.example.order.created",
        source="/orders",
        data=b'{"order":42}',
        content_type="application/json",
        id=event_id,
        subject="o-42",
    )
    env.attributes["time"].ce_timestamp.FromJsonString("2024-05-06T07:08:09.5Z")
    env.attributes["tenant"].ce_string = "acme"
    env.provenance.inbound = "orders-http"  # gateway-only: never written to consumers
    env.provenance.principal = "alice"
    return env


@pytest.mark.parametrize("prefix", ["cloudEvents_", "ce-"])
async def test_outbound_binary(rabbitmq: str, prefix: str) -> None:
    out = _Outbound(rabbitmq, header_prefix=prefix)
    async with out.started() as queue:
        await out.outbound.send(order_event(), "orders.created", "binary")
        msg = await get_one(queue)
    assert msg.body == b'{"order":42}'
    assert msg.content_type == "application/json"
    assert msg.message_id == "ord-1"
    assert msg.type == "com.example.order.created"
    assert msg.timestamp == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert msg.routing_key == "orders.created"
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.headers == {
        f"{prefix}specversion": "1.0",
        f"{prefix}id": "ord-1",
        f"{prefix}source": "/orders",
        f"{prefix}type": "com.example.order.created",
        f"{prefix}time": "2024-05-06T07:08:09.500Z",
        f"{prefix}subject": "o-42",
        f"{prefix}tenant": "acme",
    }


async def test_outbound_event_without_data_reaches_the_consumer(rabbitmq: str) -> None:
    # An empty body is sent with no body frame: RabbitMQ closes the channel on an empty one (UNEXPECTED_FRAME).
    out = _Outbound(rabbitmq)
    async with out.started() as queue:
        empty = new_event(type="com.example.ping", source="/p", data=b"", id="no-data")
        await out.outbound.send(empty, "orders.created", "binary")
        await out.outbound.send(order_event("after"), "orders.created", "binary")  # the channel still works
        got = [await get_one(queue), await get_one(queue)]
    assert [(m.message_id, m.body) for m in got] == [("no-data", b""), ("after", b'{"order":42}')]


async def test_outbound_structured_and_protobuf(rabbitmq: str) -> None:
    out = _Outbound(rabbitmq, persistent=False)
    async with out.started() as queue:
        await out.outbound.send(order_event("s-1"), "orders.created", "structured")
        structured = await get_one(queue)
        await out.outbound.send(order_event("p-1"), "orders.created", "protobuf")
        proto = await get_one(queue)
    assert structured.content_type == "application/cloudevents+json"
    assert structured.message_id == "s-1"
    assert structured.headers == {}
    assert structured.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    doc = json.loads(structured.body)
    assert doc["id"] == "s-1"
    assert doc["data"] == {"order": 42}
    assert doc["tenant"] == "acme"
    assert "orders-http" not in structured.body.decode()
    assert proto.content_type == "application/cloudevents+protobuf"
    assert proto.message_id == "p-1"
    parsed = Envelope()
    parsed.ParseFromString(proto.body)
    assert not parsed.HasField("provenance")
    assert context_attributes(from_protobuf(proto.body)) == context_attributes(order_event("p-1"))


async def test_outbound_unroutable_is_terminal(rabbitmq: str) -> None:
    out = _Outbound(rabbitmq)
    async with running(out.outbound):
        try:
            await wait_until(is_ready(out.health, "outbound:orders"), what="outbound ready")
            with pytest.raises(TerminalDeliveryError, match="unroutable") as caught:
                await out.outbound.send(order_event(), "nobody.listens", "binary")
            # Its dead letter is counted and listed as unroutable (issue 19: it was counted as terminal).
            assert classify(str(caught.value), "orders") == UNROUTABLE
            # The channel survives a return: the next publish works.
            with pytest.raises(TerminalDeliveryError, match="unroutable"):
                await out.outbound.send(order_event("ord-2"), "nobody.listens", "binary")
        finally:
            await cleanup(rabbitmq, [], [out.exchange])


async def test_outbound_same_id_in_flight_gets_its_own_outcome(rabbitmq: str) -> None:
    """aiormq matches returns by message_id: one event to two addresses at once, one unroutable."""
    out = _Outbound(rabbitmq)
    async with out.started() as queue:
        await queue.unbind(out.exchange, routing_key="#")
        await queue.bind(out.exchange, routing_key="routed")
        results = await asyncio.gather(
            out.outbound.send(order_event("dup"), "unrouted", "binary"),
            out.outbound.send(order_event("dup"), "routed", "binary"),
            return_exceptions=True,
        )
        msg = await get_one(queue)
    assert isinstance(results[0], TerminalDeliveryError)
    assert results[1] is None
    assert msg.routing_key == "routed"


async def test_outbound_many_in_flight(rabbitmq: str) -> None:
    out = _Outbound(rabbitmq, max_in_flight=200)
    n = 400
    async with out.started() as queue:
        sem = asyncio.Semaphore(out.outbound.max_in_flight)

        async def send(i: int) -> None:
            async with sem:
                await out.outbound.send(order_event(f"m-{i}"), f"orders.{i}", "binary")

        await asyncio.gather(*(send(i) for i in range(n)))
        seen: set[str] = set()
        async with asyncio.timeout(20):
            async with queue.iterator() as it:
                async for msg in it:
                    await msg.ack()
                    assert msg.message_id is not None
                    seen.add(msg.message_id)
                    if len(seen) == n:
                        break
    assert seen == {f"m-{i}" for i in range(n)}


async def test_outbound_mixed_outcomes_in_flight_each_get_their_own(rabbitmq: str) -> None:
    """Confirms are matched to publishes by delivery tag, i.e. by order on the wire: with many publishes in
    flight, some returned as unroutable and some too large for one frame (those take aiormq's own
    basic_publish, the others adapters/amqp/speedups.publish), each publish still gets its own outcome."""
    out = _Outbound(rabbitmq, max_in_flight=300)
    n = 300
    big = b"x" * 200_000  # over RabbitMQ's default frame_max (131,072): several body frames

    def event(i: int) -> Envelope:
        env = order_event(f"m-{i}")
        if i % 50 == 7:
            env.binary_data = big
        return env

    def address(i: int) -> str:
        return f"unrouted.{i}" if i % 3 == 0 else f"routed.{i}"

    async with out.started() as queue:
        channel = await out.outbound.link.channel.get_underlay_channel()  # type: ignore[union-attr]
        assert speedups.shortcut_supported(cast(aiormq.Channel, channel))
        await queue.unbind(out.exchange, routing_key="#")
        await queue.bind(out.exchange, routing_key="routed.#")
        results = await asyncio.gather(
            *(out.outbound.send(event(i), address(i), "binary") for i in range(n)), return_exceptions=True
        )
        seen: dict[str, int] = {}
        expected = {f"m-{i}" for i in range(n) if i % 3}
        async with asyncio.timeout(20):
            async with queue.iterator() as it:
                async for msg in it:
                    await msg.ack()
                    assert msg.message_id is not None
                    seen[msg.message_id] = len(msg.body)
                    if len(seen) == len(expected):
                        break
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, TerminalDeliveryError), (i, result)
        else:
            assert result is None, (i, result)
    assert set(seen) == expected
    assert {m for m, size in seen.items() if size == len(big)} == {f"m-{i}" for i in range(n) if i % 50 == 7 and i % 3}


async def test_outbound_declare_false_and_missing_exchange(rabbitmq: str) -> None:
    out = _Outbound(rabbitmq, declare=False, send_timeout_s=3)
    async with running(out.outbound):
        await wait_until(is_ready(out.health, "outbound:orders"), what="outbound ready")
        with pytest.raises(RetryableDeliveryError):
            await out.outbound.send(order_event(), "k", "binary")


async def test_outbound_default_exchange_routes_to_queue(rabbitmq: str) -> None:
    out = _Outbound(rabbitmq)
    out.outbound = AmqpOutbound("orders", outbound_config(""), broker_config(rabbitmq), rabbitmq, out.health)
    name = unique("t.direct")
    try:
        async with running(out.outbound), client(rabbitmq) as ch:
            await wait_until(is_ready(out.health, "outbound:orders"), what="outbound ready")
            queue = await ch.declare_queue(name)
            await out.outbound.send(order_event(), name, "binary")
            msg = await get_one(queue)
            assert msg.message_id == "ord-1"
    finally:
        await cleanup(rabbitmq, [name])


async def test_outbound_bad_format_and_routing_key_are_terminal(rabbitmq: str) -> None:
    out = _Outbound(rabbitmq)
    async with out.started():
        with pytest.raises(TerminalDeliveryError, match="unknown format"):
            await out.outbound.send(order_event(), "k", "xml")
        with pytest.raises(TerminalDeliveryError, match="255"):
            await out.outbound.send(order_event(), "k" * 256, "binary")


async def test_outbound_not_connected_is_retryable() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    out = _Outbound(url)
    with pytest.raises(RetryableDeliveryError, match="not connected"):
        await out.outbound.send(order_event(), "k", "binary")
    async with running(out.outbound):
        await wait_until(
            lambda: "cannot connect" in str(out.health.snapshot()["outbound:orders"]["detail"]),
            what="a failed connection attempt",
        )
        started = time.monotonic()
        with pytest.raises(RetryableDeliveryError):
            await out.outbound.send(order_event(), "k", "binary")
        assert time.monotonic() - started < 1.0


async def test_health_follows_connection(rabbitmq: str) -> None:
    out = _Outbound(rabbitmq)
    async with running(out.outbound):
        await wait_until(is_ready(out.health, "outbound:orders"), what="ready")
        assert str(out.health.snapshot()["outbound:orders"]["detail"]).startswith("connected")
    assert out.health.snapshot()["outbound:orders"] == {"ready": False, "detail": "stopped"}
    await cleanup(rabbitmq, [], [out.exchange])
