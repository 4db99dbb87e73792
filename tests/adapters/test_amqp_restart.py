"""Broker restarts: a RabbitMQ node this test session owns (never the shared one) is stopped and started
under a running inbound and outbound; both must carry on by themselves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aio_pika
import pytest

from adapters.amqp import AmqpInbound, AmqpOutbound
from mediator.core.envelope import data_bytes
from mediator.core.errors import RetryableDeliveryError
from mediator.core.health import Health
from mediator.core.seams import Runtime
from tests.adapters.test_amqp import (
    broker_config,
    client,
    get_one,
    inbound_config,
    is_ready,
    order_event,
    outbound_config,
    running,
)
from tests.support.brokers import RabbitNode, own_rabbit_node
from tests.support.fakes import ListSink
from tests.support.net import unique, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def own_rabbitmq() -> Iterator[RabbitNode]:
    """A second RabbitMQ node on free loopback ports, with its own name, data and config (see
    shared/SERVICES.md). Started once per session; stopped at teardown."""
    with own_rabbit_node() as rabbit:
        yield rabbit


async def restart(rabbit: RabbitNode, health: Health, component: str) -> None:
    """stop_app, wait until the component saw its connection go, then start_app."""
    await rabbit.actl("stop_app")
    await wait_until(lambda: not is_ready(health, component)(), what=f"{component} down")
    await rabbit.actl("start_app", timeout_s=120)


async def test_inbound_consumer_resumes_after_broker_restart(own_rabbitmq: RabbitNode) -> None:
    url = own_rabbitmq.url
    sink = ListSink()
    health = Health()
    queue, exchange = unique("t.rs.in"), unique("t.rs.ex")
    inbound = AmqpInbound(
        "restart",
        inbound_config(queue, exchange, prefetch=10),
        broker_config(url),
        url,
        Runtime(sink=sink, health=health),
    )
    async with running(inbound):
        await wait_until(is_ready(health, "inbound:restart"), what="inbound ready")
        async with client(url) as ch:
            ex = await ch.get_exchange(exchange)
            await ex.publish(aio_pika.Message(b"before", message_id="before"), routing_key="r.1")
        await sink.wait_for(1)

        await restart(own_rabbitmq, health, "inbound:restart")
        await wait_until(is_ready(health, "inbound:restart"), timeout_s=60, what="inbound reconnected")
        assert "reconnected" in str(health.snapshot()["inbound:restart"]["detail"])

        async with client(url) as ch:
            ex = await ch.get_exchange(exchange)  # durable: survived the restart
            await ex.publish(
                aio_pika.Message(b"after", message_id="after", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="r.2",
            )
        await sink.wait_for(2, timeout_s=30)
    assert [e.id for e in sink.events] == ["before", "after"]
    assert data_bytes(sink.events[1]) == b"after"
    assert sink.events[1].provenance.topic == "r.2"
    async with client(url) as ch:
        await ch.queue_delete(queue)
        await ch.exchange_delete(exchange)


async def test_outbound_publishes_again_after_broker_restart(own_rabbitmq: RabbitNode) -> None:
    url = own_rabbitmq.url
    health = Health()
    exchange, queue_name = unique("t.rs.out"), unique("t.rs.rb")
    outbound = AmqpOutbound("restart", outbound_config(exchange), broker_config(url), url, health)
    async with running(outbound):
        await wait_until(is_ready(health, "outbound:restart"), what="outbound ready")
        async with client(url) as ch:
            queue = await ch.declare_queue(queue_name, durable=True)
            await queue.bind(exchange, routing_key="#")
        await outbound.send(order_event("e-1"), "orders.one", "binary")

        await own_rabbitmq.actl("stop_app")
        await wait_until(lambda: not is_ready(health, "outbound:restart")(), what="outbound down")
        with pytest.raises(RetryableDeliveryError, match="not connected"):
            await outbound.send(order_event("e-lost"), "orders.lost", "binary")
        await own_rabbitmq.actl("start_app", timeout_s=120)

        await wait_until(is_ready(health, "outbound:restart"), timeout_s=60, what="outbound reconnected")
        await outbound.send(order_event("e-2"), "orders.two", "binary")

        async with client(url) as ch:
            queue = await ch.declare_queue(queue_name, durable=True)
            got = [(await get_one(queue)).message_id, (await get_one(queue)).message_id]
            assert await queue.get(fail=False, timeout=5) is None
            with contextlib.suppress(Exception):
                await ch.queue_delete(queue_name)
                await ch.exchange_delete(exchange)
    assert got == ["e-1", "e-2"]
