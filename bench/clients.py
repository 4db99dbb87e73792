"""Load generators and consumers. Each runs in its own process (``multiprocessing``, spawn) and talks to
the orchestrator over a ``Pipe``: the orchestrator never shares a CPU-bound loop with them.

Consumer protocol: the child sends ``("ready", info)`` once subscribed/bound/listening, then answers
``("wait", run, expected, idle_s, max_s)`` with ``("stats", dict)`` and ends on ``("stop",)``.
Producer protocol: ``("ready", info)``, then any number of ``("go", params)`` answered by
``("done", dict)``, then ``("stop",)``. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from bench import payload

# ----------------------------------------------------------------------------------------------- tracking


class _Run:
    __slots__ = ("count", "dups", "first", "last", "lat", "seen")

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.count = 0
        self.dups = 0
        self.first = 0
        self.last = 0
        self.lat: list[int] = []


class Tracker:
    """Counts what a consumer received, per run (sequence number // RUN_SPAN). Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[int, _Run] = {}
        self.garbage = 0
        self.changed = time.monotonic()

    def record(self, body: bytes) -> None:
        now = time.monotonic_ns()
        try:
            seq, ts = payload.parse(body)
        except (ValueError, TypeError):
            with self.lock:
                self.garbage += 1
            return
        run_id = seq // payload.RUN_SPAN
        with self.lock:
            run = self.runs.get(run_id)
            if run is None:
                run = self.runs[run_id] = _Run()
                run.first = now
            if seq in run.seen:
                run.dups += 1
            else:
                run.seen.add(seq)
            run.count += 1
            run.last = now
            if ts:
                run.lat.append(now - ts)
        self.changed = time.monotonic()

    def unique(self, run_id: int) -> int:
        with self.lock:
            run = self.runs.get(run_id)
            return len(run.seen) if run else 0

    def wait(self, run_id: int, expected: int, idle_s: float, max_s: float) -> dict[str, Any]:
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if self.unique(run_id) >= expected or now - start > max_s:
                break
            if now - max(start, self.changed) > idle_s:
                break
            time.sleep(0.02)
        time.sleep(0.05)  # let duplicates that trail the last new message show up
        with self.lock:
            run = self.runs.pop(run_id, None) or _Run()
            lat = sorted(run.lat)
            garbage, self.garbage = self.garbage, 0
        return {
            "received": run.count,
            "unique": len(run.seen),
            "duplicates": run.dups,
            "first_ns": run.first,
            "last_ns": run.last,
            "garbage": garbage,
            "lat": percentiles(lat),
            "timed_out": len(run.seen) < expected,
        }


def percentiles(sorted_ns: list[int]) -> dict[str, float] | None:
    if not sorted_ns:
        return None
    n = len(sorted_ns)

    def at(q: float) -> float:
        return sorted_ns[min(n - 1, int(q * n))] / 1e6

    return {"n": n, "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": sorted_ns[-1] / 1e6}


def _serve_consumer(conn: Connection, tracker: Tracker, info: dict[str, Any]) -> None:
    conn.send(("ready", info))
    while True:
        if not conn.poll(600):
            return
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "wait":
            _, run_id, expected, idle_s, max_s = msg
            conn.send(("stats", tracker.wait(run_id, expected, idle_s, max_s)))
        elif msg[0] == "count":
            conn.send(("count", tracker.unique(msg[1])))


def _loop_in_thread() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="consumer-loop").start()
    return loop


def consumer_main(spec: dict[str, Any], conn: Connection) -> None:
    import logging

    for name in ("aio_pika", "aiormq"):  # "consumer cancelled" when its queue is deleted at the end
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        kind = spec["kind"]
        tracker = Tracker()
        if kind == "mqtt":
            _mqtt_consumer(spec, conn, tracker)
            return
        loop = _loop_in_thread()
        starter = {"amqp": _amqp_consumer, "http": _http_consumer, "grpc": _grpc_consumer, "nats": _nats_consumer}[kind]
        fut = asyncio.run_coroutine_threadsafe(starter(spec, tracker), loop)
        info, closer = fut.result(timeout=60)
        try:
            _serve_consumer(conn, tracker, info)
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(closer(), loop).result(timeout=10)
    except Exception:
        conn.send(("error", traceback.format_exc()))


