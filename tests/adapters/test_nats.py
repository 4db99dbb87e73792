"""The NATS adapter against the shared nats-server (JetStream on): what the conformance suite does not
cover because only NATS has it: config validation, wildcards and queue groups, JetStream deduplication
by ``Nats-Msg-Id``, the redelivery count, ``nak`` with a delay, ``dead_letter_after``, declared and
required streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig
from pydantic import ValidationError

from adapters.nats import NatsInbound, NatsOutbound, build
from adapters.nats.config import NatsBrokerConfig, NatsInboundConfig, NatsOutboundConfig
from adapters.nats.connection import broker_access
from mediator.core.deadletter import classify
from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import ConfigError, NotReady, RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.ingress import Origin
from mediator.core.seams import AdapterConfig, Runtime, Service
from tests.support.fakes import ListSink
from tests.support.net import unique, wait_until

pytestmark = pytest.mark.timeout(60)


def broker(url: str, **extra: Any) -> NatsBrokerConfig:
    return NatsBrokerConfig.model_validate({"servers": [url], "reconnect_wait_s": 0.1, **extra})


def inbound(url: str, sink: Any, name: str = "in", health: Health | None = None, **section: Any) -> NatsInbound:
    cfg = NatsInboundConfig.model_validate({"kind": "nats", "broker": "n", **section})
    return NatsInbound(name, cfg, broker_access("n", broker(url)), Runtime(sink=sink, health=health or Health()))


def outbound(url: str, health: Health, **section: Any) -> NatsOutbound:
    cfg = NatsOutboundConfig.model_validate({"kind": "nats", "broker": "n", **section})
    return NatsOutbound("out", cfg, broker_access("n", broker(url)), health)


@contextlib.asynccontextmanager
async def running(service: Service, health: Health) -> AsyncIterator[None]:
    task = asyncio.create_task(service.run(), name=service.name)
    try:
        await wait_until(lambda: health.is_ready(service.name) or task.done(), timeout_s=15, what="ready")
        if task.done():
            task.result()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def stream(url: str, subjects: Sequence[str]) -> AsyncIterator[str]:
    name = unique("T").replace("-", "_")
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=name, subjects=list(subjects)))
        yield name
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(name)
        await nc.close()


def event(id: str) -> Envelope:
    return new_event(type="com.example.t", source="/t", data=b"{}", content_type="application/json", id=id)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"subjects": ["a..b"]}, "empty token"),
        ({"subjects": ["a.>.b"]}, "'>' must be the last token"),
        ({"subjects": ["a.b*"]}, "a wildcard must be a whole token"),
        ({"subjects": []}, "at least 1"),
        ({"subjects": ["a"], "jetstream": True}, "needs stream"),
        ({"subjects": ["a"], "stream": "S"}, "stream is for jetstream = true"),
        ({"subjects": ["a"], "jetstream": True, "stream": "S", "queue_group": "g"}, "queue_group is core NATS"),
        ({"subjects": ["a"], "jetstream": True, "stream": "S", "request": True}, "request mode is core NATS"),
    ],
)
def test_inbound_config_errors(section: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        NatsInboundConfig.model_validate({"kind": "nats", "broker": "n", **section})


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"servers": ["http://x"]}, "starts with nats:// or tls://"),
        ({"servers": ["nats://u:p@x:4222"]}, "credentials go in"),
        ({"servers": ["tls://x:4222"]}, "needs \\[brokers.X.tls\\]"),
        ({"token_env": "T", "user": "u", "password_env": "P"}, "one way to authenticate"),
        ({"user": "u"}, "user and password_env go together"),
        ({"streams": [{"name": "A", "subjects": ["a"]}, {"name": "A", "subjects": ["b"]}]}, "two streams"),
        ({"streams": [{"name": "A.B", "subjects": ["a"]}]}, "pattern"),
    ],
)
def test_broker_config_errors(section: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        NatsBrokerConfig.model_validate(section)


def test_outbound_config_errors() -> None:
    with pytest.raises(ValidationError, match="stream is for jetstream"):
        NatsOutboundConfig.model_validate({"kind": "nats", "broker": "n", "stream": "S"})
    with pytest.raises(ValidationError, match="requests are core NATS"):
        NatsOutboundConfig.model_validate({"kind": "nats", "broker": "n", "jetstream": True, "requests": True})


def test_secrets_come_from_the_environment_and_a_missing_one_names_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_T", "s3cret")
    cfg = NatsBrokerConfig.model_validate({"token_env": "NATS_T"})
    assert cfg.secrets("n") == {"token": "s3cret"}
    monkeypatch.delenv("NATS_T")
    sections = AdapterConfig(
        brokers={"n": cfg},
        inbounds={"i": NatsInboundConfig.model_validate({"kind": "nats", "broker": "n", "subjects": ["a"]})},
        outbounds={"o": NatsOutboundConfig.model_validate({"kind": "nats", "broker": "nope"})},
    )
    with pytest.raises(ConfigError) as caught:
        build(sections, Runtime(sink=ListSink(), health=Health()))
    assert caught.value.problems == [
        "brokers.n.token_env: environment variable 'NATS_T' is not set or empty",
        "outbound.o.broker: no [brokers.nope] with kind = 'nats'",
    ]


# ---------------------------------------------------------------- core NATS


async def test_wildcards_and_a_queue_group_share_the_subjects(nats_url: str) -> None:
    """Two inbounds in one queue group are competing consumers: each message reaches exactly one of them;
    ``>`` takes every deeper subject and ``*`` one token."""
    base = unique("q").replace("-", "")
    sinks, health = [ListSink(), ListSink()], Health()
    services = [
        inbound(nats_url, sink, f"in{i}", health, subjects=[f"{base}.>"], queue_group="g")
        for i, sink in enumerate(sinks)
    ]
    star = ListSink()
    only_one_token = inbound(nats_url, star, "star", health, subjects=[f"{base}.*.t"])
    async with running(services[0], health), running(services[1], health), running(only_one_token, health):
        nc = await nats.connect(nats_url)
        try:
            for n in range(40):
                await nc.publish(f"{base}.d{n}.t", b"%d" % n)
            await nc.publish(f"{base}.a.b.t", b"deep")
            await nc.flush()
        finally:
            await nc.close()
        await wait_until(lambda: sum(len(s.events) for s in sinks) == 41, what="41 messages between the two")
        await star.wait_for(40)
    got = sorted(e.binary_data for s in sinks for e in s.events)
    assert len(got) == len(set(got)) == 41
    assert all(s.events for s in sinks), "both members of the queue group took some"
    assert b"deep" not in {e.binary_data for e in star.events}
    assert {e.provenance.topic for e in star.events} == {f"{base}.d{n}.t" for n in range(40)}


# ---------------------------------------------------------------- JetStream


async def test_jetstream_publish_is_deduplicated_by_the_event_id(nats_url: str) -> None:
    subject = unique("dedup").replace("-", "")
    async with stream(nats_url, [subject]) as name:
        health = Health()
        out = outbound(nats_url, health, jetstream=True, stream=name)
        async with running(out.link, health):
            await out.send(event("same-id"), subject, "binary")
            await out.send(event("same-id"), subject, "binary")  # a retry after a lost ack
            await out.send(event("other-id"), subject, "binary")
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().stream_info(name)
        finally:
            await nc.close()
    assert info.state.messages == 2


async def test_jetstream_outbound_refuses_what_no_stream_or_another_stream_stores(nats_url: str) -> None:
    subject = unique("es").replace("-", "")
    async with stream(nats_url, [subject]) as name, stream(nats_url, [subject + "x"]):
        health = Health()
        wrong = outbound(nats_url, health, jetstream=True, stream=name)
        async with running(wrong.link, health):
            with pytest.raises(TerminalDeliveryError, match="JetStream refused it"):
                await wrong.send(event("e1"), subject + "x", "binary")  # stored by the other stream
            with pytest.raises(TerminalDeliveryError, match="unroutable: no JetStream stream"):
                await wrong.send(event("e2"), subject + "none", "binary")
            with pytest.raises(TerminalDeliveryError, match=r"unroutable: .*wildcards"):
                await wrong.send(event("e3"), subject + ".*", "binary")


async def test_outbound_not_connected_is_retryable() -> None:
    out = outbound("nats://127.0.0.1:1", Health())
    with pytest.raises(RetryableDeliveryError, match="not connected"):
        await out.send(event("e"), "a.b", "binary")


class FlakySink(ListSink):
    """Not ready for the first ``refusals`` accepts (retry after ``retry_after_s``), then commits."""

    def __init__(self, refusals: int, retry_after_s: float) -> None:
        super().__init__()
        self.left = refusals
        self.retry_after_s = retry_after_s
        self.times: list[float] = []

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        self.times.append(time.monotonic())
        if self.left > 0:
            self.left -= 1
            self.calls += 1
            raise NotReady("outbox busy", retry_after_s=self.retry_after_s)
        await super().accept(events, origin)


async def test_a_transient_refusal_is_a_nak_with_a_delay_and_the_count_reaches_the_envelope(nats_url: str) -> None:
    subject = unique("nak").replace("-", "")
    async with stream(nats_url, [subject]) as name:
        sink, health = FlakySink(refusals=2, retry_after_s=0.3), Health()
        service = inbound(nats_url, sink, health=health, subjects=[subject], jetstream=True, stream=name)
        async with running(service, health):
            nc = await nats.connect(nats_url)
            try:
                await nc.jetstream().publish(subject, b"x", headers={"Nats-Msg-Id": "m-1"})
            finally:
                await nc.close()
            await sink.wait_for(1)
    (env,) = sink.events
    assert env.id == "m-1"  # a raw message's id is its Nats-Msg-Id
    assert env.provenance.deliveries == 3
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    assert all(gap >= 0.25 for gap in gaps), gaps  # redelivered after the nak's delay, not at once


async def test_a_message_delivered_dead_letter_after_times_is_dead_lettered_and_termed(nats_url: str) -> None:
    subject = unique("dla").replace("-", "")
    async with stream(nats_url, [subject]) as name:
        sink, health = FlakySink(refusals=100, retry_after_s=0.05), Health()
        service = inbound(
            nats_url, sink, health=health, subjects=[subject], jetstream=True, stream=name, dead_letter_after=3
        )
        async with running(service, health):
            nc = await nats.connect(nats_url)
            try:
                await nc.jetstream().publish(subject, b"crashes-us")
                await sink.wait_for(0, dead=1)
                async with asyncio.timeout(10):  # the term is on its way (a publish, like every ack)
                    while (info := await nc.jetstream().consumer_info(name, service.durable)).num_ack_pending:
                        await asyncio.sleep(0.02)
            finally:
                await nc.close()
    [(env, reason)] = sink.dead
    assert sink.calls == 2  # tried twice, dead-lettered at the third delivery without a third try
    assert reason == "rejected: delivered 3 times by the stream without a commit"
    assert classify(reason, "") == "ingress"
    assert env.provenance.deliveries == 3
    assert (info.num_ack_pending, info.num_pending) == (0, 0)  # termed: never delivered again


async def test_a_declared_stream_is_created_and_a_required_one_must_exist(nats_url: str) -> None:
    name = unique("D").replace("-", "_")
    subject = name.lower()
    declared = broker(nats_url, streams=[{"name": name, "subjects": [subject], "storage": "memory"}])
    health = Health()
    cfg = NatsInboundConfig.model_validate(
        {"kind": "nats", "broker": "n", "subjects": [subject], "jetstream": True, "stream": name}
    )
    service = NatsInbound("decl", cfg, broker_access("n", declared), Runtime(sink=ListSink(), health=health))
    try:
        async with running(service, health):
            pass
        missing = inbound(nats_url, ListSink(), "req", health, subjects=["x"], jetstream=True, stream=name + "NONE")
        task = asyncio.create_task(missing.run())
        try:
            await wait_until(
                lambda: "does not exist" in str(health.snapshot()["inbound:req"]["detail"]),
                what="the missing stream reported",
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(name)
        finally:
            await nc.close()
