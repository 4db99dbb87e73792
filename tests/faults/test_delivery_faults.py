"""Delivery faults against the running daemon on real sockets: bad webhooks, a full disk, poison messages,
a stuck consumer.

Every event carries a producer id and a sequence number (``<producer>-<seq>``, the event id where the
protocol lets the sender choose it). After each fault the test heals, drains and counts:
lost = acknowledged - (received | dead-lettered with a reason) must be empty, nothing unexpected may
arrive, and duplicates are reported and bounded. Dead letters are read from the SQLite outbox file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port, unique

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(180)]

ORDER_TYPE = "com.example.order.created"
UNDECODABLE_TYPE = "io.mediator.undecodable"
RETRY = "retry = { max_attempts = 4, backoff_initial_s = 0.05, backoff_max_s = 0.5 }"
HANG_MAX_S = 60.0  # a hanging webhook answers at the latest after this (or when released)


# ---------------------------------------------------------------------------------------------- helpers
async def until(what: str, check: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(step_s)


@dataclass(frozen=True)
class DeadRow:
    event_id: str
    type: str
    data: bytes
    outbound: str
    reason: str
    attempts: int


def _read_dead(path: Path) -> list[DeadRow]:
    # A plain reader next to the daemon's writer: WAL mode lets it read while the daemon commits.
    with contextlib.closing(sqlite3.connect(path, timeout=5.0)) as conn:
        rows = conn.execute("SELECT envelope, outbound, reason, attempts FROM dead_letters ORDER BY id").fetchall()
    out = []
    for blob, outbound, reason, attempts in rows:
        env = envelope_pb2.Envelope.FromString(blob)
        out.append(DeadRow(env.id, env.type, env.binary_data, outbound, reason, attempts))
    return out


async def dead_letters(path: Path) -> list[DeadRow]:
    return await asyncio.to_thread(_read_dead, path)


def dead_by_outbound(rows: Iterable[DeadRow]) -> dict[str, list[DeadRow]]:
    out: dict[str, list[DeadRow]] = defaultdict(list)
    for row in rows:
        out[row.outbound].append(row)
    return out


@dataclass
class Ledger:
    """One destination's view of one producer: what was acknowledged, what arrived, what was buried."""

    name: str
    acked: set[str] = field(default_factory=set)
    received: list[str] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)

    @property
    def lost(self) -> set[str]:
        return self.acked - (set(self.received) | self.dead)

    @property
    def unexpected(self) -> set[str]:
        return (set(self.received) | self.dead) - self.acked

    @property
    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))

    def check(self, max_duplicates: int) -> str:
        summary = (
            f"{self.name}: acked={len(self.acked)} received={len(self.received)} "
            f"unique={len(set(self.received))} dead={len(self.dead)} duplicates={self.duplicates}"
        )
        assert not self.lost, f"{summary}; LOST {sorted(self.lost)[:20]}"
        assert not self.unexpected, f"{summary}; UNEXPECTED {sorted(self.unexpected)[:20]}"
        assert self.duplicates <= max_duplicates, summary
        print(summary)
        return summary