async def _amqp_consumer(spec: dict[str, Any], tracker: Tracker) -> tuple[dict[str, Any], Any]:
    import aio_pika

    conn = await aio_pika.connect(spec["url"])
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=2000)
    if spec.get("declare_exchange", True):
        exchange: Any = await channel.declare_exchange(spec["exchange"], "topic", durable=True)
    else:
        exchange = spec["exchange"]
    queue = await channel.declare_queue(spec["queue"], durable=True, auto_delete=False)
    await queue.bind(exchange, routing_key=spec.get("routing_key", "#"))

    # aio-pika declares and binds (and deletes at the end); the messages come through a consumer of our own
    # (RawAmqpConsumer): aio-pika's two tasks per delivery held this counter to about 3,400 msgs/s, below the
    # RabbitMQ MQTT plugin it is there to count.
    raw = await asyncio.to_thread(RawAmqpConsumer, spec["url"], spec["queue"], tracker.record)

    async def close() -> None:
        with contextlib.suppress(Exception):
            await queue.delete(if_unused=False, if_empty=False)
        raw.close()
        await conn.close()

    return {"queue": spec["queue"]}, close


async def ensure_stream(nc: Any, stream: str, subjects: list[str]) -> None:
    """Create the JetStream stream unless it exists, with the very config the daemon declares from its
    ``[[brokers.nats.streams]]`` (its defaults), so that the daemon's declaration finds it as it is."""
    from nats.js.errors import BadRequestError

    from adapters.nats.config import NatsStreamConfig
    from adapters.nats.connection import stream_config

    with contextlib.suppress(BadRequestError):
        await nc.jetstream().add_stream(stream_config(NatsStreamConfig(name=stream, subjects=tuple(subjects))))


