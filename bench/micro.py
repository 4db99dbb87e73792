"""One layer at a time, in this process: ``python -m bench.micro LAYER``.

Where ``make bench`` measures whole paths beside the peers, these isolate the layers a message crosses, so
that a change to one of them can be measured without the rest of the machine's noise (CPU of this process
per message, from getrusage, over the measured part only):

- ``amqp-out``: ``AmqpOutbound.send`` alone: N confirmed persistent 1 KiB publishes, W in flight, to an
  exchange bound to a queue on the shared RabbitMQ (both deleted after).
- ``mqtt-out``: ``MqttOutbound.send`` alone: N QoS 1 publishes, W in flight, to the shared Mosquitto.
- ``http-in``: the HTTP listener and one inbound whose sink accepts at once, under wrk (2 threads, 64
  connections, 6 s).
- ``grpc-in``: the gRPC listener and its inbound with such a sink, under the benchmark's PublishStream
  client (bench/clients.py) in a process of its own, whose CPU per message is printed as well.
- ``--bare`` (``http-in``, ``grpc-in``): the same load on the library alone, the floor under the layer.
- ``amqp-client``: the ceiling's producer alone (bench/clients.py: aio-pika, confirms, persistent), in a
  process of its own, to a queue nobody consumes: its CPU per message.
- ``core``: pipeline, outbox and dispatcher with an outbound that returns at once; 64 concurrent callers
  of ``Pipeline.accept`` (``--outbox memory`` for the in-memory outbox).
- ``tracing``: the receive and send spans of one event around a sink and an outbound that return at once,
  their OTLP encoding per span, and the same two spans as the SDK's span objects.

The numbers quoted in the commit messages of the speed work came from these (then scratch) harnesses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from bench.infra import WORK, free_port
from bench.runner import run_wrk
from mediator.core.envelope import now_timestamp
from mediator.core.ingress import Origin, Principal
from mediator.stages.authn import ANONYMOUS_PRINCIPAL

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PAYLOAD = b'{"s":"1","p":"' + b"x" * 1006 + b'"}'


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report(layer: str, count: int, started: tuple[float, float]) -> str:
    cpu0, t0 = started
    cpu, elapsed = cpu_s() - cpu0, time.perf_counter() - t0
    return f"{layer}: {count} messages, {count / elapsed:,.0f}/s, {1e6 * cpu / count:.1f} us of CPU per message"


def clock() -> tuple[float, float]:
    return cpu_s(), time.perf_counter()


async def until(ready: Callable[[], bool], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not ready():
            await asyncio.sleep(0.01)


async def in_flight(count: int, window: int, one: Callable[[int], Awaitable[None]]) -> None:
    """Call ``one(i)`` for i < count with at most ``window`` calls under way."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    async with asyncio.TaskGroup() as tg:
        for _ in range(window):
            tg.create_task(worker())


def event(i: int) -> Any:
    from mediator.core.envelope import new_event

    return new_event(
        type="com.example.bench", source="/bench", data=PAYLOAD, content_type="application/json", id=f"m-{i}"
    )


async def _remove(client: Any, queue: str, exchange: str) -> None:
    """Delete ``queue`` and ``exchange`` whatever happened (leave nothing on the shared broker), then close."""
    with contextlib.suppress(Exception):
        channel = await client.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)
    await client.close()


async def amqp_out(count: int, window: int) -> str:
    import aio_pika

    from adapters.amqp import AmqpOutbound
    from adapters.amqp.config import AmqpBrokerConfig, AmqpOutboundConfig
    from mediator.core.health import Health

    exchange, queue = f"micro-{uuid.uuid4().hex[:8]}", f"micro.{uuid.uuid4().hex[:8]}"
    cfg = AmqpOutboundConfig.model_validate(
        {"kind": "amqp", "broker": "rabbit", "exchange": exchange, "max_in_flight": window}
    )
    health = Health()
    out = AmqpOutbound("micro", cfg, AmqpBrokerConfig.model_validate({"url": AMQP_URL}), AMQP_URL, health)
    link = asyncio.create_task(out.link.run())
    client = await aio_pika.connect(AMQP_URL)
    try:
        await until(lambda: health.is_ready("outbound:micro"))
        channel = await client.channel()
        q = await channel.declare_queue(queue)
        await q.bind(exchange, routing_key="#")
        events = [event(i) for i in range(count)]
        started = clock()
        await in_flight(count, window, lambda i: out.send(events[i], "micro.out", "binary"))
        return report("amqp-out", count, started)
    finally:
        await _remove(client, queue, exchange)
        link.cancel()
        await asyncio.gather(link, return_exceptions=True)