class Webhooks:
    """The webhook receivers: one aiohttp server, one path per behaviour, every request recorded.

    ``slow``: 0.3 s then 204. ``flaky``: 500 for the first two attempts of an event, then 204. ``fail``:
    always 500. ``throttle``: always 429 with Retry-After: 1. ``hang``: never answers (until released, then
    503). ``stuck``: hangs while ``stuck`` is set, answers 204 once released.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.hits: dict[str, list[tuple[str, float]]] = defaultdict(list)  # behaviour -> (event id, when)
        self.ok: dict[str, list[str]] = defaultdict(list)  # behaviour -> event ids answered 2xx
        self.stuck = True
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def url(self, behaviour: str) -> str:
        return f"http://127.0.0.1:{self.port}/{behaviour}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{behaviour}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hang(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANG_MAX_S):
                await self.release.wait()

    async def _handle(self, request: web.Request) -> web.Response:
        behaviour = request.match_info["behaviour"]
        event_id = request.headers.get("ce-id", "")
        await request.read()
        self.hits[behaviour].append((event_id, time.monotonic()))
        if behaviour == "slow":
            await asyncio.sleep(0.3)
        elif behaviour == "flaky":
            if sum(1 for i, _ in self.hits[behaviour] if i == event_id) <= 2:
                return web.Response(status=500, text="flaky")
        elif behaviour == "fail":
            return web.Response(status=500, text="boom")
        elif behaviour == "throttle":
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        elif behaviour == "hang":
            await self._hang()
            return web.Response(status=503)
        elif behaviour == "stuck" and self.stuck:
            await self._hang()
        self.ok[behaviour].append(event_id)
        return web.Response(status=204)


class AmqpCollector:
    """An exclusive queue bound to an exchange; records (message id, body, arrival time) of each message."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, float]] = []

    async def bind(self, conn: AbstractRobustConnection, exchange: str, key: str) -> None:
        channel = await conn.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(ex, key)
        await queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.got.append((message.message_id or "", message.body, time.monotonic()))
        await message.ack()

    def ids(self) -> list[str]:
        return [i for i, _, _ in self.got]

    def bodies(self) -> list[str]:
        return [b.decode(errors="replace") for _, b, _ in self.got]


async def post_order(http: aiohttp.ClientSession, port: int, event_id: str, pad: int = 0) -> tuple[int, str | None]:
    """POST one order whose event id is ``event_id`` (Idempotency-Key); returns status and Retry-After."""
    producer, _, seq = event_id.rpartition("-")
    body = json.dumps({"producer": producer, "seq": int(seq), "pad": "x" * pad}).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": event_id}
    async with http.post(f"http://127.0.0.1:{port}/orders", data=body, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")


@contextlib.asynccontextmanager
async def running(qs: Quickstart, tmp: Path, name: str = "daemon") -> AsyncIterator[DaemonProcess]:
    """The daemon on ``qs``; stopped with SIGTERM afterwards, which must exit 0."""
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp / f"{name}.log")
    await daemon.start()
    try:
        yield daemon
    finally:
        code = await daemon.stop(signal.SIGTERM)
        assert code == 0, f"daemon exited with {code}:\n{daemon.logs()}"


@pytest.fixture
async def amqp(rabbitmq: str) -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(RABBIT_URL)
    async with conn:
        yield conn


@pytest.fixture
async def shared_names(amqp: AbstractRobustConnection) -> AsyncIterator[list[Quickstart]]:
    """Quickstarts whose durable queue and exchanges are removed from the shared RabbitMQ afterwards."""
    used: list[Quickstart] = []
    yield used
    channel = await amqp.channel()
    for qs in used:
        with contextlib.suppress(Exception):
            await channel.queue_delete(qs.commands_queue)
        for exchange in (qs.orders_exchange, qs.telemetry_exchange, qs.commands_exchange):
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
    with contextlib.suppress(Exception):
        await channel.close()


@pytest.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    await hooks.start()
    try:
        yield hooks
    finally:
        await hooks.stop()


def hook_outbound(name: str, url: str, send_timeout_s: float, retry: str = RETRY) -> str:
    return f'[outbound.{name}]\nkind = "http"\nurl = "{url}"\nsend_timeout_s = {send_timeout_s}\n{retry}\n'


def orders_route(name: str, outbounds: Iterable[str]) -> str:
    to = ", ".join(f'{{ outbound = "{o}" }}' for o in outbounds)
    return f'[[routes]]\nname = "{name}"\nmatch = {{ type = ["{ORDER_TYPE}"] }}\nto = [{to}]\n'