async def _nats_consumer(spec: dict[str, Any], tracker: Tracker) -> tuple[dict[str, Any], Any]:
    """A pull consumer (no acks: a counter) of the stream, fetching up to 1,000 messages per request."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await nats.connect(spec["url"])
    await ensure_stream(nc, spec["stream"], [spec["subject"]])
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.NEW)
    sub = await nc.jetstream().pull_subscribe(spec["subject"], stream=spec["stream"], config=config)

    async def follow() -> None:
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except Exception:  # a status the server answered a pull with (409 and the like): pull again
                await asyncio.sleep(0.01)
                continue
            for m in msgs:
                tracker.record(m.data)

    task = asyncio.create_task(follow())

    async def close() -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await nc.close()

    return {"stream": spec["stream"]}, close


class RawAmqpConsumer:
    """Consumes one queue with automatic acknowledgement on a blocking socket, in a thread of its own, and
    hands every message body to ``on_body``: pamqp encodes the handshake, and the deliveries are cut out
    of the byte stream by their frame headers (AMQP 0-9-1 section 4.2.3), a few microseconds each. The
    consumer is a counter, not the system under test: it must never be what limits a measurement."""

    _FRAME_END = 0xCE

    def __init__(self, url: str, queue: str, on_body: Callable[[bytes], None], prefetch: int = 2000) -> None:
        import socket
        import urllib.parse

        from pamqp import commands, frame, header

        u = urllib.parse.urlsplit(url)
        vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
        self._sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=10)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._on_body = on_body
        self._frame = frame
        self._send(0, header.ProtocolHeader())
        self._expect(commands.Connection.Start)
        user, password = urllib.parse.unquote(u.username or "guest"), urllib.parse.unquote(u.password or "guest")
        self._send(0, commands.Connection.StartOk(mechanism="PLAIN", response=f"\0{user}\0{password}"))
        tune = self._expect(commands.Connection.Tune)
        self._send(0, commands.Connection.TuneOk(channel_max=1, frame_max=tune.frame_max, heartbeat=0))
        self._send(0, commands.Connection.Open(virtual_host=vhost))
        self._expect(commands.Connection.OpenOk)
        self._send(1, commands.Channel.Open())
        self._expect(commands.Channel.OpenOk)
        self._send(1, commands.Basic.Qos(prefetch_count=prefetch))
        self._expect(commands.Basic.QosOk)
        self._send(1, commands.Basic.Consume(queue=queue, no_ack=True))
        self._expect(commands.Basic.ConsumeOk)
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._run, daemon=True, name="amqp-consumer")
        self._thread.start()

    def _send(self, channel: int, value: Any) -> None:
        self._sock.sendall(self._frame.marshal(value, channel))

    def _expect(self, kind: type) -> Any:
        from pamqp.exceptions import UnmarshalingException

        while True:
            try:
                used, _channel, value = self._frame.unmarshal(bytes(self._buf))
            except UnmarshalingException:
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("RabbitMQ closed the connection during the handshake") from None
                self._buf += data
                continue
            del self._buf[:used]
            if isinstance(value, kind):
                return value
            if type(value).__name__ in ("Close",):
                raise ConnectionError(f"RabbitMQ refused: {value!r}")

    def _run(self) -> None:
        buf = self._buf
        body = bytearray()
        size = -1  # the body size of the delivery being read, -1 between deliveries
        try:
            while True:
                data = self._sock.recv(1 << 20)
                if not data:
                    return
                buf += data
                pos = 0
                while len(buf) - pos >= 8:
                    kind = buf[pos]
                    length = int.from_bytes(buf[pos + 3 : pos + 7], "big")
                    end = pos + 7 + length
                    if end >= len(buf):
                        break
                    if buf[end] != self._FRAME_END:
                        raise ConnectionError("AMQP frame out of sync")
                    if kind == 1:  # method: Basic.Deliver (60, 60) starts a message; Basic.Cancel ends it all
                        method = int.from_bytes(buf[pos + 7 : pos + 11], "big")
                        if method == (60 << 16) | 60:
                            size, body = -2, bytearray()
                        elif method in ((60 << 16) | 30, (10 << 16) | 50, (20 << 16) | 40):
                            return
                    elif kind == 2 and size == -2:  # content header: class, weight, body size
                        size = int.from_bytes(buf[pos + 11 : pos + 19], "big")
                        if size == 0:
                            self._on_body(b"")
                            size = -1
                    elif kind == 3 and size >= 0:
                        body += buf[pos + 7 : end]
                        if len(body) >= size:
                            self._on_body(bytes(body))
                            size = -1
                    pos = end + 1
                del buf[:pos]
        except OSError:
            return

    def close(self) -> None:
        import socket

        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


async def _http_consumer(spec: dict[str, Any], tracker: Tracker) -> tuple[dict[str, Any], Any]:
    from aiohttp import web

    async def hook(request: web.Request) -> web.Response:
        tracker.record(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", spec["port"], backlog=1024)
    await site.start()
    return {"port": spec["port"]}, runner.cleanup


async def _grpc_consumer(spec: dict[str, Any], tracker: Tracker) -> tuple[dict[str, Any], Any]:
    import grpc

    from mediator.v1 import service_pb2, service_pb2_grpc

    stop = asyncio.Event()

    async def follow() -> None:
        deadline = time.monotonic() + spec.get("connect_timeout_s", 60)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{spec['port']}") as ch:
                    stub = service_pb2_grpc.MediatorStub(ch)
                    call = stub.Subscribe(service_pb2.SubscribeRequest(outbound=spec.get("outbound", "")))
                    # Subscribe is a live stream: only events routed after the server registered the
                    # subscription (signalled by its initial metadata) reach it; the warm-up repeats until
                    # one arrives (the daemon is started after this consumer).
                    await call.initial_metadata()
                    async for env in call:
                        tracker.record(env.binary_data)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    print(f"bench: gRPC Subscribe ended: {exc.code()} {exc.details()}", file=sys.stderr, flush=True)
                    tracker.garbage += 1_000_000  # make a lost stream impossible to miss
            await asyncio.sleep(0.2)

    task = asyncio.ensure_future(follow())

    async def close() -> None:
        stop.set()
        task.cancel()

    return {"port": spec["port"]}, close


SUBSCRIBER = "mosquitto_sub"
"""The MQTT consumer (package mosquitto-clients, like the generator)."""
READY_MARKER = b"bench-consumer-ready"


def _mqtt_consumer(spec: dict[str, Any], conn: Connection, tracker: Tracker) -> None:
    """``mosquitto_sub -q 1`` (C), one payload a line on its stdout, line-buffered (``stdbuf -oL``: a
    message is read when it arrives, so the end-to-end latency is not the pipe's buffering), counted here.
    A paho subscriber topped out near 12,000 msgs/s on the benchmark machine, below the generator it was
    there to measure. Subscribed is known when a marker published to the filter comes back through it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = spec["topic"]
    argv = [
        "stdbuf",
        "-oL",
        SUBSCRIBER,
        *("-h", spec["host"], "-p", str(spec["port"]), "-t", topic, "-q", "1"),
        *("-i", f"bench-sub-{os.getpid()}", "-k", "60", "--nodelay"),
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            body = line[:-1] if line.endswith(b"\n") else line
            if body == READY_MARKER:
                ready.set()
            else:
                tracker.record(body)

    reader = threading.Thread(target=read, daemon=True, name="mosquitto_sub")
    reader.start()
    marker_topic = "/".join("ready" if level in ("+", "#") else level for level in topic.split("/"))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(spec["host"], spec["port"], keepalive=60)
    client.loop_start()
    try:
        deadline = time.monotonic() + 20
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{SUBSCRIBER} did not subscribe to {topic} on {spec['host']}:{spec['port']}")
            client.publish(marker_topic, READY_MARKER, qos=0)
    finally:
        client.disconnect()
        client.loop_stop()
    try:
        _serve_consumer(conn, tracker, {"topic": topic})
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        reader.join(5)


# ----------------------------------------------------------------------------------------------- producers


class _Pacer:
    """Sends at ``rate`` msgs/s on a fixed schedule (open loop), or as fast as the window allows."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.t0 = time.monotonic()

    def delay(self, i: int) -> float:
        if not self.rate:
            return 0.0
        return self.t0 + i / self.rate - time.monotonic()


def producer_main(spec: dict[str, Any], conn: Connection) -> None:
    try:
        if spec["kind"] == "mqtt":
            _mqtt_producer(spec, conn)
            return
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        producers = {"http": _http_producer, "amqp": _amqp_producer, "grpc": _grpc_producer, "nats": _nats_producer}
        runner(producers[spec["kind"]](spec, conn))
    except Exception:
        conn.send(("error", traceback.format_exc()))


async def _commands(conn: Connection, run: Any) -> None:
    loop = asyncio.get_running_loop()
    while True:
        ready = await loop.run_in_executor(None, conn.poll, 600)
        if not ready:
            return
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "go":
            conn.send(("done", await run(msg[1])))


def _result(sent: int, accepted: int, refused: int, errors: int, t_start: int, t_end: int) -> dict[str, Any]:
    return {
        "sent": sent,
        "accepted": accepted,
        "refused": refused,
        "errors": errors,
        "t_start_ns": t_start,
        "t_end_ns": t_end,
    }


async def _windowed(params: dict[str, Any], send_one: Any, window: int) -> tuple[int, int, int, int, int, int]:
    """Run ``send_one(seq) -> bool|None`` (True accepted, False refused, None error) for up to ``count``
    messages within ``duration_s``, at most ``window`` at once, paced at ``rate`` when given."""
    run_id, count, duration_s, rate = params["run"], params["count"], params["duration_s"], params.get("rate")
    base = run_id * payload.RUN_SPAN + params.get("offset", 0)
    sem = asyncio.Semaphore(window)
    counts = [0, 0, 0]
    tasks: set[asyncio.Task[None]] = set()

    async def one(seq: int) -> None:
        try:
            ok = await send_one(seq)
        except Exception:
            ok = None
        counts[0 if ok else (1 if ok is False else 2)] += 1
        sem.release()

    pacer = _Pacer(rate)
    t_start = time.monotonic_ns()
    deadline = time.monotonic() + duration_s
    sent = 0
    for i in range(count):
        d = pacer.delay(i)
        if d > 0:
            await asyncio.sleep(d)
        if time.monotonic() >= deadline:
            break
        await sem.acquire()
        t = asyncio.ensure_future(one(base + i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        sent += 1
    t_end = time.monotonic_ns()
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    return sent, counts[0], counts[1], counts[2], t_start, t_end


async def _serve_producer(
    conn: Connection, run: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], close: Callable[[], Awaitable[Any]]
) -> None:
    """Report ready, answer the parent's commands with ``run``, and close the client whatever happens."""
    try:
        conn.send(("ready", {}))
        await _commands(conn, run)
    finally:
        await close()


def _windowed_run(
    send_one: Callable[[int], Awaitable[bool]], window: int
) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    async def run(params: dict[str, Any]) -> dict[str, Any]:
        return _result(*await _windowed(params, send_one, params.get("window", window)))

    return run


async def _http_producer(spec: dict[str, Any], conn: Connection) -> None:
    import aiohttp

    url = spec["url"]
    window = spec.get("window", 64)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=window), timeout=aiohttp.ClientTimeout(total=30)
    )
    headers = {"Content-Type": "application/json", **spec.get("headers", {})}

    async def send_one(seq: int) -> bool:
        async with session.post(url, data=payload.make(seq, time.monotonic_ns()), headers=headers) as resp:
            await resp.read()
            return 200 <= resp.status < 300

    await _serve_producer(conn, _windowed_run(send_one, window), session.close)


