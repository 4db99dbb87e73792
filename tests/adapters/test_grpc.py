"""The gRPC adapter against a real grpc.aio channel and the generated stub."""

from __future__ import annotations

import asyncio
import socket
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adapters.grpc import ADAPTER, GrpcInboundConfig, GrpcListener, GrpcListenerConfig, GrpcOutboundConfig
from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import ConfigError, NotReady, Overloaded, RejectCode, Rejected
from mediator.core.health import Health
from mediator.core.ingress import Origin
from mediator.core.seams import AdapterConfig, Outbound, Runtime
from mediator.v1.envelope_pb2 import Provenance
from mediator.v1.service_pb2 import PublishAck, SubscribeRequest
from mediator.v1.service_pb2_grpc import MediatorStub
from tests.support.fakes import ListSink
from tests.support.net import free_port, wait_until

pytestmark = pytest.mark.timeout(60)

SERVICE = "mediator.v1.Mediator"


@dataclass
class Gateway:
    listener: GrpcListener
    sink: ListSink
    health: Health
    outbounds: dict[str, Outbound]
    channel: grpc.aio.Channel
    stub: Any  # MediatorAsyncStub
    task: asyncio.Task[None]

    async def stop(self) -> None:
        """Stop the listener as the daemon does: cancel its run()."""
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@asynccontextmanager
async def running(
    *,
    inbound: bool = True,
    outbounds: Sequence[str] = ("subs-a", "subs-b"),
    subscriber_queue: int = 1024,
    stream_max_in_flight: int = 256,
    sink: Any = None,
    health: Health | None = None,
    **listener_options: Any,
) -> AsyncIterator[Gateway]:
    """A built gRPC listener, running on a free port, with a channel to it."""
    sink = sink if sink is not None else ListSink()
    health = health if health is not None else Health()
    cfg = AdapterConfig(
        listeners={
            "grpc": GrpcListenerConfig(
                kind="grpc", port=free_port(), stream_max_in_flight=stream_max_in_flight, **listener_options
            )
        },
        inbounds={"api": GrpcInboundConfig(kind="grpc", listener="grpc")} if inbound else {},
        outbounds={
            name: GrpcOutboundConfig(kind="grpc", listener="grpc", subscriber_queue=subscriber_queue)
            for name in outbounds
        },
    )
    built = ADAPTER.build(cfg, Runtime(sink=sink, health=health))
    (listener,) = built.services
    assert isinstance(listener, GrpcListener)
    listener.health_poll_s = 0.02  # the test waits for health changes; no need for the 1 s default
    task = asyncio.create_task(listener.run(), name="test:grpc-listener")
    try:
        async with asyncio.timeout(5):
            await listener.started.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listener.port}") as channel:
            gateway = Gateway(listener, sink, health, built.outbounds, channel, MediatorStub(channel), task)
            yield gateway
    finally:
        if not task.done():
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def event(i: int, *, type: str = "com.example.thing", source: str = "/test", data: bytes = b"{}") -> Envelope:
    env = new_event(type=type, source=source, data=data, content_type="application/json", id=f"ev-{i}")
    env.attributes["seq"].ce_integer = i
    return env


def routed(env: Envelope) -> Envelope:
    """``env`` as the dispatcher holds it: with provenance, which subscribers must never see."""
    env.provenance.CopyFrom(Provenance(inbound="devices", protocol="mqtt", topic="a/b", topic_separator="/"))
    return env


# ---------------------------------------------------------------- config and build


def test_config_toml_grpc_sections_validate() -> None:
    doc = tomllib.loads(Path(__file__).parents[2].joinpath("config.toml").read_text())
    listener = GrpcListenerConfig.model_validate(doc["listeners"]["grpc"])
    inbound = GrpcInboundConfig.model_validate(doc["inbound"]["grpc"])
    outbound = GrpcOutboundConfig.model_validate(doc["outbound"]["subscribers"])
    assert (listener.host, listener.port, listener.reflection) == ("127.0.0.1", 50051, True)
    assert (listener.max_message_bytes, listener.stream_max_in_flight, listener.grace_s) == (4194304, 256, 5.0)
    assert inbound.connection() == "grpc"
    assert (outbound.connection(), outbound.subscriber_queue) == ("grpc", 1024)


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        GrpcListenerConfig.model_validate({"kind": "grpc", "prot": 1})