# ---------------------------------------------------------------- 5. struggling webhooks, healthy exchange
HOOKS = ("slow", "flaky", "fail", "throttle", "hang", "refused")
DEAD_HOOKS = {  # behaviour -> what the dead letter's reason must say
    "fail": "HTTP 500",
    "throttle": "HTTP 429",
    "hang": "no response within",
    "refused": "POST http://127.0.0.1:",
}


async def test_bad_webhooks_retry_then_dead_letter_while_amqp_keeps_its_latency(
    tmp_path: Path,
    mosquitto: tuple[str, int],
    amqp: AbstractRobustConnection,
    webhooks: Webhooks,
    shared_names: list[Quickstart],
) -> None:
    refused_port = free_port()  # nothing listens there
    extra = "".join(
        hook_outbound(
            f"hook-{b}",
            f"http://127.0.0.1:{refused_port}/refused" if b == "refused" else webhooks.url(b),
            send_timeout_s=0.5 if b == "hang" else 1.0,
        )
        for b in HOOKS
    )
    qs = Quickstart(tmp_path, extra_toml=extra + orders_route("webhooks", [f"hook-{b}" for b in HOOKS]))
    shared_names.append(qs)
    exchange = AmqpCollector()
    await exchange.bind(amqp, qs.orders_exchange, "orders.created")
    producer = unique("p5")
    n = 30
    acked_at: dict[str, float] = {}
    async with running(qs, tmp_path):
        async with aiohttp.ClientSession() as http:
            for seq in range(n):
                event_id = f"{producer}-{seq}"
                sent = time.monotonic()  # the delivery may reach the exchange before the 202 reaches us
                status, _ = await post_order(http, qs.http_port, event_id)
                assert status == 202, status
                acked_at[event_id] = sent
                await asyncio.sleep(0.05)
        acked = set(acked_at)

        # The exchange does not wait for the webhooks: every event arrives within a few seconds of its 202.
        await until("the AMQP exchange to receive every event", lambda: acked <= set(exchange.ids()), 10.0)
        latency = {i: t - acked_at[i] for i, _, t in exchange.got if i in acked_at}
        worst = max(latency.values())
        assert worst < 3.0, f"AMQP latency while the webhooks struggle: worst {worst:.2f} s"

        def settled() -> bool:
            return all(acked <= set(webhooks.ok[b]) for b in ("slow", "flaky"))

        await until("the slow and flaky webhooks to get every event", settled, 30.0)
        rows: list[DeadRow] = []

        async def buried() -> bool:
            nonlocal rows
            rows = await dead_letters(qs.outbox_file)
            by = dead_by_outbound(rows)
            return all(len(by[f"hook-{b}"]) >= n for b in DEAD_HOOKS)

        deadline = time.monotonic() + 60.0
        while not await buried():
            assert time.monotonic() < deadline, f"dead letters so far: {Counter(r.outbound for r in rows)}"
            await asyncio.sleep(0.2)
        hits_at_end = {b: len(webhooks.hits[b]) for b in HOOKS}
        await asyncio.sleep(1.0)  # nothing is retried after its dead letter
        assert {b: len(webhooks.hits[b]) for b in HOOKS} == hits_at_end

    by = dead_by_outbound(rows)
    assert set(by) <= {f"hook-{b}" for b in DEAD_HOOKS}, f"unexpected dead letters: {set(by)}"
    print(f"latency to the exchange: worst {worst:.3f} s, mean {sum(latency.values()) / n:.3f} s")
    for behaviour, says in DEAD_HOOKS.items():
        letters = by[f"hook-{behaviour}"]
        ids = Counter(r.event_id for r in letters)
        assert set(ids) == acked, f"{behaviour}: {ids}"
        assert max(ids.values()) == 1, f"{behaviour}: buried twice {ids}"
        for row in letters:
            assert row.attempts == 4, row
            assert row.reason.startswith("gave up after 4 attempts: "), row.reason
            assert says in row.reason, row.reason
        print(f"hook-{behaviour}: {len(letters)} dead letters, e.g. {letters[0].reason!r}")
        if behaviour != "refused":
            per_event = Counter(i for i, _ in webhooks.hits[behaviour])
            assert set(per_event.values()) == {4}, f"{behaviour}: attempts seen by the receiver {per_event}"
    # Retry-After: 1 on a 429 is honoured, capped by backoff_max_s = 0.5 (without it the first gap is <= 0.05 s).
    times: dict[str, list[float]] = defaultdict(list)
    for event_id, when in webhooks.hits["throttle"]:
        times[event_id].append(when)
    gaps = [b - a for ts in times.values() for a, b in itertools.pairwise(ts)]
    assert min(gaps) >= 0.45, f"429 retried after {min(gaps):.3f} s despite Retry-After"

    flaky_hits = Counter(i for i, _ in webhooks.hits["flaky"])
    assert set(flaky_hits.values()) == {3}, flaky_hits  # two 500s, then delivered
    for behaviour in ("slow", "flaky"):
        Ledger(f"hook-{behaviour}", acked, webhooks.ok[behaviour], {r.event_id for r in by[f"hook-{behaviour}"]}).check(
            max_duplicates=0
        )
    Ledger("orders-exchange", acked, exchange.ids()).check(max_duplicates=0)
    for behaviour in DEAD_HOOKS:
        ledger = Ledger(
            f"hook-{behaviour}", acked, webhooks.ok[behaviour], {r.event_id for r in by[f"hook-{behaviour}"]}
        )
        ledger.check(max_duplicates=0)