async def _amqp_producer(spec: dict[str, Any], conn: Connection) -> None:
    import aio_pika

    connection = await aio_pika.connect(spec["url"])
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(spec["exchange"], "topic", durable=True)
    routing_key = spec.get("routing_key", "bench")
    window = spec.get("window", 256)

    async def send_one(seq: int) -> bool:
        msg = aio_pika.Message(
            payload.make(seq, time.monotonic_ns()),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"b-{seq}",
        )
        await exchange.publish(msg, routing_key=routing_key)
        return True

    await _serve_producer(conn, _windowed_run(send_one, window), connection.close)


async def _nats_producer(spec: dict[str, Any], conn: Connection) -> None:
    """JetStream publishes, each accepted once the stream's ack came (as the daemon's outbound waits)."""
    import nats

    nc = await nats.connect(spec["url"], pending_size=64 * 1024 * 1024)
    subject = spec["subject"]
    await ensure_stream(nc, spec["stream"], [subject.rsplit(".", 1)[0] + ".>"])
    js = nc.jetstream()
    window = spec.get("window", 512)

    async def send_one(seq: int) -> bool:
        body = payload.make(seq, time.monotonic_ns())
        await js.publish(subject, body, timeout=10, headers={"Nats-Msg-Id": f"b-{seq}"})
        return True

    await _serve_producer(conn, _windowed_run(send_one, window), nc.close)