def test_build_refuses_two_inbounds_on_one_listener_and_dangling_listeners() -> None:
    cfg = AdapterConfig(
        listeners={"grpc": GrpcListenerConfig(kind="grpc")},
        inbounds={
            "a": GrpcInboundConfig(kind="grpc", listener="grpc"),
            "b": GrpcInboundConfig(kind="grpc", listener="grpc"),
            "c": GrpcInboundConfig(kind="grpc", listener="nope"),
        },
        outbounds={"o": GrpcOutboundConfig(kind="grpc", listener="missing")},
    )
    with pytest.raises(ConfigError) as info:
        ADAPTER.build(cfg, Runtime(sink=ListSink(), health=Health()))
    problems = "\n".join(info.value.problems)
    assert "inbound.b.listener" in problems
    assert "at most one gRPC inbound per listener" in problems
    assert "inbound.c.listener" in problems
    assert "outbound.o.listener" in problems


async def test_bind_failure_raises() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        health = Health()
        cfg = AdapterConfig(listeners={"grpc": GrpcListenerConfig(kind="grpc", port=port)})
        (listener,) = ADAPTER.build(cfg, Runtime(sink=ListSink(), health=health)).services
        with pytest.raises(OSError, match="cannot bind"):
            async with asyncio.timeout(10):
                await listener.run()
        assert health.snapshot()["listener:grpc"] == {"ready": False, "detail": f"cannot bind 127.0.0.1:{port}"}


# ---------------------------------------------------------------- Publish


async def test_publish_commits_then_replies_with_provenance_set() -> None:
    async with running() as gw:
        env = event(1, data=b'{"n":1}')
        env.attributes["subject"].ce_string = "thing-7"
        env.provenance.CopyFrom(Provenance(inbound="forged", protocol="mqtt", principal="root"))
        before = time.time_ns()
        reply = await gw.stub.Publish(env, timeout=5)
        after = time.time_ns()

        assert reply.id == "ev-1"
        assert len(gw.sink.events) == 1
        got = gw.sink.events[0]
        assert (got.id, got.source, got.type, got.spec_version) == ("ev-1", "/test", "com.example.thing", "1.0")
        assert got.binary_data == b'{"n":1}'
        assert got.attributes["subject"].ce_string == "thing-7"
        assert got.attributes["seq"].ce_integer == 1
        assert got.attributes["time"] == env.attributes["time"]
        prov = got.provenance
        assert (prov.inbound, prov.protocol, prov.topic, prov.topic_separator) == ("api", "grpc", "Publish", "/")
        assert prov.principal == ""  # the sender's provenance is discarded, not merged
        assert before <= prov.received.ToNanoseconds() <= after


