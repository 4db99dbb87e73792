"""The behaviour every broker adapter must have, written once and run against each (``harness.py``):
attributes survive a round trip in binary and structured mode both ways, a poison message becomes a dead
letter (and is not delivered again), a message is acknowledged only once it is committed (an inbound
stopped before the commit loses nothing), the outbox's bound reaches the broker, an unroutable publish is
a failure, and a restart of an own broker loses nothing.

A case needing a capability runs for the harnesses that have it; ``harness.WHY_NOT`` says why the others
lack it (core NATS: no acknowledgement, no flow control, no persistence; MQTT: no unroutable publish; an
own RabbitMQ node is too slow to start here for the restart case, which tests/adapters/test_amqp_restart.py
covers). To add an adapter, see ``harness.py``'s docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mediator.core.envelope import Envelope, attribute, new_event
from mediator.core.errors import NotReady, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.seams import Runtime, Service
from tests.conformance.harness import (
    ACK_AFTER_COMMIT,
    ADAPTERS,
    BACK_PRESSURE,
    RECONNECT,
    TLS,
    UNROUTABLE,
    AmqpHarness,
    Harness,
    MqttHarness,
    NatsHarness,
    capable,
)
from tests.support.certs import Pki, make_pki
from tests.support.fakes import ListSink, RejectingSink
from tests.support.net import unique, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=ADAPTERS)
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int], nats_url: str
) -> AsyncIterator[Harness]:
    name = request.param
    make: dict[str, Callable[[], Harness]] = {
        "amqp": lambda: AmqpHarness(rabbitmq),
        "mqtt": lambda: MqttHarness(*mosquitto),
        "nats-core": lambda: NatsHarness(nats_url, jetstream=False),
        "nats-jetstream": lambda: NatsHarness(nats_url, jetstream=True),
    }
    h = make[name]()
    await h.start(tmp_path)
    try:
        yield h
    finally:
        await h.stop()


def sample(id: str | None = None) -> Envelope:
    env = new_event(
        type="com.example.reading",
        source="/sensors/7",
        data=b'{"celsius":21.5}',
        content_type="application/json",
        id=id or unique("evt"),
        subject="room-3",
    )
    env.attributes["region"].ce_string = "eu-west"  # an extension attribute
    return env


@contextlib.asynccontextmanager
async def running(service: Service, health: Health) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(service.run(), name=service.name)
    try:
        await wait_until(
            lambda: health.is_ready(service.name) or task.done(), timeout_s=20, what=f"{service.name} ready"
        )
        if task.done():
            task.result()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task


def same_event(got: Envelope, sent: Envelope) -> None:
    for name in ("id", "source", "type", "subject", "region", "datacontenttype"):
        assert attribute(got, name) == attribute(sent, name), name
    assert got.binary_data or got.text_data
    assert (got.binary_data or got.text_data.encode()) == sent.binary_data


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_attributes_survive_the_inbound(harness: Harness, mode: str) -> None:
    sink, health = ListSink(), Health()
    service = harness.inbound(Runtime(sink=sink, health=health))
    sent = sample()
    async with running(service, health):
        await harness.publish(sent, mode)
        await sink.wait_for(1)
    (got,) = sink.events
    same_event(got, sent)
    assert got.provenance.protocol == harness.name.split("-")[0]


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_attributes_survive_the_outbound(harness: Harness, mode: str) -> None:
    health = Health()
    outbound, service = harness.outbound(health)
    sent = sample()
    async with running(service, health), harness.consume() as read:
        await outbound.send(sent, harness.address, mode)
        async with asyncio.timeout(10):
            got = await read()
    for name in ("id", "source", "type", "subject", "region", "datacontenttype", "specversion"):
        assert got.attrs.get(name) == attribute(sent, name) or (name == "specversion" and got.attrs[name] == "1.0"), (
            name,
            got.attrs,
        )
    assert got.data == sent.binary_data


async def test_poison_message_becomes_a_dead_letter(harness: Harness) -> None:
    """Undecodable (its content type says CloudEvents JSON, and it is not): dead-lettered with the ingress
    reason and acknowledged, so an inbound started again does not see it (and what follows it arrives)."""
    sink, health = ListSink(), Health()
    async with running(harness.inbound(Runtime(sink=sink, health=health)), health):
        await harness.publish(sample(), "poison")
        await sink.wait_for(0, dead=1)
    good = sample()
    health = Health()
    async with running(harness.inbound(Runtime(sink=sink, health=health)), health):
        await harness.publish(good, "binary")
        await sink.wait_for(1)
    [(env, reason)] = sink.dead
    assert reason.startswith("undecodable: "), reason
    assert "JSON" in reason
    assert env.type == "io.mediator.undecodable"
    assert env.source == "conf"  # the inbound's name
    assert env.binary_data == b"{not json"
    assert env.provenance.topic
    assert [e.id for e in sink.events] == [good.id]


async def test_an_event_a_stage_refuses_becomes_a_dead_letter(harness: Harness) -> None:
    """Nobody can be answered on a broker: the refusal is a dead letter with the ingress reason, then the
    message is acknowledged (not seen again by an inbound started after)."""
    sink, health = RejectingSink(), Health()
    sent = sample()
    async with running(harness.inbound(Runtime(sink=sink, health=health)), health):
        await harness.publish(sent, "binary")
        await sink.wait_for(0, dead=1)
    again, health = ListSink(), Health()
    async with running(harness.inbound(Runtime(sink=again, health=health)), health):
        good = sample()
        await harness.publish(good, "binary")
        await again.wait_for(1)
    [(env, reason)] = sink.dead
    assert reason == "rejected: forbidden: not allowed"
    same_event(env, sent)
    assert [e.id for e in again.events] == [good.id]


@pytest.mark.parametrize("harness", capable(ACK_AFTER_COMMIT), indirect=True)
async def test_acknowledged_only_after_the_commit(harness: Harness) -> None:
    """An inbound whose commits fail (NotReady) acknowledges nothing: stopped, then started with a sink
    that commits, it still gets the event (kill -9 between receipt and commit is the same to the broker)."""
    failing, health = ListSink(), Health()
    failing.fail_with = NotReady("outbox down")
    sent = sample()
    async with running(harness.inbound(Runtime(sink=failing, health=health)), health):
        await harness.publish(sent, "binary")
        await wait_until(lambda: failing.calls >= 1, timeout_s=10, what="a commit attempt")
    sink, health = ListSink(), Health()
    async with running(harness.inbound(Runtime(sink=sink, health=health)), health):
        await sink.wait_for(1, timeout_s=20)
    assert sink.events[0].id == sent.id
    assert not failing.events


@pytest.mark.parametrize("harness", capable(BACK_PRESSURE), indirect=True)
async def test_back_pressure_reaches_the_broker(harness: Harness) -> None:
    """The broker is told no more than the outbox takes ([outbox] max_pending)."""
    health = Health()
    service = harness.inbound(Runtime(sink=ListSink(), health=health, max_pending=7))
    async with running(service, health):
        assert await harness.window_seen(service) == 7


@pytest.mark.parametrize("harness", capable(UNROUTABLE), indirect=True)
async def test_unroutable_publish_is_a_failure(harness: Harness) -> None:
    health = Health()
    outbound, service = harness.outbound(health)
    async with running(service, health):
        with pytest.raises(TerminalDeliveryError, match="unroutable"):
            await outbound.send(sample(), harness.unroutable, "binary")


@pytest.mark.parametrize("harness", capable(RECONNECT), indirect=True)
async def test_a_broker_restart_loses_nothing(harness: Harness, tmp_path: Path) -> None:
    """An own broker instance is restarted under a running inbound; what was published while the inbound
    was cut off and what is published after arrive."""
    broker: Any = await harness.own_broker(tmp_path)
    sink, health = ListSink(), Health()
    service = harness.inbound(Runtime(sink=sink, health=health))
    first, second = sample(), sample()
    async with running(service, health):
        await harness.publish(first, "binary")
        await sink.wait_for(1)
        await broker.restart()
        await harness.publish(second, "binary")
        await sink.wait_for(2, timeout_s=30)
    assert {e.id for e in sink.events} >= {first.id, second.id}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("harness", capable(TLS), indirect=True)
async def test_tls_with_a_client_certificate(harness: Harness, tmp_path: Path, pki: Pki) -> None:
    """Over TLS to an own broker that requires a client certificate signed by the test's CA: events get
    through both ways; without the certificate, the inbound stays not ready and says why."""
    await harness.own_tls_broker(tmp_path, pki, client_cert=True)
    sink, health = ListSink(), Health()
    inbound = harness.inbound(Runtime(sink=sink, health=health))
    outbound, link = harness.outbound(health)
    sent = sample()
    async with running(inbound, health), running(link, health), harness.consume() as read:
        await harness.publish(sent, "binary")
        await sink.wait_for(1)
        await outbound.send(sent, harness.address, "binary")
        async with asyncio.timeout(10):
            got = await read()
    same_event(sink.events[0], sent)
    assert got.attrs["id"] == sent.id

    await harness.stop()
    await harness.own_tls_broker(tmp_path / "again", pki, client_cert=False)
    health = Health()
    refused = harness.inbound(Runtime(sink=ListSink(), health=health))
    task = asyncio.create_task(refused.run(), name=refused.name)
    try:
        await wait_until(
            lambda: (
                "cannot connect" in str(health.snapshot()[refused.name]["detail"])
                or "lost" in str(health.snapshot()[refused.name]["detail"])
            ),
            timeout_s=15,
            what="the refused connect to be reported",
        )
        assert not health.is_ready(refused.name)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