async def _grpc_producer(spec: dict[str, Any], conn: Connection) -> None:
    import grpc

    from mediator.v1 import envelope_pb2, service_pb2_grpc

    window = spec.get("window", 256)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{spec['port']}")
    stub = service_pb2_grpc.MediatorStub(channel)

    async def run(params: dict[str, Any]) -> dict[str, Any]:
        run_id, count, duration_s, rate = params["run"], params["count"], params["duration_s"], params.get("rate")
        base = run_id * payload.RUN_SPAN + params.get("offset", 0)
        sem = asyncio.Semaphore(params.get("window", window))
        call = stub.PublishStream()
        counts = {"accepted": 0, "refused": 0}
        sent = 0

        async def read_acks() -> None:
            async for ack in call:
                counts["accepted" if ack.code == 0 else "refused"] += 1
                sem.release()

        reader = asyncio.ensure_future(read_acks())
        pacer = _Pacer(rate)
        t_start = time.monotonic_ns()
        deadline = time.monotonic() + duration_s
        errors = 0
        try:
            for i in range(count):
                d = pacer.delay(i)
                if d > 0:
                    await asyncio.sleep(d)
                if time.monotonic() >= deadline or reader.done():
                    break
                await sem.acquire()
                seq = base + i
                env = envelope_pb2.Envelope(
                    id=f"b-{seq}", source="/bench", spec_version="1.0", type="com.example.bench"
                )
                env.binary_data = payload.make(seq, time.monotonic_ns())
                await call.write(env)
                sent += 1
            t_end = time.monotonic_ns()
            await call.done_writing()
            await asyncio.wait_for(reader, timeout=30)
        except Exception:
            errors = 1
            t_end = time.monotonic_ns()
            reader.cancel()
        return _result(sent, counts["accepted"], counts["refused"], errors, t_start, t_end)

    await _serve_producer(conn, run, channel.close)


