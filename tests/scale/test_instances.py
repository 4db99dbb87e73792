"""Many instances: three daemons, each its own process with its own outbox, sharing the load on one
RabbitMQ and one Mosquitto without coordinating with each other (DESIGN.md section 3).

The three configs differ only in their HTTP and gRPC ports, the MQTT client id, the outbox file and the
``source`` of their broker inbounds (``mqtt://instance-N/...``, ``amqp://instance-N/...``, so that a
consumer can tell which instance carried an event). The load is spread the way an operator would spread it:

- HTTP: each producer sends to the three ports in turn and, like a load balancer with a health check, moves
  to the next port when one refuses the connection;
- MQTT: the devices inbound subscribes through a shared subscription (``$share/<group>/<filter>``), so
  Mosquitto hands each message to one of the three sessions; routes still match the real topic;
- AMQP: the commands inbound of all three consumes the same (quorum) queue: competing consumers.

One daemon is killed with ``kill -9`` mid-stream and started again on the same config and outbox. Every
event any producer saw acknowledged must arrive (counted by sequence number); duplicates are reported and
bounded. Mosquitto is the test's own (the shared one's Debian default of 1,000 queued messages per session
would drop what queues for the killed daemon's session while it is away: the broker settings the README's
"Many instances" section asks for); RabbitMQ is the shared one, with names unique to the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomqtt
import pytest

from tests.faults.test_crash_faults import (
    RETRY_S,
    SEND_TIMEOUT_S,
    Books,
    Producers,
    Sent,
    amqp_producer,
    delete_queue,
    fast,
    mqtt_producer,
    stop_cleanly,
    until,
)
from tests.support.brokers import MosquittoInstance
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import unique

pytestmark = pytest.mark.slow

INSTANCES = 3
PRODUCERS = 3  # per protocol
PACE_S = 0.002  # each producer's pause between acknowledged events
MAX_EVENTS = 3000  # per producer, whatever happens
KILL_AFTER = 300  # acknowledged events per protocol before the kill
MORE_AFTER_RESTART = 300  # acknowledged events per protocol after the killed daemon is back
VICTIM = 1
# At-least-once across a kill -9: what the killed daemon had taken but not acknowledged (MQTT Receive
# Maximum and AMQP prefetch, 256 each) comes again, to it or to another instance, and so does what its
# outbox had sent but not yet marked delivered.
MAX_DUPLICATES = 512


def instance_of(source: str) -> int | None:
    """The instance that made an event, from its ``source`` (``mqtt://instance-2/devices/m0``)."""
    host = source.split("://", 1)[-1].split("/", 1)[0]
    return int(host.removeprefix("instance-")) if host.startswith("instance-") else None


class Spread:
    """Which instance carried each event, per flow (from the consumer side)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int | None]] = Counter()

    def add(self, flow: str, instance: int | None) -> None:
        self.counts[(flow, instance)] += 1

    def of(self, flow: str) -> dict[int | None, int]:
        return {i: n for (f, i), n in sorted(self.counts.items(), key=str) if f == flow}


def configs(tmp: Path, mqtt_port: int) -> list[Quickstart]:
    """The shipped config three times: one uid (the same exchanges, queue and topics), one shared
    subscription group; per instance its ports, client id, outbox and source."""
    uid = unique("scale")
    out = []
    for i in range(INSTANCES):
        qs = Quickstart(tmp / f"instance-{i}", uid=uid, mqtt_port=mqtt_port)
        qs.tmp.mkdir(parents=True)
        qs.overrides = fast(
            {
                "brokers.mosquitto": {"client_id": f"mediator-{uid}-{i}"},
                "inbound.devices": {
                    "topics": [f"$share/mediator-{uid}/{qs.topic_prefix}devices/+/telemetry"],
                    "source": f"mqtt://instance-{i}/devices/{{topic.2}}",
                },
                "inbound.commands": {"source": f"amqp://instance-{i}/commands", "queue_type": "quorum"},
            }
        )
        out.append(qs)
    return out


async def http_spread_producer(
    ports: list[int], offset: int, sent: Sent, stop: asyncio.Event, served: Counter[int]
) -> None:
    """POST /orders to the instances in turn (one request each), as a round-robin load balancer would; a
    request that is not answered 202 is sent again, same sequence number, to the next instance."""
    timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT_S)
    turn = offset
    seq = 0
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while seq < MAX_EVENTS and not stop.is_set():
            i = turn % len(ports)
            turn += 1
            sent.attempted.add(seq)
            body = json.dumps({"p": sent.pid, "s": seq}).encode()
            try:
                async with http.post(
                    f"http://127.0.0.1:{ports[i]}/orders", data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    ok = resp.status == 202
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                sent.acked.add(seq)
                served[i] += 1
                seq += 1
                await asyncio.sleep(PACE_S)
            else:
                await asyncio.sleep(RETRY_S)


@contextlib.asynccontextmanager
async def amqp_consumer(url: str, queue_name: str, qs: Quickstart, books: Books, spread: Spread) -> AsyncIterator[None]:
    """One durable queue bound to the orders and telemetry exchanges; each message counted in the books
    and, for telemetry, by the instance its ``cloudEvents_source`` names."""
    conn = await aio_pika.connect(url, timeout=10)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(queue_name, durable=True)
        for exchange, key in ((qs.orders_exchange, "orders.created"), (qs.telemetry_exchange, "telemetry.#")):
            ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            await queue.bind(ex, key)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            books.receive("amqp", message.body)
            if message.routing_key and message.routing_key.startswith("telemetry."):
                spread.add("mqtt->amqp", instance_of(str(message.headers.get("cloudEvents_source", ""))))
            await message.ack()

        await queue.consume(on_message)
        yield
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await conn.close()


class CommandsReceiver:
    """An MQTT 5 QoS 1 subscriber to the commands topics; the ``source`` user property of each message
    (binary mode) names the instance that consumed it from the queue."""

    def __init__(self, port: int, topic: str, books: Books, spread: Spread) -> None:
        self.port, self.topic, self.books, self.spread = port, topic, books, spread
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CommandsReceiver:
        self._task = asyncio.create_task(self._run(), name="receiver:commands")
        await until(self.subscribed.is_set, 10, "the MQTT receiver to subscribe")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=10)

    async def _run(self) -> None:
        async with aiomqtt.Client(
            "127.0.0.1", self.port, identifier=unique("sub"), protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            await client.subscribe(self.topic, qos=1)
            self.subscribed.set()
            async for message in client.messages:
                body = message.payload
                self.books.receive("mqtt", body if isinstance(body, bytes) else str(body).encode())
                props: Any = message.properties
                source = dict(getattr(props, "UserProperty", None) or []).get("source", "")
                self.spread.add("amqp->mqtt", instance_of(source))


@pytest.fixture
async def mosquitto_own(tmp_path: Path) -> AsyncIterator[MosquittoInstance]:
    broker = MosquittoInstance(tmp_path / "mosquitto")
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


@pytest.mark.timeout(120)
async def test_three_instances_share_the_load_and_survive_kill9(
    tmp_path: Path, rabbitmq: str, mosquitto_own: MosquittoInstance
) -> None:
    t0 = time.monotonic()
    qss = configs(tmp_path, mosquitto_own.port)
    qs = qss[0]  # the names all three share
    books = Books()
    spread = Spread()
    served: Counter[int] = Counter()
    producers = Producers()
    title = "three instances, one killed with -9 and restarted"
    http_pids = [f"h{i}" for i in range(PRODUCERS)]
    mqtt_pids = [f"m{i}" for i in range(PRODUCERS)]
    amqp_pids = [f"a{i}" for i in range(PRODUCERS)]
    books.flow("http->amqp", "amqp", http_pids)
    books.flow("mqtt->amqp", "amqp", mqtt_pids)
    books.flow("amqp->mqtt", "mqtt", amqp_pids)
    queue_name = unique("scale.out")
    daemons = [DaemonProcess(q.write(), q.http_port, q.tmp / "daemon.log") for q in qss]
    ports = [q.http_port for q in qss]
    receiver = CommandsReceiver(mosquitto_own.port, f"{qs.topic_prefix}devices/+/commands", books, spread)

    def report() -> str:
        return (
            books.report(title)
            + f"\n  HTTP 202s per instance: {dict(sorted(served.items()))}"
            + f"\n  MQTT -> AMQP per instance: {spread.of('mqtt->amqp')}"
            + f"\n  AMQP -> MQTT per instance: {spread.of('amqp->mqtt')}"
        )

    def logs() -> str:
        return report() + "".join(f"\n--- instance {i}\n{d.logs()[-3000:]}" for i, d in enumerate(daemons))

    try:
        await asyncio.gather(*(d.start(timeout_s=60) for d in daemons))
        started_s = time.monotonic() - t0
        async with amqp_consumer(rabbitmq, queue_name, qs, books, spread), receiver:
            for i, pid in enumerate(http_pids):
                producers.start(pid, http_spread_producer(ports, i, books.sender(pid), producers.stop, served))
            for pid in mqtt_pids:
                topic = f"{qs.topic_prefix}devices/{pid}/telemetry"
                producers.start(
                    pid, mqtt_producer(mosquitto_own.port, topic, books.sender(pid), producers.stop, PACE_S)
                )
            for pid in amqp_pids:
                producers.start(
                    pid, amqp_producer(rabbitmq, qs.commands_exchange, pid, books.sender(pid), producers.stop, PACE_S)
                )

            def every_instance_carries_each_flow() -> bool:
                return (
                    all(books.acked_by(p) >= KILL_AFTER for p in (http_pids, mqtt_pids, amqp_pids))
                    and all(served[i] for i in range(INSTANCES))
                    and all(spread.of(f).get(i) for f in ("mqtt->amqp", "amqp->mqtt") for i in range(INSTANCES))
                )

            await until(every_instance_carries_each_flow, 30, "all three instances carrying every flow", logs)
            before_kill = {f: spread.of(f).get(VICTIM, 0) for f in ("mqtt->amqp", "amqp->mqtt")}
            served_before = served[VICTIM]
            await daemons[VICTIM].kill()
            at_kill = {name: len(f.acked()) for name, f in books.flows.items()}
            # The others carry on alone meanwhile: HTTP moves to the live ports, the queue and the shared
            # subscription give the killed daemon's share to... its session, which Mosquitto keeps (and
            # queues for) until the same client id comes back.
            await asyncio.sleep(1.0)
            await daemons[VICTIM].start(timeout_s=60)
            await until(
                lambda: all(len(f.acked()) >= at_kill[name] + MORE_AFTER_RESTART for name, f in books.flows.items()),
                30,
                "acknowledgements after the restart",
                logs,
            )
            await producers.finish()
            await until(books.drained, 60, f"{title}: drain", logs)
            await asyncio.sleep(1.0)  # late duplicates or strays
            text = report()
            print(text)
            print(f"{title}: daemons ready in {started_s:.1f} s, acked at the kill {at_kill}")
            books.check(title, max_duplicates=MAX_DUPLICATES)
            assert served[VICTIM] > served_before, f"no HTTP request reached the restarted instance\n{text}"
            for flow, n in before_kill.items():
                assert spread.of(flow).get(VICTIM, 0) > n, f"{flow}: the restarted instance took nothing\n{text}"
            for d in daemons:
                await stop_cleanly(d)
        print(f"{title}: {time.monotonic() - t0:.1f} s in all")
    finally:
        await producers.cancel()
        for d in daemons:
            if d.proc is not None and d.proc.returncode is None:
                await d.kill()
        await delete_queue(rabbitmq, queue_name)