# ------------------------------------------------------------------------------------ 6. a full filesystem
async def _sh(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def tiny_filesystem(where: Path, size_mb: int = 2) -> AsyncIterator[str]:
    """A filesystem of ``size_mb`` mounted at ``where``: tmpfs, else a loop-mounted ext4 image."""
    await asyncio.to_thread(where.mkdir, parents=True)
    code, out = await _sh("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(where))
    kind = "tmpfs"
    if code != 0:
        image = where.parent / "tiny.img"
        with image.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        code, out2 = await _sh("mkfs.ext4", "-q", "-F", str(image))
        if code == 0:
            code, out2 = await _sh("mount", "-o", "loop", str(image), str(where))
        if code != 0:
            pytest.fail(f"cannot mount a small filesystem: tmpfs: {out.strip()}; loop ext4: {out2.strip()}")
        kind = "ext4 (loop)"
    try:
        yield kind
    finally:
        code, out = await _sh("umount", str(where))
        if code != 0:
            await _sh("umount", "-l", str(where))


def _pending_rows(path: Path, outbound: str) -> int:
    with contextlib.closing(sqlite3.connect(path, timeout=5.0)) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM deliveries WHERE outbound = ?", (outbound,)).fetchone()
    return int(count)


def _fill(path: Path, leave: int) -> int:
    """Write a filler file leaving about ``leave`` bytes free; returns its size."""
    st = os.statvfs(path.parent)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    chunk = b"\0" * 65536
    written = 0
    with contextlib.suppress(OSError), path.open("wb") as f:
        while written < size:
            written += f.write(chunk[: min(len(chunk), size - written)])
        f.flush()
        os.fsync(f.fileno())
    return written


async def test_full_disk_refuses_before_it_acknowledges_and_recovers(
    tmp_path: Path, mosquitto: tuple[str, int], amqp: AbstractRobustConnection, shared_names: list[Quickstart]
) -> None:
    fs = tmp_path / "tiny"
    async with tiny_filesystem(fs) as kind:
        # The outbox alone on the tiny disk (this test is the outbox's). With the event store on, the daemon
        # still refused for 10 s after the filler was freed (seen in the merged tree): the store's recovery
        # from a full disk is an open question of the history issue, not hidden here.
        qs = Quickstart(tmp_path, outbox_path=fs / "outbox.sqlite", overrides={"store": {"retention": "0"}})
        shared_names.append(qs)
        exchange = AmqpCollector()
        await exchange.bind(amqp, qs.orders_exchange, "orders.created")
        producer = unique("p6")
        statuses: Counter[int] = Counter()
        acked: set[str] = set()
        refused: set[str] = set()
        filler = fs / "filler"
        seq = 0
        async with running(qs, tmp_path) as daemon, aiohttp.ClientSession() as http:
            for _ in range(20):
                status, _ = await post_order(http, qs.http_port, f"{producer}-{seq}")
                assert status == 202
                acked.add(f"{producer}-{seq}")
                seq += 1
            await until("the warm-up events", lambda: acked <= set(exchange.ids()), 10.0)

            filled = await asyncio.to_thread(_fill, filler, 96 * 1024)
            # Push events (8 KB each) until the disk refuses ten in a row; bounded in count and time.
            consecutive = 0
            started = time.monotonic()
            while consecutive < 10 and seq < 400 and time.monotonic() - started < 40:
                event_id = f"{producer}-{seq}"
                seq += 1
                status, retry_after = await post_order(http, qs.http_port, event_id, pad=8000)
                statuses[status] += 1
                if status == 202:
                    acked.add(event_id)
                    consecutive = 0
                else:
                    assert status == 503, status
                    assert retry_after is not None
                    assert int(retry_after) >= 1
                    refused.add(event_id)
                    consecutive += 1
            assert consecutive >= 10, f"the disk never refused: {statuses}"
            async with http.get(f"http://127.0.0.1:{qs.http_port}/healthz") as resp:
                assert resp.status == 200
            assert daemon.proc is not None
            assert daemon.proc.returncode is None

            filler.unlink()  # heal
            after: set[str] = set()
            for i in range(20):
                event_id = f"{producer}-{seq + i}"
                for _attempt in range(40):  # bounded: a refusal right after the heal is retried
                    status, _ = await post_order(http, qs.http_port, event_id)
                    if status == 202:
                        break
                    assert status == 503
                    await asyncio.sleep(0.25)
                assert status == 202, "still refused after space was freed"
                after.add(event_id)
            acked |= after
            await until("every acknowledged event at the exchange", lambda: acked <= set(exchange.ids()), 30.0)
            await asyncio.sleep(0.5)  # anything unexpected (a refused event) would show up now
            dead = await dead_letters(qs.outbox_file)
        log = daemon.logs()

        # Stopped cleanly with space to spare: what the outbox still holds is redelivered by the next start
        # (a "done" written lazily while the disk was full is lost with its failed transaction).
        leftover = await asyncio.to_thread(_pending_rows, qs.outbox_file, "orders-exchange")
        before_restart = len(exchange.got)
        async with running(qs, tmp_path, "daemon-2"):
            await until("the restart's redeliveries", lambda: len(exchange.got) >= before_restart + leftover, 15.0)
            await asyncio.sleep(1.0)
        redelivered = len(exchange.got) - before_restart

    print(
        f"{kind}: filler {filled} bytes; statuses while full {dict(statuses)}; rows left after a clean stop"
        f" {leftover}, redelivered after restart {redelivered}"
    )
    assert redelivered == leftover
    assert "outbox.write_failed" in log
    assert not dead, dead
    ledger = Ledger("orders-exchange", acked, exchange.ids())
    ledger.check(max_duplicates=len(acked))
    assert not (set(exchange.ids()) & refused)


# -------------------------------------------------------------------------------------- 7. poison messages
def mqtt_props(content_type: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = content_type
    return props


async def test_poison_messages_are_dead_lettered_acknowledged_and_traffic_flows(
    tmp_path: Path, mosquitto: tuple[str, int], amqp: AbstractRobustConnection, shared_names: list[Quickstart]
) -> None:
    qs = Quickstart(tmp_path)
    shared_names.append(qs)
    producer = unique("p7")
    telemetry = AmqpCollector()
    await telemetry.bind(amqp, qs.telemetry_exchange, "telemetry.dev2")
    channel = await amqp.channel()
    commands = await channel.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    amqp_poison = b'{"specversion": "1.0", "id": "x", broken'
    mqtt_poison = b"\xff\xfe{ not json"
    command_ids: list[str] = []
    sent_commands: set[str] = set()
    sent_telemetry: set[str] = set()
    topic = f"{qs.topic_prefix}devices/dev2/telemetry"

    async def send(mqtt: aiomqtt.Client, seqs: range) -> None:
        for seq in seqs:
            cid = f"{producer}-cmd-{seq}"
            await commands.publish(
                aio_pika.Message(str(seq).encode(), content_type="text/plain", message_id=cid), routing_key="dev1"
            )
            sent_commands.add(cid)
            tid = f"{producer}-tel-{seq}"
            await mqtt.publish(topic, tid.encode(), qos=1)  # PUBACKed by Mosquitto
            sent_telemetry.add(tid)

    async def listen(sub: aiomqtt.Client) -> None:
        async for message in sub.messages:
            props = message.properties
            command_ids.extend(v for k, v in getattr(props, "UserProperty", []) if k == "id")

    v5 = aiomqtt.ProtocolVersion.V5
    async with (
        aiomqtt.Client("127.0.0.1", 1883, protocol=v5, identifier=unique("sub7")) as sub,
        aiomqtt.Client("127.0.0.1", 1883, protocol=v5, identifier=unique("pub7")) as pub,
    ):
        await sub.subscribe(f"{qs.topic_prefix}devices/+/commands", qos=1)
        listener = asyncio.create_task(listen(sub))
        try:
            async with running(qs, tmp_path, "daemon-1"):
                await send(pub, range(0, 10))
                await commands.publish(
                    aio_pika.Message(amqp_poison, content_type="application/cloudevents+json", message_id="poison"),
                    routing_key="dev1",
                )
                await pub.publish(topic, mqtt_poison, qos=1, properties=mqtt_props("application/cloudevents+json"))
                await send(pub, range(10, 20))

                def arrived() -> bool:
                    return sent_commands <= set(command_ids) and sent_telemetry <= set(telemetry.bodies())

                await until("valid events before and after the poison", arrived, 15.0)
                rows: list[DeadRow] = []
                deadline = time.monotonic() + 10.0
                while len(rows := await dead_letters(qs.outbox_file)) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
            # Stopped: a delivery the daemon never acknowledged would be back in the queue now.
            probe = await amqp.channel()
            queue = await probe.declare_queue(qs.commands_queue, durable=True, passive=True)
            left = queue.declaration_result.message_count
            await probe.close()

            # A restart reconnects with the same MQTT session and AMQP queue: nothing comes back.
            async with running(qs, tmp_path, "daemon-2"):
                await send(pub, range(20, 22))
                await until("events after the restart", arrived, 15.0)
                await asyncio.sleep(1.0)
                rows_after = await dead_letters(qs.outbox_file)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    assert left == 0, f"{left} messages left in {qs.commands_queue}"
    poison_amqp = [r for r in rows_after if r.data == amqp_poison]
    poison_mqtt = [r for r in rows_after if r.data == mqtt_poison]
    assert len(poison_amqp) == 1, rows_after
    assert len(poison_mqtt) == 1, rows_after
    assert len(rows_after) == 2, rows_after
    assert rows == rows_after
    for row in (poison_amqp[0], poison_mqtt[0]):
        assert row.type == UNDECODABLE_TYPE
        assert row.reason, row
        print(f"dead letter: type={row.type} reason={row.reason!r} attempts={row.attempts}")
    assert poison_amqp[0].reason.startswith("undecodable: ")
    Ledger("commands -> mqtt", sent_commands, command_ids).check(max_duplicates=0)
    Ledger("telemetry -> amqp", sent_telemetry, telemetry.bodies()).check(max_duplicates=0)


# -------------------------------------------------------------------------------------- 8. a stuck consumer
def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def rabbit_queue_depth(queue: str) -> int | None:
    """Ready + unacknowledged messages of ``queue`` (None when rabbitmqctl is not at hand)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    import subprocess

    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return None


async def test_stuck_consumer_pushes_back_on_every_front_end_and_drains(
    tmp_path: Path,
    mosquitto: tuple[str, int],
    amqp: AbstractRobustConnection,
    webhooks: Webhooks,
    shared_names: list[Quickstart],
) -> None:
    max_pending = 40
    stuck_retry = "retry = { max_attempts = 1000, backoff_initial_s = 0.05, backoff_max_s = 0.5 }"
    extra = hook_outbound("hook-stuck", webhooks.url("stuck"), 1.0, stuck_retry) + orders_route(
        "stuck-webhook", ["hook-stuck"]
    )
    qs = Quickstart(tmp_path, max_pending=max_pending, extra_toml=extra)
    shared_names.append(qs)
    producer = unique("p8")
    orders = AmqpCollector()
    await orders.bind(amqp, qs.orders_exchange, "orders.created")
    telemetry = AmqpCollector()
    await telemetry.bind(amqp, qs.telemetry_exchange, "telemetry.*")
    channel = await amqp.channel()
    commands = await channel.declare_exchange(qs.commands_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    command_ids: list[str] = []
    acked: set[str] = set()
    refused = 0
    rss: list[float] = []
    v5 = aiomqtt.ProtocolVersion.V5

    async def listen(sub: aiomqtt.Client) -> None:
        async for message in sub.messages:
            command_ids.extend(v for k, v in getattr(message.properties, "UserProperty", []) if k == "id")

    async with (
        running(qs, tmp_path) as daemon,
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as grpc_channel,
        aiomqtt.Client("127.0.0.1", 1883, protocol=v5, identifier=unique("sub8")) as sub,
        aiomqtt.Client("127.0.0.1", 1883, protocol=v5, identifier=unique("pub8")) as pub,
    ):
        assert daemon.proc is not None
        pid = daemon.proc.pid
        rss.append(vm_rss_mb(pid))
        await sub.subscribe(f"{qs.topic_prefix}devices/+/commands", qos=1)
        listener = asyncio.create_task(listen(sub))
        stub = service_pb2_grpc.MediatorStub(grpc_channel)
        try:
            # Fill the outbox: the webhook takes every request and never answers. The first 503 can come
            # while the other destinations of the latest event are still in flight: go on until the stuck
            # webhook's deliveries alone hold the outbox full (refusals that last).
            seq = 0
            consecutive = 0
            retry_after: str | None = None
            started = time.monotonic()
            while consecutive < 5 and seq < 10 * max_pending and time.monotonic() - started < 30:
                event_id = f"{producer}-{seq}"
                seq += 1
                status, retry_after = await post_order(http, qs.http_port, event_id)
                if status == 202:
                    acked.add(event_id)
                    consecutive = 0
                    continue
                assert status == 503, status
                assert retry_after is not None
                assert int(retry_after) >= 1
                refused += 1
                consecutive += 1
                await asyncio.sleep(0.2)
            assert consecutive == 5, f"no lasting back-pressure after {len(acked)} accepted events"
            assert 1 <= len(acked) <= max_pending, len(acked)

            # gRPC Publish is refused with RESOURCE_EXHAUSTED.
            grpc_id = f"{producer}-grpc-0"
            env = envelope_pb2.Envelope(id=grpc_id, source="/faults", spec_version="1.0", type=ORDER_TYPE)
            env.binary_data = b'{"grpc": 0}'
            with pytest.raises(grpc.aio.AioRpcError) as refusal:
                await stub.Publish(env, timeout=10)
            assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.value

            # MQTT and AMQP intake pause: the daemon holds (MQTT) or requeues (AMQP) instead of acknowledging.
            sent_telemetry = {f"{producer}-tel-{i}" for i in range(10)}
            for tid in sorted(sent_telemetry):
                await pub.publish(f"{qs.topic_prefix}devices/dev8/telemetry", tid.encode(), qos=1)
            sent_commands = {f"{producer}-cmd-{i}" for i in range(10)}
            for cid in sorted(sent_commands):
                await commands.publish(
                    aio_pika.Message(b"reboot", content_type="text/plain", message_id=cid), routing_key="dev8"
                )

            # Keep knocking for a while: every front-end is refused, memory stays flat.
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                for _ in range(50):
                    status, _ = await post_order(http, qs.http_port, f"{producer}-x-{refused}")
                    assert status == 503, status
                    refused += 1
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Publish(env, timeout=10)
                rss.append(vm_rss_mb(pid))
            assert not telemetry.got, "MQTT events were committed past max_pending"
            assert not command_ids, "AMQP events were committed past max_pending"
            depth = await asyncio.to_thread(rabbit_queue_depth, qs.commands_queue)
            assert depth in (None, len(sent_commands)), f"{depth} messages in {qs.commands_queue}"
            log = (await asyncio.to_thread(daemon.log_path.read_text, errors="replace")).splitlines()
            # The MQTT inbound holds each message (and its PUBACK) and retries the commit; messages queued
            # together are held (and logged) together.
            deferred = [
                json.loads(line) for line in log if '"envelope.deferred"' in line and '"inbound": "devices"' in line
            ]
            held = sum(entry["messages"] for entry in deferred if entry["level"] == "warning")
            # Or, with shedding by priority ([overload], on by default), the inbound of normal priority was
            # paused once the outbox passed outbox_normal: it holds what it has, unacknowledged, and takes
            # nothing more (the broker keeps the rest) until the level drops.
            paused = [line for line in log if '"inbound.paused"' in line and '"inbound": "devices"' in line]
            assert paused or held >= len(sent_telemetry), f"{held} MQTT messages held and the inbound never paused"
            rss.append(vm_rss_mb(pid))
            assert max(rss) < 300, f"RSS grew to {max(rss):.0f} MB"

            # Heal: the consumer answers again; everything drains, and new events are accepted.
            webhooks.stuck = False
            webhooks.release.set()
            t_heal = time.monotonic()

            def drained() -> bool:
                return (
                    acked <= set(webhooks.ok["stuck"])
                    and sent_telemetry <= set(telemetry.bodies())
                    and sent_commands <= set(command_ids)
                )

            await until("the backlog to drain after the consumer recovered", drained, 60.0)
            drain_s = time.monotonic() - t_heal
            for _attempt in range(100):  # bounded: the backlog count settles with the last deliveries
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Publish(env, timeout=10)
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("gRPC Publish still refused after the drain")
            acked.add(grpc_id)
            for i in range(5):
                status, _ = await post_order(http, qs.http_port, f"{producer}-after-{i}")
                assert status == 202, status
                acked.add(f"{producer}-after-{i}")
            await until("events after the recovery", lambda: acked <= set(webhooks.ok["stuck"]), 15.0)
            await until("orders at the exchange", lambda: acked <= set(orders.ids()), 15.0)
            dead = await dead_letters(qs.outbox_file)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    print(
        f"accepted {len(acked)} (max_pending {max_pending}), refused {refused}, RSS {min(rss):.0f}-{max(rss):.0f} MB,"
        f" drained in {drain_s:.2f} s, webhook requests {len(webhooks.hits['stuck'])}"
    )
    assert not dead, dead
    hook = Ledger("hook-stuck", acked, webhooks.ok["stuck"])
    hook.check(max_duplicates=20 * len(acked))
    Ledger("orders-exchange", acked, orders.ids()).check(max_duplicates=0)
    Ledger("telemetry -> amqp", sent_telemetry, telemetry.bodies()).check(max_duplicates=len(sent_telemetry))
    Ledger("commands -> mqtt", sent_commands, command_ids).check(max_duplicates=len(sent_commands))