def _mqtt_producer(spec: dict[str, Any], conn: Connection) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    CALLBACK_V2 = CallbackAPIVersion.VERSION2

    window = spec.get("window", 256)
    sem = threading.Semaphore(window)
    acked = [0]
    connected = threading.Event()
    client = mqtt.Client(CALLBACK_V2, client_id="", protocol=mqtt.MQTTv311)

    def on_connect(*args: Any) -> None:
        connected.set()

    def on_publish(c: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        acked[0] += 1
        sem.release()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.connect(spec["host"], spec["port"], keepalive=60)
    client.socket().setsockopt(6, 1, 1)  # type: ignore[union-attr]  # TCP_NODELAY
    client.loop_start()
    if not connected.wait(20):
        raise RuntimeError("MQTT producer could not connect")
    topic = spec["topic"]

    def run(params: dict[str, Any], stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """paho publishes (``stop``: a condition that ends the run early, checked before each one)."""
        run_id, count, duration_s, rate = params["run"], params["count"], params["duration_s"], params.get("rate")
        base = run_id * payload.RUN_SPAN + params.get("offset", 0)
        acked[0] = 0
        pacer = _Pacer(rate)
        t_start = time.monotonic_ns()
        deadline = time.monotonic() + duration_s
        sent = errors = 0
        for i in range(count):
            d = pacer.delay(i)
            if d > 0:
                time.sleep(d)
            if time.monotonic() >= deadline or stop():
                break
            if not sem.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
            info = client.publish(topic, payload.make(base + i, time.monotonic_ns()), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                errors += 1
                sem.release()
            else:
                sent += 1
        t_end = time.monotonic_ns()
        wait_until = time.monotonic() + 30
        while acked[0] < sent and time.monotonic() < wait_until:
            time.sleep(0.01)
        return _result(sent, acked[0], 0, errors, t_start, t_end)

    try:
        conn.send(("ready", {}))
        while conn.poll(600):
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "go":
                params = msg[1]
                conn.send(("done", generator_run(spec, params, run) if params.get("generator") else run(params)))
    finally:
        client.disconnect()
        client.loop_stop()


GENERATOR = "mosquitto_pub"
"""The C load generator of the MQTT paths' saturation runs (package mosquitto-clients)."""


def generator_argv(spec: dict[str, Any], client_id: str) -> list[str]:
    """``mosquitto_pub -l``: one QoS 1 PUBLISH per line of stdin, ``max_inflight`` unacknowledged at once."""
    return [
        GENERATOR,
        *("-h", spec["host"], "-p", str(spec["port"]), "-t", spec["topic"], "-i", client_id),
        *("-q", "1", "-l", "-M", str(spec.get("max_inflight", 100)), "--nodelay", "-k", "60"),
    ]


def generator_run(
    spec: dict[str, Any], params: dict[str, Any], paho_run: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    """One saturation run of the C generator: ``count`` payload lines (``payload.make``, send time 0: the C
    client cannot stamp each line with the time it sends it) piped into ``mosquitto_pub -l``, beside paho
    probes at ``probe_rate`` msgs/s that carry the send time (end-to-end latency at saturation) until the
    generator exits. mosquitto_pub exits 0 after the broker acknowledged its last PUBLISH, and a broker
    acknowledges QoS 1 in order: exit 0 means all ``count`` were acknowledged, anything else none of them
    counts as accepted. ``generator`` in the result: its exit code, its own publish rate (lines
    acknowledged / (exit - first line)), and its CPU as % of one core."""
    run_id, count = params["run"], params["count"]
    base = run_id * payload.RUN_SPAN + params.get("offset", 0)
    lines = b"".join(payload.make(base + i, 0) + b"\n" for i in range(count))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        generator_argv(spec, f"bench-gen-{os.getpid()}-{run_id}"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.3)  # connected by now and blocked on stdin: the clock starts with the first line
    t_start = time.monotonic_ns()
    out: dict[str, Any] = {}

    def feed() -> None:
        try:
            out["stderr"] = proc.communicate(lines, timeout=params.get("max_s", 300))[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            out["stderr"] = proc.communicate()[1]

    feeder = threading.Thread(target=feed, daemon=True, name="generator-feed")
    feeder.start()
    probe_rate = params.get("probe_rate")
    probe = (
        paho_run(
            {
                "run": run_id,
                "count": 10**6,
                "duration_s": params.get("max_s", 300),
                "rate": probe_rate,
                "offset": params.get("probe_offset", 0),
            },
            lambda: proc.poll() is not None,
        )
        if probe_rate
        else _result(0, 0, 0, 0, t_start, t_start)
    )
    feeder.join()
    t_end = time.monotonic_ns()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    ok = proc.returncode == 0
    span_s = max(1e-9, (t_end - t_start) / 1e9)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    res = _result(
        count + probe["sent"],
        (count if ok else 0) + probe["accepted"],
        probe["refused"],
        (0 if ok else count) + probe["errors"],
        t_start,
        t_end,
    )
    res["generator"] = {
        "argv": generator_argv(spec, "ID"),
        "exit": proc.returncode,
        "count": count,
        "publish_msgs_s": round(count / span_s, 1) if ok else None,
        "cpu_percent": round(100 * cpu / span_s, 1),
        "stderr": out.get("stderr", b"").decode(errors="replace")[-500:],
        "probes_accepted": probe["accepted"],
    }
    return res
