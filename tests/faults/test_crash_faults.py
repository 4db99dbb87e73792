"""Crash and broker faults against the running daemon, counted end to end.

Every event carries a producer id and a sequence number (``{"p": ..., "s": ...}`` as its payload). A
producer counts as acknowledged only what its protocol confirmed: HTTP 202, gRPC reply or ack code 0, an
MQTT publish that returned after its PUBACK, an AMQP publish confirmed by the broker. After each fault the
test heals, drains and asserts, per flow, that ``lost = acknowledged - received`` is empty and nothing
arrived that was never sent; duplicates (at-least-once) are printed and bounded.

The brokers a test breaks are its own (a Mosquitto per test, a second RabbitMQ node per session, a TCP
proxy in front of the shared RabbitMQ); the shared instances are only ever used, never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.support.brokers import MosquittoInstance, RabbitNode
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import unique
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.slow

Key = tuple[str, int]

RETRY_S = 0.1  # a producer's pause before it tries an unacknowledged event again
SEND_TIMEOUT_S = 5.0  # every producer call is bounded by this
MAX_EVENTS = 3000  # per producer: every load loop is bounded in count, whatever the test does
DRAIN_S = 60.0
QUIET_S = 1.0  # after the drain: late duplicates or strays have this long to show up
# At-least-once: a fault may repeat what was in flight on each hop (one window of max_in_flight, prefetch
# or Receive Maximum, 256 each) plus the events a sender sent again after losing our answer.
MAX_DUPLICATES = 512

# Short backoffs so a healed path drains in seconds (the shipped defaults cap at 30 s).
FAST_BROKERS: dict[str, dict[str, object]] = {
    "brokers.mosquitto": {"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0},
    "brokers.rabbit": {"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0},
}
FAST_OUTBOUNDS: dict[str, dict[str, object]] = {
    f"outbound.{name}": {"send_timeout_s": 5.0, "retry": {"backoff_initial_s": 0.1, "backoff_max_s": 1.0}}
    for name in ("orders-exchange", "telemetry-exchange", "mqtt")
}


def fast(extra: dict[str, dict[str, object]] | None = None) -> dict[str, dict[str, object]]:
    """The Quickstart overrides of every test here, plus ``extra`` (merged per section)."""
    out = {section: {**keys} for section, keys in (FAST_OUTBOUNDS | FAST_BROKERS).items()}
    for section, keys in (extra or {}).items():
        out[section] = {**out.get(section, {}), **keys}
    return out


# ------------------------------------------------------------------------------------------- the books


def payload(key: Key) -> bytes:
    return json.dumps({"p": key[0], "s": key[1]}).encode()


@dataclass
class Sent:
    """What one producer sent (attempted) and what its protocol confirmed (acked)."""

    pid: str
    attempted: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)


@dataclass
class Flow:
    """Events of some producers, as one destination received them."""

    name: str
    senders: list[Sent]
    received: list[Key] = field(default_factory=list)

    def acked(self) -> set[Key]:
        return {(s.pid, n) for s in self.senders for n in s.acked}

    def attempted(self) -> set[Key]:
        return {(s.pid, n) for s in self.senders for n in s.attempted}

    def lost(self) -> set[Key]:
        return self.acked() - set(self.received)

    def unexpected(self) -> set[Key]:
        return set(self.received) - self.attempted()

    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))


class Books:
    """Every flow of one test; receivers hand each message body to ``receive`` with their destination."""

    def __init__(self) -> None:
        self.senders: dict[str, Sent] = {}
        self.flows: dict[str, Flow] = {}
        self._route: dict[tuple[str, str], Flow] = {}
        self.strays: list[tuple[str, bytes]] = []

    def sender(self, pid: str) -> Sent:
        return self.senders.setdefault(pid, Sent(pid))

    def flow(self, name: str, dest: str, pids: Iterable[str]) -> Flow:
        flow = self.flows[name] = Flow(name, [self.sender(p) for p in pids])
        for pid in pids:
            self._route[(dest, pid)] = flow
        return flow

    def receive(self, dest: str, body: bytes) -> None:
        try:
            doc = json.loads(body)
            key: Key = (str(doc["p"]), int(doc["s"]))
            flow = self._route[(dest, key[0])]
        except (ValueError, KeyError, TypeError):
            self.strays.append((dest, body[:200]))
            return
        flow.received.append(key)

    def acked(self) -> int:
        return sum(len(s.acked) for s in self.senders.values())

    def acked_by(self, pids: Iterable[str]) -> int:
        return sum(len(self.senders[p].acked) for p in pids)

    def drained(self) -> bool:
        return all(not f.lost() for f in self.flows.values())

    def report(self, title: str) -> str:
        lines = [f"== {title}"]
        for f in self.flows.values():
            dup = Counter(f.received)
            worst = [f"{p}:{s}x{n}" for (p, s), n in dup.most_common(3) if n > 1]
            lines.append(
                f"  {f.name}: attempted={len(f.attempted())} acked={len(f.acked())} received={len(f.received)} "
                f"distinct={len(set(f.received))} lost={len(f.lost())} unexpected={len(f.unexpected())} "
                f"duplicates={f.duplicates()} {' '.join(worst)}"
            )
        if self.strays:
            lines.append(f"  strays: {self.strays[:5]}")
        return "\n".join(lines)

    def check(self, title: str, max_duplicates: int = MAX_DUPLICATES) -> None:
        text = self.report(title)
        print(text)
        for f in self.flows.values():
            assert f.acked(), f"{f.name}: nothing was acknowledged, the test proves nothing\n{text}"
            lost = sorted(f.lost())
            assert not lost, f"{f.name}: {len(lost)} acknowledged events never arrived: {lost[:20]}\n{text}"
            unexpected = sorted(f.unexpected())
            assert not unexpected, f"{f.name}: arrived but never sent: {unexpected[:20]}\n{text}"
            assert f.duplicates() <= max_duplicates, f"{f.name}: too many duplicates\n{text}"
        assert not self.strays, text


async def until(cond: Callable[[], bool], timeout_s: float, what: str, why: Callable[[], str] = str) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{why()}") from None


async def drain(books: Books, daemon: DaemonProcess, title: str) -> None:
    await until(books.drained, DRAIN_S, f"{title}: drain", lambda: books.report(title) + "\n" + daemon.logs()[-6000:])
    await asyncio.sleep(QUIET_S)


# ------------------------------------------------------------------------------------------- producers


def _cancelled_by_caller() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def http_producer(
    port: int,
    sent: Sent,
    stop: asyncio.Event,
    pace_s: float,
    *,
    limit: int = MAX_EVENTS,
    new_connections: bool = False,
) -> None:
    """POST /orders, one at a time; a request not answered 202 is sent again (same sequence number).
    ``new_connections``: a connection per request (so SO_REUSEPORT spreads them over workers)."""
    url = f"http://127.0.0.1:{port}/orders"
    timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT_S)
    connector = aiohttp.TCPConnector(force_close=True) if new_connections else None
    seq = 0
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        while seq < limit and not stop.is_set():
            sent.attempted.add(seq)
            try:
                async with http.post(
                    url, data=payload((sent.pid, seq)), headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    ok = resp.status == 202
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                sent.acked.add(seq)
                seq += 1
                await asyncio.sleep(pace_s)
            else:
                await asyncio.sleep(RETRY_S)


def grpc_event(uid: str, key: Key) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(
        id=f"{key[0]}-{key[1]}", source=f"/faults/{uid}", spec_version="1.0", type="com.example.order.created"
    )
    env.attributes["datacontenttype"].ce_string = "application/json"
    env.binary_data = payload(key)
    return env


async def grpc_unary_producer(port: int, uid: str, sent: Sent, stop: asyncio.Event, pace_s: float) -> None:
    seq = 0
    while seq < MAX_EVENTS and not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.MediatorStub(channel)
                while seq < MAX_EVENTS and not stop.is_set():
                    sent.attempted.add(seq)
                    reply = await stub.Publish(grpc_event(uid, (sent.pid, seq)), timeout=SEND_TIMEOUT_S)
                    assert reply.id == f"{sent.pid}-{seq}"
                    sent.acked.add(seq)
                    seq += 1
                    await asyncio.sleep(pace_s)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(RETRY_S)


async def grpc_stream_producer(port: int, uid: str, sent: Sent, stop: asyncio.Event, pace_s: float) -> None:
    """PublishStream: acks come in order, one per event; after a broken stream (or a refused event) a new
    stream resends from the first unacknowledged event (same ids, so the daemon deduplicates)."""
    seq = 0
    while seq < MAX_EVENTS and not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.MediatorStub(channel)
                call: Any = stub.PublishStream()
                first = seq

                async def write(call: Any = call, first: int = first) -> None:
                    n = first
                    while n < MAX_EVENTS and not stop.is_set():
                        sent.attempted.add(n)
                        await call.write(grpc_event(uid, (sent.pid, n)))
                        n += 1
                        await asyncio.sleep(pace_s)
                    await call.done_writing()

                writer = asyncio.create_task(write())
                try:
                    async with asyncio.timeout(120):  # bounded like everything else; the test ends sooner
                        async for ack in call:
                            n = first + ack.sequence
                            if ack.code != 0:
                                break
                            assert ack.id == f"{sent.pid}-{n}", (ack.id, n)
                            sent.acked.add(n)
                            seq = n + 1
                finally:
                    writer.cancel()
                    await asyncio.wait([writer])
                    if not writer.cancelled():
                        writer.exception()  # retrieved: the stream's own error says it already
                    call.cancel()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        if seq < MAX_EVENTS and not stop.is_set():
            await asyncio.sleep(RETRY_S)


async def mqtt_producer(port: int, topic: str, sent: Sent, stop: asyncio.Event, pace_s: float) -> None:
    """QoS 1 publishes, each returning after its PUBACK; reconnects after a broker restart."""
    seq = 0
    while seq < MAX_EVENTS and not stop.is_set():
        try:
            async with aiomqtt.Client(
                "127.0.0.1", port, identifier=unique(f"pub-{sent.pid}"), timeout=SEND_TIMEOUT_S
            ) as client:
                while seq < MAX_EVENTS and not stop.is_set():
                    sent.attempted.add(seq)
                    await client.publish(topic, payload((sent.pid, seq)), qos=1, timeout=SEND_TIMEOUT_S)
                    sent.acked.add(seq)
                    seq += 1
                    await asyncio.sleep(pace_s)
        except (aiomqtt.MqttError, TimeoutError):
            await asyncio.sleep(RETRY_S)


async def amqp_producer(
    url: str, exchange: str, routing_key: str, sent: Sent, stop: asyncio.Event, pace_s: float
) -> None:
    """Persistent, mandatory publishes with publisher confirms to an exchange the daemon declared; an
    unconfirmed one is sent again with the same message id (the daemon's event id)."""
    seq = 0
    while seq < MAX_EVENTS and not stop.is_set():
        conn: aio_pika.abc.AbstractConnection | None = None
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                conn = await aio_pika.connect(url, timeout=SEND_TIMEOUT_S)
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                ex = await channel.get_exchange(exchange, ensure=True)
            while seq < MAX_EVENTS and not stop.is_set():
                sent.attempted.add(seq)
                message = aio_pika.Message(
                    payload((sent.pid, seq)),
                    content_type="application/json",
                    message_id=f"{sent.pid}-{seq}",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await ex.publish(message, routing_key=routing_key, mandatory=True)
                sent.acked.add(seq)
                seq += 1
                await asyncio.sleep(pace_s)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            # aiormq cancels a pending confirmation when the channel closes under it.
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError, RuntimeError):
            pass
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await conn.close()
        if seq < MAX_EVENTS and not stop.is_set():
            await asyncio.sleep(RETRY_S)


class Producers:
    """Producer tasks of one test; ``stop`` ends them (bounded), ``cancel`` in teardown."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, coro: Any) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def finish(self, timeout_s: float = 20.0) -> None:
        self.stop.set()
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*self.tasks)

    async def cancel(self) -> None:
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)


# ------------------------------------------------------------------------------------------- receivers


async def declare_queue(url: str, name: str, bindings: list[tuple[str, str]]) -> None:
    """A durable queue bound to (durable topic) exchanges, so deliveries are routable before anyone consumes
    and survive a broker restart."""
    conn = await aio_pika.connect(url, timeout=10)
    async with conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(name, durable=True)
        for exchange, key in bindings:
            ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            await queue.bind(ex, key)


async def delete_queue(url: str, name: str) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            conn = await aio_pika.connect(url, timeout=5)
            async with conn:
                channel = await conn.channel()
                await channel.queue_delete(name)


@contextlib.asynccontextmanager
async def consuming(url: str, queue_name: str, books: Books, dest: str, robust: bool = False) -> AsyncIterator[None]:
    """A consumer of a durable queue. ``robust``: it comes back after the node was stopped (aio-pika's robust
    connection re-declares and re-consumes); what was unacknowledged then is delivered again (counted)."""
    conn = await (
        aio_pika.connect_robust(url, timeout=10, reconnect_interval=1) if robust else aio_pika.connect(url, timeout=10)
    )
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(queue_name, durable=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            books.receive(dest, message.body)
            await message.ack()

        await queue.consume(on_message)
        yield
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await conn.close()


class MqttReceiver:
    """A QoS 1 subscriber with a persistent session (MQTT 3.1.1, clean session off) that reconnects, so
    what the broker queued for it while it or the broker was away still arrives."""

    def __init__(self, port: int, filters: list[str], books: Books, dest: str) -> None:
        self.port = port
        self.filters = filters
        self.books = books
        self.dest = dest
        self.client_id = unique("sub")
        self.subscribed = asyncio.Event()
        self.connects = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MqttReceiver:
        self._task = asyncio.create_task(self._run(), name=f"receiver:{self.client_id}")
        await until(self.subscribed.is_set, 10, "the MQTT receiver to subscribe")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=10)

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=False,
                    timeout=SEND_TIMEOUT_S,
                ) as client:
                    self.connects += 1
                    await client.subscribe([(f, 1) for f in self.filters])
                    self.subscribed.set()
                    async for message in client.messages:
                        body = message.payload
                        self.books.receive(self.dest, body if isinstance(body, bytes) else str(body).encode())
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.2)


# ------------------------------------------------------------------------------------------- the rig


async def readyz(port: int) -> dict[str, Any]:
    """The per-component readiness, or {} while the listener does not answer."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            body: dict[str, Any] = await resp.json(content_type=None)
            return body
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


@contextlib.asynccontextmanager
async def daemon_running(qs: Quickstart, tmp: Path) -> AsyncIterator[DaemonProcess]:
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
    await daemon.start(timeout_s=60)
    try:
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.returncode is None:
            try:
                await daemon.stop(timeout_s=30)
            except TimeoutError:
                await daemon.kill()


async def stop_cleanly(daemon: DaemonProcess) -> None:
    code = await daemon.stop(timeout_s=30)
    assert code == 0, f"daemon exited with {code} on SIGTERM:\n{daemon.logs()}"
    log = daemon.log_path.read_text(errors="replace")
    dead = log.count("delivery.dead_lettered")
    assert dead == 0, f"{dead} deliveries were dead-lettered:\n{daemon.logs()}"


@pytest.fixture
async def mosquitto_own(tmp_path: Path) -> AsyncIterator[MosquittoInstance]:
    broker = MosquittoInstance(tmp_path / "mosquitto")
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


# ------------------------------------------------------------------ 1. kill -9 of the daemon mid-stream

KILL_AFTER_ACKS = 150
MORE_AFTER_RESTART = 150


@pytest.mark.timeout(150)
@pytest.mark.parametrize("inbound", ["http", "grpc", "mqtt", "amqp"])
async def test_daemon_kill9_mid_stream_loses_nothing_acknowledged(
    inbound: str, tmp_path: Path, rabbitmq: str, mosquitto_own: MosquittoInstance
) -> None:
    """kill -9 while producers run concurrently, restart on the same config and outbox: everything any
    sender saw acknowledged arrives."""
    qs = Quickstart(tmp_path, mqtt_port=mosquitto_own.port, overrides=fast())
    books = Books()
    producers = Producers()
    queue_name = unique("faults.kill")
    title = f"kill -9 of the daemon, {inbound} inbound"
    pids = [f"{inbound[0]}{i}" for i in range(4)]
    if inbound in ("http", "grpc"):
        books.flow(f"{inbound}->amqp", "amqp", pids)
        await declare_queue(rabbitmq, queue_name, [(qs.orders_exchange, "orders.created")])
    elif inbound == "mqtt":
        books.flow("mqtt->amqp", "amqp", pids)
        await declare_queue(rabbitmq, queue_name, [(qs.telemetry_exchange, "telemetry.#")])
    else:
        books.flow("amqp->mqtt", "mqtt", pids)
    receiver = MqttReceiver(mosquitto_own.port, [f"{qs.topic_prefix}devices/+/commands"], books, "mqtt")
    try:
        async with (
            daemon_running(qs, tmp_path) as daemon,
            consuming(rabbitmq, queue_name, books, "amqp") if inbound != "amqp" else contextlib.nullcontext(),
            receiver if inbound == "amqp" else contextlib.nullcontext(),
        ):
            for i, pid in enumerate(pids):
                sent = books.sender(pid)
                if inbound == "http":
                    producers.start(pid, http_producer(qs.http_port, sent, producers.stop, 0.002))
                elif inbound == "grpc":
                    run = grpc_unary_producer if i == 0 else grpc_stream_producer
                    producers.start(pid, run(qs.grpc_port, qs.uid, sent, producers.stop, 0.002))
                elif inbound == "mqtt":
                    topic = f"{qs.topic_prefix}devices/{pid}/telemetry"
                    producers.start(pid, mqtt_producer(mosquitto_own.port, topic, sent, producers.stop, 0.002))
                else:
                    producers.start(
                        pid, amqp_producer(rabbitmq, qs.commands_exchange, pid, sent, producers.stop, 0.002)
                    )
            flow = next(iter(books.flows.values()))
            await until(
                lambda: books.acked() >= KILL_AFTER_ACKS and len(flow.received) >= KILL_AFTER_ACKS // 4,
                30,
                "the first acknowledgements",
                lambda: books.report(title),
            )
            await daemon.kill()
            at_kill = books.acked()
            received_at_kill = len(flow.received)
            await asyncio.sleep(0.3)
            await daemon.start(timeout_s=60)
            await until(
                lambda: books.acked() >= at_kill + MORE_AFTER_RESTART, 30, "acks after the restart", daemon.logs
            )
            await producers.finish()
            await drain(books, daemon, title)
            print(f"{title}: acked before the kill={at_kill}, received before the kill={received_at_kill}")
            books.check(title)
            await stop_cleanly(daemon)
    finally:
        await producers.cancel()
        await delete_queue(rabbitmq, queue_name)


# ------------------------------------------------------------------ 2. RabbitMQ (own node) stopped / killed


@pytest.fixture(scope="session")
def rabbit_session() -> Iterator[RabbitNode]:
    """A second RabbitMQ node this session owns (never the shared one); the tests stop and kill it."""
    node = RabbitNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()
        node.remove()


@pytest.fixture
async def rabbit_node(rabbit_session: RabbitNode) -> RabbitNode:
    """The session's own node, running (a test that killed it and failed may have left it down)."""
    if not await asyncio.to_thread(rabbit_session.is_running):
        await rabbit_session.astart()
    elif await rabbit_session.actl("await_startup", "--timeout", "5", check=False) != 0:
        await rabbit_session.start_app()
    return rabbit_session


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["stop_app", "kill9"])
async def test_rabbitmq_outage_under_load(
    fault: str, tmp_path: Path, rabbit_node: RabbitNode, mosquitto_own: MosquittoInstance
) -> None:
    """HTTP -> AMQP exchange and AMQP -> MQTT through the own node while it is stopped (``rabbitmqctl
    stop_app`` / ``start_app``) or its Erlang VM is killed with -9 and started again."""
    url = rabbit_node.url
    qs = Quickstart(tmp_path, mqtt_port=mosquitto_own.port, amqp_port=rabbit_node.port, overrides=fast())
    books = Books()
    producers = Producers()
    queue_name = unique("faults.rabbit")
    http_pids, amqp_pids = ["h0", "h1"], ["a0", "a1"]
    books.flow("http->amqp", "amqp", http_pids)
    books.flow("amqp->mqtt", "mqtt", amqp_pids)
    title = f"RabbitMQ {fault}"
    await declare_queue(url, queue_name, [(qs.orders_exchange, "orders.created")])
    receiver = MqttReceiver(mosquitto_own.port, [f"{qs.topic_prefix}devices/+/commands"], books, "mqtt")
    try:
        async with daemon_running(qs, tmp_path) as daemon, receiver:
            for pid in http_pids:
                producers.start(pid, http_producer(qs.http_port, books.sender(pid), producers.stop, 0.01))
            for pid in amqp_pids:
                producers.start(
                    pid, amqp_producer(url, qs.commands_exchange, pid, books.sender(pid), producers.stop, 0.01)
                )
            await until(
                lambda: books.acked_by(http_pids) >= 100 and books.acked_by(amqp_pids) >= 100,
                30,
                "acks before the fault",
                lambda: books.report(title),
            )
            before = {p: len(books.senders[p].acked) for p in books.senders}
            t0 = time.monotonic()
            if fault == "stop_app":
                await rabbit_node.stop_app()
            else:
                await rabbit_node.akill()
            # HTTP producers keep getting 202s meanwhile: the outbox holds their events (waited for with a
            # deadline, not a fixed 2 s that a slow machine may spend before the first one).
            acked_before = sum(before[p] for p in http_pids)
            await until(
                lambda: books.acked_by(http_pids) - acked_before >= 20,
                20,
                "HTTP acks while RabbitMQ is down",
                lambda: books.report(title),
            )
            during = books.acked_by(http_pids) - acked_before
            if fault == "stop_app":
                await rabbit_node.start_app()
            else:
                await rabbit_node.astart()
            outage_s = time.monotonic() - t0
            await daemon.wait_ready(60)
            healed = {p: len(books.senders[p].acked) for p in books.senders}
            await until(
                lambda: all(len(books.senders[p].acked) >= healed[p] + 50 for p in books.senders),
                60,
                "acks after the broker came back",
                lambda: books.report(title) + daemon.logs()[-4000:],
            )
            await producers.finish()
            async with consuming(url, queue_name, books, "amqp"):
                await drain(books, daemon, title)
            # Consumers restored: the daemon's inbound consumes its queue again on the restarted node.
            conn = await aio_pika.connect(url, timeout=10)
            async with conn:
                channel = await conn.channel()
                queue = await channel.declare_queue(qs.commands_queue, passive=True)
                consumers = queue.declaration_result.consumer_count
            print(f"{title}: outage {outage_s:.1f} s, HTTP acks during the outage={during}, consumers={consumers}")
            books.check(title)
            assert during > 0, "HTTP intake stopped while RabbitMQ was down: the outbox should take it"
            assert consumers == 1, f"the daemon's consumer on {qs.commands_queue} is not back ({consumers})"
            await stop_cleanly(daemon)
    finally:
        await producers.cancel()
        await delete_queue(url, queue_name)