async def mqtt_out(count: int, window: int) -> str:
    from adapters.mqtt.config import MqttBrokerConfig, MqttOutboundConfig
    from adapters.mqtt.connection import BrokerAccess
    from adapters.mqtt.outbound import MqttOutbound
    from mediator.core.health import Health

    broker = MqttBrokerConfig(host="127.0.0.1", port=1883, client_id=f"micro-{uuid.uuid4().hex[:8]}")
    cfg = MqttOutboundConfig.model_validate({"kind": "mqtt", "broker": "micro", "max_in_flight": window})
    health = Health()
    out = MqttOutbound("micro", cfg, BrokerAccess(name="micro", config=broker, password=None), health)
    service = asyncio.create_task(out.service.run())
    try:
        await until(lambda: health.is_ready(out.component))
        events = [event(i) for i in range(count)]
        started = clock()
        await in_flight(count, window, lambda i: out.send(events[i], "micro/out", "binary"))
        return report("mqtt-out", count, started)
    finally:
        service.cancel()
        await asyncio.gather(service, return_exceptions=True)


class _Accepting:
    """A sink that takes everything at once (after one turn of the loop, as a commit would)."""

    def __init__(self) -> None:
        self.count = 0

    async def authenticate(self, origin: Origin) -> Principal:
        origin.principal = ANONYMOUS_PRINCIPAL
        return ANONYMOUS_PRINCIPAL

    def refused(self, origin: Origin, exc: Exception) -> None:
        pass

    async def accept(self, events: Sequence[Any], origin: Origin | None = None) -> None:
        await asyncio.sleep(0)
        self.count += len(events)

    async def dead_letter(self, event: Any, reason: str) -> None:
        raise RuntimeError(reason)


async def _wrk(port: int, seconds: float) -> None:
    """The benchmark's wrk load (2 threads, 64 connections, its 1 KiB JSON bodies) on ``port``."""
    await asyncio.to_thread(run_wrk, f"http://127.0.0.1:{port}/bench", 0, seconds)


async def http_in(seconds: float, bare: bool) -> str:
    from bench.__main__ import ensure_wrk

    ensure_wrk()
    WORK.mkdir(parents=True, exist_ok=True)  # wrk's request script is written there
    if bare:
        return await _http_floor(seconds)
    from adapters.http.config import HttpInboundConfig, HttpListenerConfig
    from adapters.http.inbound import HttpInbound
    from adapters.http.listener import HttpListener
    from mediator.core.health import Health

    port = free_port()
    listener_cfg = HttpListenerConfig.model_validate({"kind": "http", "port": port})
    inbound_cfg = HttpInboundConfig.model_validate(
        {"kind": "http", "listener": "web", "path": "/bench", "type": "com.example.bench", "source": "/bench"}
    )
    sink = _Accepting()
    listener = HttpListener("web", listener_cfg, [HttpInbound("src", inbound_cfg, listener_cfg, sink)], Health())
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.started.wait(), 10)
        started = clock()
        await _wrk(port, seconds)
        return report("http-in", sink.count, started)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _http_floor(seconds: float) -> str:
    """aiohttp alone: its low-level server with a handler that reads the body and answers 202."""
    from aiohttp import web

    count = 0

    async def handler(request: web.BaseRequest) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.Response(status=202, body=b'{"id":"x"}', content_type="application/json")

    port = free_port()
    server = await asyncio.get_running_loop().create_server(web.Server(handler), "127.0.0.1", port)
    try:
        started = clock()
        await _wrk(port, seconds)
        return report("http-in --bare (aiohttp alone)", count, started)
    finally:
        server.close()
        await server.wait_closed()


async def _drive(spec: dict[str, Any], count: int, window: int) -> tuple[int, float]:
    """Run the benchmark's own producer for ``spec`` (bench/clients.py) in a child process: ``count``
    messages, ``window`` in flight. Returns (accepted, the child's CPU seconds over the run)."""
    from bench.infra import Child, cpu_seconds

    producer = await asyncio.to_thread(Child, "producer", {**spec, "window": window})
    try:
        await asyncio.to_thread(producer.ready)
        pid = producer.proc.pid
        assert pid is not None
        cpu0 = cpu_seconds(pid)
        producer.send("go", {"run": 1, "count": count, "duration_s": 120})
        result = await asyncio.to_thread(producer.expect, "done", 180)
        return int(result["accepted"]), cpu_seconds(pid) - cpu0
    finally:
        await asyncio.to_thread(producer.stop)