async def test_publish_invalid_is_invalid_argument() -> None:
    async with running() as gw:
        env = event(1)
        env.type = ""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Publish(env, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "type" in (info.value.details() or "")
        assert gw.sink.calls == 0


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (RejectCode.INVALID, grpc.StatusCode.INVALID_ARGUMENT),
        (RejectCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
        (RejectCode.FORBIDDEN, grpc.StatusCode.PERMISSION_DENIED),
        (RejectCode.TOO_LARGE, grpc.StatusCode.INVALID_ARGUMENT),
        (RejectCode.UNSUPPORTED_MEDIA, grpc.StatusCode.INVALID_ARGUMENT),
        (RejectCode.RATE_LIMITED, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_publish_rejected_maps_to_status(code: RejectCode, status: grpc.StatusCode) -> None:
    async with running() as gw:
        gw.sink.fail_with = Rejected(code, "refused by a stage")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Publish(event(1), timeout=5)
        assert info.value.code() == status
        assert info.value.details() == "refused by a stage"


async def test_publish_not_ready_is_unavailable_with_reason() -> None:
    async with running() as gw:
        gw.sink.fail_with = NotReady("outbox full", retry_after_s=2.5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Publish(event(1), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "outbox full"
        assert ("grpc-retry-pushback-ms", "2500") in tuple(info.value.trailing_metadata() or ())


async def test_publish_overloaded_is_resource_exhausted() -> None:
    async with running() as gw:
        gw.sink.fail_with = Overloaded("outbox holds 10 undelivered events", retry_after_s=2.0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Publish(event(1), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        call = gw.stub.PublishStream(iter([event(2)]), timeout=5)
        [ack] = [a async for a in call]
        assert ack.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


async def test_publish_without_inbound_is_unimplemented() -> None:
    async with running(inbound=False) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Publish(event(1), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = gw.stub.PublishStream(iter([event(2)]), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------- PublishStream


async def test_publish_stream_acks_every_event_in_order() -> None:
    async with running() as gw:
        sent = []
        for i in range(500):
            env = event(i)
            if i % 7 == 3:
                env.source = ""  # invalid: a non-zero ack, and the stream goes on
            sent.append(env)

        async def requests() -> AsyncIterator[Envelope]:
            for env in sent:
                yield env

        acks: list[PublishAck] = [ack async for ack in gw.stub.PublishStream(requests(), timeout=30)]

        assert [a.sequence for a in acks] == list(range(500))
        assert [a.id for a in acks] == [f"ev-{i}" for i in range(500)]
        invalid = {i for i in range(500) if i % 7 == 3}
        assert [a.code for a in acks] == [3 if i in invalid else 0 for i in range(500)]
        assert all("source" in acks[i].reason for i in invalid)
        committed = sorted(int(e.id[3:]) for e in gw.sink.events)
        assert committed == sorted(set(range(500)) - invalid)
        assert {e.provenance.topic for e in gw.sink.events} == {"PublishStream"}
        assert {e.provenance.inbound for e in gw.sink.events} == {"api"}


class GatedSink(ListSink):
    """Holds every accept until ``gate`` opens; then refuses a call holding one of the ids in ``refuse``
    (NotReady refuses the whole call, as a full outbox would; Rejected refuses that call as a stage would).
    Records the ids of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0
        self.refuse: dict[str, Exception] = {}
        self.batches: list[list[str]] = []
        self.not_ready: set[str] = set()

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        ids = [e.id for e in events]
        self.batches.append(ids)
        for exc in (self.refuse.get(i) for i in ids):
            if isinstance(exc, NotReady):
                self.not_ready.update(ids)
                raise exc
        for exc in (self.refuse.get(i) for i in ids):
            if exc is not None:
                raise exc
        await super().accept(events, origin)


async def test_publish_stream_pauses_reading_at_max_in_flight_and_commits_what_queued_together() -> None:
    sink = GatedSink()
    sink.refuse = {
        "ev-10": NotReady("draining"),
        "ev-11": Rejected(RejectCode.FORBIDDEN, "not yours"),
    }
    async with running(sink=sink, stream_max_in_flight=4) as gw:
        call = gw.stub.PublishStream(timeout=30)
        for i in range(4):
            await call.write(event(i))
        await wait_until(lambda: sink.waiting == 1)  # ev-0 commits; ev-1..3 are read and wait their turn

        async def rest() -> None:
            for i in range(4, 50):
                await call.write(event(i))
            await call.done_writing()

        writer = asyncio.create_task(rest())
        await asyncio.sleep(0.3)  # not synchronisation: proves nothing more gets read meanwhile
        assert sink.waiting == 1
        assert sink.batches == []

        sink.gate.set()
        acks = []
        async with asyncio.timeout(10):
            while (ack := await call.read()) is not grpc.aio.EOF:
                acks.append(ack)
            await writer
    # The window held four: ev-0 alone, then exactly the three read while it committed, as one batch.
    assert sink.batches[:2] == [["ev-0"], ["ev-1", "ev-2", "ev-3"]]
    assert all(len(b) <= 4 for b in sink.batches)
    assert [a.sequence for a in acks] == list(range(50))
    # A NotReady refuses the batch it came with (UNAVAILABLE); a rejected event alone is refused (7).
    assert "ev-10" in sink.not_ready
    expected = [14 if f"ev-{i}" in sink.not_ready else 7 if i == 11 else 0 for i in range(50)]
    assert [a.code for a in acks] == expected
    assert acks[10].reason == "draining"
    accepted = {e.id for e in sink.events}
    assert accepted == {f"ev-{i}" for i in range(50) if expected[i] == 0}


# ---------------------------------------------------------------- Subscribe


async def collect_until(call: Any, end_id: str, into: list[Envelope]) -> None:
    async for env in call:
        if env.id == end_id:
            return
        into.append(env)


async def test_subscribe_filters_get_exactly_the_matching_events() -> None:
    async with running() as gw:
        filters = {
            "type": SubscribeRequest(type="com.example.order.*"),
            "outbound": SubscribeRequest(outbound="subs-b"),
            "address": SubscribeRequest(address="orders.*"),
            "source": SubscribeRequest(source="/dev/1?"),
            "all": SubscribeRequest(),
            "both": SubscribeRequest(outbound="subs-a", type="com.example.device.*", address="telemetry"),
        }
        calls = {name: gw.stub.Subscribe(req, timeout=30) for name, req in filters.items()}
        got: dict[str, list[Envelope]] = {name: [] for name in filters}
        readers = [asyncio.create_task(collect_until(calls[n], "end", got[n])) for n in filters]
        await wait_until(lambda: gw.listener.hub.subscriber_count == len(filters))

        types = ["com.example.order.created", "com.example.device.telemetry", "com.example.orders"]
        plan = []  # (event, outbound, address)
        for i in range(60):
            env = routed(event(i, type=types[i % 3], source=f"/dev/{i % 20}"))
            plan.append((env, "subs-a" if i % 2 else "subs-b", "orders.created" if i % 5 else "telemetry"))
        for env, outbound, address in plan:
            await gw.outbounds[outbound].send(env, address, "binary")
        # End markers: the first matches every filter but "both", the second matches "both".
        end = new_event(type="com.example.order.end", source="/dev/10", data=b"", id="end")
        await gw.outbounds["subs-b"].send(end, "orders.end", "binary")
        end = new_event(type="com.example.device.end", source="/dev/10", data=b"", id="end")
        await gw.outbounds["subs-a"].send(end, "telemetry", "binary")
        async with asyncio.timeout(10):
            await asyncio.gather(*readers)

        def expected(keep: Callable[[Envelope, str, str], bool]) -> list[str]:
            return [env.id for env, outbound, address in plan if keep(env, outbound, address)]

        ids = {name: [e.id for e in envs] for name, envs in got.items()}
        assert ids["type"] == expected(lambda e, o, a: e.type.startswith("com.example.order."))
        assert ids["outbound"] == expected(lambda e, o, a: o == "subs-b")
        assert ids["address"] == expected(lambda e, o, a: a.startswith("orders."))
        assert ids["source"] == expected(lambda e, o, a: e.source in {f"/dev/{n}" for n in range(10, 20)})
        assert ids["all"] == expected(lambda e, o, a: True)
        assert ids["both"] == expected(
            lambda e, o, a: o == "subs-a" and e.type == "com.example.device.telemetry" and a == "telemetry"
        )
        assert all(ids.values())
        received = [e for envs in got.values() for e in envs]
        assert not any(e.HasField("provenance") for e in received)
        first = got["all"][0]
        assert first.attributes["seq"].ce_integer == 0
        assert first.binary_data == b"{}"
        assert all(env.HasField("provenance") for env, _, _ in plan)  # send never modifies its event
        for call in calls.values():
            call.cancel()
        await wait_until(lambda: gw.listener.hub.subscriber_count == 0)


async def test_subscribe_initial_metadata_means_the_subscription_is_live() -> None:
    async with running() as gw:
        call = gw.stub.Subscribe(SubscribeRequest(), timeout=30)
        metadata = await call.initial_metadata()
        assert ("mediator-subscribed", "1") in tuple(metadata or ())
        # No polling: once the metadata arrived, the very next event sent reaches the stream.
        await gw.outbounds["subs-a"].send(routed(event(7)), "x", "binary")
        async with asyncio.timeout(10):
            first = await anext(aiter(call))
        assert first.id == event(7).id
        call.cancel()


async def test_subscribe_while_events_flow_does_not_break_the_call() -> None:
    """Initial metadata and the first writes must not overlap on the call (one send at a time)."""
    async with running() as gw:
        stop = asyncio.Event()

        async def flood() -> None:
            i = 0
            while not stop.is_set():
                await gw.outbounds["subs-a"].send(routed(event(i)), "x", "binary")
                i += 1
                # About 500 events/s: enough to race the subscription, slow enough for any subscriber to
                # keep up (a faster flood would rightly get it cut off as too slow).
                await asyncio.sleep(0.002)

        flooder = asyncio.create_task(flood())
        try:
            for _ in range(10):  # several subscriptions, each racing the flood
                call = gw.stub.Subscribe(SubscribeRequest(), timeout=30)
                got = []
                async with asyncio.timeout(10):
                    async for env in call:
                        got.append(env)
                        if len(got) == 50:
                            break
                call.cancel()
                assert len(got) == 50
        finally:
            stop.set()
            await flooder


async def test_subscribe_unknown_outbound_is_not_found() -> None:
    async with running() as gw:
        call = gw.stub.Subscribe(SubscribeRequest(outbound="nope"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_send_without_subscribers_succeeds() -> None:
    async with running() as gw:
        await gw.outbounds["subs-a"].send(routed(event(1)), "x", "binary")
        await gw.outbounds["subs-a"].send(routed(event(2)), "x", "structured")
        await gw.outbounds["subs-a"].send(routed(event(3)), "x", "protobuf")
        assert gw.listener.hub.subscriber_count == 0


async def test_slow_subscriber_is_disconnected_while_fast_one_keeps_receiving() -> None:
    async with running(outbounds=("subs",), subscriber_queue=8) as gw:
        slow = gw.stub.Subscribe(SubscribeRequest(), timeout=60)  # never read until the end
        fast = gw.stub.Subscribe(SubscribeRequest(), timeout=60)
        fast_got: asyncio.Queue[Envelope] = asyncio.Queue()

        async def read_fast() -> None:
            async for env in fast:
                fast_got.put_nowait(env)

        reader = asyncio.create_task(read_fast())
        await wait_until(lambda: gw.listener.hub.subscriber_count == 2)

        outbound = gw.outbounds["subs"]
        payload = b"x" * 4096  # fills the slow stream's HTTP/2 window quickly
        sent = 0
        async with asyncio.timeout(30):
            # Send one at a time and wait for the fast subscriber to get it: it is never "too slow".
            while gw.listener.hub.subscriber_count == 2:
                await outbound.send(routed(event(sent, data=payload)), "a", "binary")
                assert (await fast_got.get()).id == f"ev-{sent}"
                sent += 1
            for _ in range(100):  # the fast one keeps receiving after the slow one is gone
                await outbound.send(routed(event(sent, data=payload)), "a", "binary")
                assert (await fast_got.get()).id == f"ev-{sent}"
                sent += 1

        slow_ids: list[str] = []

        async def read_slow() -> None:
            async for env in slow:
                slow_ids.append(env.id)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(read_slow(), 10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == "subscriber too slow"
        # Not a silent loss: what the slow subscriber got is a gap-free prefix, then the error.
        assert slow_ids == [f"ev-{i}" for i in range(len(slow_ids))]
        assert len(slow_ids) < sent - 100
        fast.cancel()
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader


async def test_stop_ends_subscribers_and_reports_not_ready() -> None:
    health = Health()
    async with running(health=health) as gw:
        call = gw.stub.Subscribe(SubscribeRequest(), timeout=30)
        await wait_until(lambda: gw.listener.hub.subscriber_count == 1)
        snap = health.snapshot()
        assert all(snap[c]["ready"] for c in ("listener:grpc", "inbound:api", "outbound:subs-a", "outbound:subs-b"))
        stopping = time.monotonic()
        await gw.stop()
        assert time.monotonic() - stopping < 2  # subscribers do not hold the shutdown grace period (5 s)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "listener shutting down"
    snap = health.snapshot()
    assert not any(snap[c]["ready"] for c in ("listener:grpc", "inbound:api", "outbound:subs-a"))


# ---------------------------------------------------------------- health and reflection


async def test_health_follows_daemon_readiness() -> None:
    health = Health()
    health.register("outbox")  # another component, not ready yet
    async with running(health=health) as gw:
        stub = health_pb2_grpc.HealthStub(gw.channel)

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=s), timeout=10) for s in ("", SERVICE)]

        async def next_status(expected: int) -> None:
            async with asyncio.timeout(5):
                for watch in watches:
                    while (await watch.read()).status != expected:
                        pass
                for service in ("", SERVICE):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert reply.status == expected

        await next_status(not_serving)
        health.set("outbox", True)
        await next_status(serving)
        health.draining = True
        await next_status(not_serving)
        for watch in watches:
            watch.cancel()


async def test_reflection_lists_the_services() -> None:
    async with running() as gw:
        stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        replies = [r async for r in stub.ServerReflectionInfo(requests(), timeout=5)]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_reflection_can_be_disabled() -> None:
    async with running(reflection=False) as gw:
        stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.ServerReflectionInfo(requests(), timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_max_message_bytes_bounds_requests() -> None:
    async with running(max_message_bytes=2048) as gw:
        assert (await gw.stub.Publish(event(1, data=b"x" * 1500), timeout=5)).id == "ev-1"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Publish(event(2, data=b"x" * 4096), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [e.id for e in gw.sink.events] == ["ev-1"]