# ------------------------------------------------------------------ 3. Mosquitto (own) restarted


@pytest.mark.timeout(120)
async def test_mosquitto_restart_under_load_both_directions(
    tmp_path: Path, rabbitmq: str, mosquitto_own: MosquittoInstance
) -> None:
    """MQTT -> AMQP (telemetry) and HTTP -> MQTT, AMQP -> MQTT (orders, commands) while the own Mosquitto
    is restarted. Its persistence keeps sessions and queued messages across a clean restart, so every
    acknowledged event must still arrive: the daemon's inbound session comes back with its unacknowledged
    messages, and its outbound publishes again what the broker never confirmed."""
    qs = Quickstart(tmp_path, mqtt_port=mosquitto_own.port, overrides=fast())
    books = Books()
    producers = Producers()
    queue_name = unique("faults.mosq")
    books.flow("mqtt->amqp", "amqp", ["m0", "m1"])
    books.flow("http->amqp", "amqp", ["h0"])
    books.flow("http->mqtt", "mqtt", ["h0"])
    books.flow("amqp->mqtt", "mqtt", ["a0"])
    title = "Mosquitto restart"
    await declare_queue(
        rabbitmq, queue_name, [(qs.telemetry_exchange, "telemetry.#"), (qs.orders_exchange, "orders.created")]
    )
    filters = [f"{qs.topic_prefix}orders/created", f"{qs.topic_prefix}devices/+/commands"]
    receiver = MqttReceiver(mosquitto_own.port, filters, books, "mqtt")
    try:
        async with (
            daemon_running(qs, tmp_path) as daemon,
            consuming(rabbitmq, queue_name, books, "amqp"),
            receiver,
        ):
            for pid in ("m0", "m1"):
                topic = f"{qs.topic_prefix}devices/{pid}/telemetry"
                producers.start(pid, mqtt_producer(mosquitto_own.port, topic, books.sender(pid), producers.stop, 0.01))
            producers.start("h0", http_producer(qs.http_port, books.sender("h0"), producers.stop, 0.01))
            producers.start(
                "a0", amqp_producer(rabbitmq, qs.commands_exchange, "a0", books.sender("a0"), producers.stop, 0.01)
            )
            await until(
                lambda: (
                    all(len(s.acked) >= 80 for s in books.senders.values())
                    and all(len(f.received) >= 20 for f in books.flows.values())
                ),
                30,
                "events flowing before the fault",
                lambda: books.report(title),
            )
            await mosquitto_own.restart(kill=False, down_s=1.0)
            await daemon.wait_ready(30)
            healed = {p: len(s.acked) for p, s in books.senders.items()}
            await until(
                lambda: all(len(s.acked) >= healed[p] + 50 for p, s in books.senders.items()),
                30,
                "acks after the restart",
                lambda: books.report(title),
            )
            await producers.finish()
            await drain(books, daemon, title)
            print(f"{title}: receiver connections={receiver.connects}")
            books.check(title)
            assert receiver.connects >= 2, "the receiver never saw the broker go"
            await stop_cleanly(daemon)
    finally:
        await producers.cancel()
        await delete_queue(rabbitmq, queue_name)