async def grpc_in(count: int, window: int, bare: bool) -> str:
    from adapters.grpc.config import GrpcListenerConfig
    from adapters.grpc.inbound import GrpcInbound
    from adapters.grpc.server import GrpcListener
    from mediator.core.health import Health
    from mediator.core.seams import Runtime

    if bare:
        return await _grpc_floor(count, window)
    sink = _Accepting()
    cfg = GrpcListenerConfig.model_validate({"kind": "grpc", "port": 0, "stream_max_in_flight": window})
    listener = GrpcListener("rpc", cfg, Runtime(sink=sink, health=Health()))
    listener.inbound = GrpcInbound("src", sink, stream_max_in_flight=window)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.started.wait(), 10)
        started = clock()
        accepted, client_cpu = await _drive({"kind": "grpc", "port": listener.port}, count, window)
        line = report("grpc-in", accepted, started)
        return f"{line}; the client (grpc.aio PublishStream): {1e6 * client_cpu / max(1, accepted):.1f} us"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _grpc_floor(count: int, window: int) -> str:
    """grpcio alone: a grpc.aio servicer whose PublishStream reads each event and writes its ack."""
    import grpc

    from mediator.v1 import service_pb2_grpc
    from mediator.v1.service_pb2 import PublishAck

    class Bare(service_pb2_grpc.MediatorServicer):
        async def PublishStream(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
            sequence = 0
            while (request := await context.read()) is not grpc.aio.EOF:
                await context.write(PublishAck(id=request.id, sequence=sequence))
                sequence += 1

    server = grpc.aio.server()
    service_pb2_grpc.add_MediatorServicer_to_server(Bare(), server)  # type: ignore[abstract]  # PublishStream only
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        started = clock()
        accepted, client_cpu = await _drive({"kind": "grpc", "port": port}, count, window)
        line = report("grpc-in --bare (grpcio alone)", accepted, started)
        return f"{line}; the client (grpc.aio PublishStream): {1e6 * client_cpu / max(1, accepted):.1f} us"
    finally:
        await server.stop(0)


async def amqp_client(count: int, window: int) -> str:
    """The ceiling's producer alone (aio-pika, confirms, persistent), to a queue nobody consumes."""
    import aio_pika

    exchange, queue = f"micro-{uuid.uuid4().hex[:8]}", f"micro.{uuid.uuid4().hex[:8]}"
    client = await aio_pika.connect(AMQP_URL)
    try:
        channel = await client.channel()
        x = await channel.declare_exchange(exchange, "topic", durable=True)
        q = await channel.declare_queue(queue)
        await q.bind(x, routing_key="#")
        accepted, client_cpu = await _drive(
            {"kind": "amqp", "url": AMQP_URL, "exchange": exchange, "routing_key": "micro"}, count, window
        )
        return f"amqp-client: {accepted} messages, {1e6 * client_cpu / max(1, accepted):.1f} us of CPU per message"
    finally:
        await _remove(client, queue, exchange)


class _Returning:
    name = "micro"
    max_in_flight = 256

    async def send(self, event: Any, address: str, format: str) -> None:
        return None


async def core(count: int, callers: int, outbox: str, metrics: bool = True, store: bool = False) -> str:
    from bench.paths import PATHS, Env
    from mediator.config import load
    from mediator.daemon import Daemon
    from mediator.registry import load_specs

    workdir = tempfile.mkdtemp(prefix="micro-")
    env = Env(
        uid="micro",
        mqtt_port=1883,
        amqp_url=AMQP_URL,
        http_port=free_port(),
        grpc_port=free_port(),
        hook_port=free_port(),
        workdir=workdir,
        outbox=outbox,
        metrics=metrics,
        store=store,
    )
    config_file = Path(workdir) / "config.toml"
    config_file.write_text(PATHS["http-amqp"].config(env))
    daemon = Daemon(load(config_file, load_specs()))
    for dispatcher in daemon.dispatchers.values():
        dispatcher._outbound = _Returning()  # the layer under test ends here
        daemon.health.set(f"outbound:{dispatcher.name}", True)
    await daemon.outbox.open()
    await daemon.history.open()  # with --store: the events written in the outbox's transactions
    numbers = itertools.count()
    try:
        async with asyncio.TaskGroup() as tg:
            dispatchers = [tg.create_task(d.run()) for d in daemon.dispatchers.values()]

            async def caller() -> None:
                while (i := next(numbers)) < count:
                    env_ = event(i)
                    prov = env_.provenance
                    prov.inbound, prov.protocol, prov.topic, prov.topic_separator = "src", "http", "bench", "/"
                    prov.id_minted = True
                    prov.received.CopyFrom(now_timestamp())
                    await daemon.pipeline.accept([env_])

            started = clock()
            async with asyncio.TaskGroup() as callers_group:
                for _ in range(callers):
                    callers_group.create_task(caller())
            await until(lambda: daemon.backlog.value == 0, 60)
            what = f"{outbox} outbox{'' if metrics else ', metrics off'}{', store on' if store else ''}"
            line = report(f"core ({what})", count, started)
            for task in dispatchers:
                task.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await daemon.history.close()
        await daemon.outbox.close()
    return line


async def tracing(count: int) -> str:
    """What tracing at 100% adds per HTTP -> AMQP event: a receive and a send span around an inner sink and
    outbound that return at once (``TracedSink``, ``TracedOutbound``), their OTLP encoding (the export
    thread's work, without the POST), and the same two spans as SDK span objects for comparison."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import SpanKind

    from mediator.core.envelope import Envelope
    from mediator.observability.otlp import Encoder
    from mediator.observability.tracing import Tracing
    from mediator.observability.tracing_config import TracingConfig

    class Inner:
        name = "dst"
        max_in_flight = 1

        async def accept(self, events: Any, origin: Any) -> None:
            return None

        async def send(self, event: Any, address: str, format: str) -> None:
            return None

    cfg = TracingConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", schedule_delay_s=3600.0)
    traced = Tracing(cfg.model_copy(update={"max_queue_size": 2 * count + 1, "max_export_batch": 2 * count + 1}))
    sink, out = traced.sink(Inner()), traced.outbound(Inner(), "amqp")  # type: ignore[arg-type]
    origin = Origin(inbound="src", protocol="http")
    events = []
    for i in range(count):
        env = Envelope(id=f"id-{i}", source="/bench", type="com.example.bench", spec_version="1.0")
        env.provenance.inbound, env.provenance.protocol, env.provenance.topic = "src", "http", "bench"
        events.append(env)
    started = clock()
    for env in events:
        await sink.accept([env], origin)
        await out.send(env, "bench.out", "binary")
    spans_line = report("tracing: receive + send span per event", count, started)
    recorder = traced.recorder
    queued = list(recorder._queue)
    encoder = Encoder(recorder.resource, recorder.scope)
    started = clock()
    for i in range(0, len(queued), 512):
        encoder.request(queued[i : i + 512])
    encode_line = report("tracing: OTLP encoding, per span", len(queued), started)

    class Null(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Null(), max_queue_size=2 * count + 1, schedule_delay_millis=3600e3))
    tracer = provider.get_tracer("bench")
    attrs = {"messaging.system": "rabbitmq", "messaging.destination.name": "bench.out", "messaging.message.id": "x"}
    started = clock()
    for _ in range(count):
        for kind in (SpanKind.SERVER, SpanKind.PRODUCER):
            tracer.start_span("span", kind=kind, attributes=attrs).end()
    sdk_line = report("tracing: the same two spans as SDK span objects (start, end, batch queue)", count, started)
    provider.shutdown()
    recorder._queue.clear()  # nothing to export: the endpoint is nobody's
    await traced.close(1.0)
    return "\n".join((spans_line, encode_line, sdk_line))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("layer", choices=["amqp-out", "mqtt-out", "http-in", "grpc-in", "amqp-client", "core", "tracing"])
    ap.add_argument("-n", "--count", type=int, default=20_000, help="messages (default 20,000)")
    ap.add_argument("-w", "--window", type=int, default=256, help="publishes in flight (default 256)")
    ap.add_argument("--seconds", type=float, default=6.0, help="http-in: how long wrk runs (default 6)")
    ap.add_argument("--outbox", choices=["sqlite", "memory"], default="sqlite", help="core: which outbox")
    ap.add_argument("--no-metrics", action="store_true", help="core: [metrics] enabled = false")
    ap.add_argument("--store", action="store_true", help="core: [store] on (SQLite, in the outbox's transaction)")
    ap.add_argument(
        "--bare",
        action="store_true",
        help="http-in, grpc-in: the library alone (the floor under the layer): aiohttp's low-level server "
        "answering 202 after reading the body; a grpc.aio servicer reading each event and writing its ack",
    )
    args = ap.parse_args(argv)
    from mediator.logs import configure

    configure("warning", "json")
    jobs: dict[str, Callable[[], Coroutine[Any, Any, str]]] = {
        "amqp-out": lambda: amqp_out(args.count, args.window),
        "mqtt-out": lambda: mqtt_out(args.count, args.window),
        "http-in": lambda: http_in(args.seconds, args.bare),
        "grpc-in": lambda: grpc_in(args.count, args.window, args.bare),
        "amqp-client": lambda: amqp_client(args.count, args.window),
        "core": lambda: core(args.count, 64, args.outbox, not args.no_metrics, args.store),
        "tracing": lambda: tracing(args.count),
    }
    try:
        import uvloop

        line: str = uvloop.run(jobs[args.layer]())
    except ImportError:
        line = asyncio.run(jobs[args.layer]())
    print(line)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