# ------------------------------------------------------------------ 4. a black-holed broker connection

KEEPALIVE_S = 2  # MQTT keepalive and AMQP heartbeat of the daemon in this test
BLACK_HOLE_S = 4 * KEEPALIVE_S
COMPONENTS = {
    "mqtt": {"inbound:devices", "outbound:mqtt"},
    "amqp": {"inbound:commands", "outbound:orders-exchange", "outbound:telemetry-exchange"},
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("link", ["mqtt", "amqp"])
async def test_black_holed_broker_connection_is_detected_and_recovered(
    link: str, tmp_path: Path, rabbitmq: str, mosquitto_own: MosquittoInstance
) -> None:
    """The daemon reaches both brokers through TCP proxies. One proxy stops forwarding without closing
    anything, for longer than the keepalive/heartbeat: the daemon must notice (readyz), reconnect after
    the path heals, and deliver everything acknowledged, in all four flows."""
    books = Books()
    producers = Producers()
    queue_name = unique("faults.hole")
    books.flow("http->amqp", "amqp", ["h0"])
    books.flow("mqtt->amqp", "amqp", ["m0"])
    books.flow("http->mqtt", "mqtt", ["h0"])
    books.flow("amqp->mqtt", "mqtt", ["a0"])
    title = f"black-holed {link} connection"
    async with TcpProxy(mosquitto_own.port) as mqtt_proxy, TcpProxy(5672) as amqp_proxy:
        proxy = mqtt_proxy if link == "mqtt" else amqp_proxy
        overrides = fast(
            {
                "brokers.mosquitto": {"keepalive_s": KEEPALIVE_S, "connect_timeout_s": 2.0},
                "brokers.rabbit": {"heartbeat_s": KEEPALIVE_S, "connect_timeout_s": 2.0},
            }
        )
        qs = Quickstart(tmp_path, mqtt_port=mqtt_proxy.port, amqp_port=amqp_proxy.port, overrides=overrides)
        await declare_queue(
            rabbitmq, queue_name, [(qs.orders_exchange, "orders.created"), (qs.telemetry_exchange, "telemetry.#")]
        )
        filters = [f"{qs.topic_prefix}orders/created", f"{qs.topic_prefix}devices/+/commands"]
        receiver = MqttReceiver(mosquitto_own.port, filters, books, "mqtt")  # producers and receivers: direct
        try:
            async with (
                daemon_running(qs, tmp_path) as daemon,
                consuming(rabbitmq, queue_name, books, "amqp"),
                receiver,
            ):
                producers.start("h0", http_producer(qs.http_port, books.sender("h0"), producers.stop, 0.01))
                topic = f"{qs.topic_prefix}devices/m0/telemetry"
                producers.start(
                    "m0", mqtt_producer(mosquitto_own.port, topic, books.sender("m0"), producers.stop, 0.01)
                )
                producers.start(
                    "a0",
                    amqp_producer(rabbitmq, qs.commands_exchange, "a0", books.sender("a0"), producers.stop, 0.01),
                )
                await until(
                    lambda: all(len(f.received) >= 20 for f in books.flows.values()),
                    30,
                    "events flowing before the fault",
                    lambda: books.report(title),
                )
                accepted = proxy.accepted
                proxy.black_hole()
                t0 = time.monotonic()
                down: dict[str, float] = {}
                async with asyncio.timeout(BLACK_HOLE_S + 20):
                    while time.monotonic() - t0 < BLACK_HOLE_S or not COMPONENTS[link] <= down.keys():
                        for name, state in (await readyz(qs.http_port)).items():
                            if not state.get("ready", True) and name not in down:
                                down[name] = round(time.monotonic() - t0, 1)
                        await asyncio.sleep(0.1)
                proxy.heal()
                held = time.monotonic() - t0
                await daemon.wait_ready(60)
                healed = {p: len(s.acked) for p, s in books.senders.items()}
                await until(
                    lambda: all(len(s.acked) >= healed[p] + 50 for p, s in books.senders.items()),
                    30,
                    "acks after the path healed",
                    lambda: books.report(title),
                )
                await producers.finish()
                await drain(books, daemon, title)
                print(f"{title}: held {held:.1f} s; not ready after (s): {down}; proxy connections {proxy.accepted}")
                books.check(title)
                assert COMPONENTS[link] <= down.keys(), f"not detected: {COMPONENTS[link] - down.keys()}"
                assert proxy.accepted > accepted, "the daemon never opened a new connection"
                await stop_cleanly(daemon)
        finally:
            await producers.cancel()
            await delete_queue(rabbitmq, queue_name)
