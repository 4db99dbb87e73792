"""The soak: the daemon under a steady mixed load on all four front-ends for ``SOAK_MINUTES`` (default 30),
with a fault every ``SOAK_FAULT_S`` seconds (default 120) drawn in turn from ``FAULTS``.

Everything it breaks is its own: a RabbitMQ node and a Mosquitto on free loopback ports (never the shared
ones), a TCP proxy in front of each (the daemon connects through them; producers and consumers do not, so a
partition cuts only the daemon's path), the outbox on a small tmpfs it mounts (root) and fills. Events are
counted by id at real consumers (a durable AMQP queue per exchange, persistent-session MQTT subscribers):
``lost`` is acknowledged by a front-end and never received at one of its destinations.

One line on stdout at the end::

    soak: sent=N acked=N received=N lost=0 duplicates=N faults=K rss_start=A rss_end=B fds_start=C fds_end=D

Exit status 1 when anything was lost, when the daemon's RSS grew more than 20 % (or its open file
descriptors by more than ``FD_SLACK``) between the end of the first fault cycle and the end of the run, when
the daemon died outside a fault, when a fault did not heal, or when the load generator could not hold its
own rate (see ``docs/testing.md``). Progress and the per-flow books go to stderr.

    SOAK_MINUTES=5 SOAK_FAULT_S=30 .venv/bin/python -m bench.soak   # every fault once, in 5 minutes
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import aiomqtt
import grpc

from bench.infra import rss_mb
from mediator.v1 import service_pb2_grpc
from tests.faults.test_crash_faults import (
    Books,
    Key,
    MqttReceiver,
    Sent,
    consuming,
    declare_queue,
    grpc_event,
    payload,
)
from tests.support.brokers import MosquittoInstance, RabbitNode
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import free_port
from tests.support.proxy import TcpProxy

SEND_TIMEOUT_S = 5.0
RETRY_S = 0.2  # pause before an unacknowledged event is sent again (same id)
HOLD_S = 20.0  # how long a partition or a full disk lasts
DRAIN_S = 180.0  # after the load stops: time for every acknowledged event to arrive
QUIET_S = 3.0
RSS_GROWTH_MAX = 0.20
FD_SLACK = 20  # open descriptors the daemon may hold more at the end (connections come and go)
CALM_AFTER_S = 20.0  # seconds after a fault healed before the load counts as calm again
RATE_FLOOR = 0.8  # the calm rate must reach this share of the target, or the soak proves too little
API_KEY = "soak-key-0123456789abcdef"
TMPFS_MB = 128
PAD_BYTES = 8192


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- load


class Pacer:
    """Slots at a fixed rate; a producer that fell behind (a fault) starts a fresh clock rather than bursting."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        if self.next < now - 1.0:
            self.next = now
        if self.next > now:
            await asyncio.sleep(self.next - now)
        self.next += self.interval


@dataclass
class Load:
    """Every producer's books and pacing; ``acks`` per second for the rate check."""

    books: Books
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    target: float = 0.0
    acks_at: list[float] = field(default_factory=list)

    def acked(self, sent: Sent, seq: int) -> None:
        sent.acked.add(seq)
        self.acks_at.append(time.monotonic())

    def start(self, name: str, rate: float, send: Callable[[Key], Awaitable[bool]]) -> None:
        self.target += rate
        self.tasks.append(asyncio.create_task(self._run(self.books.sender(name), rate, send), name=name))

    async def _run(self, sent: Sent, rate: float, send: Callable[[Key], Awaitable[bool]]) -> None:
        pacer = Pacer(rate)
        seq = 0
        while not self.stop.is_set():
            await pacer.wait()
            sent.attempted.add(seq)
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    ok = await send((sent.pid, seq))
            except TimeoutError:
                ok = False
            if ok:
                self.acked(sent, seq)
                seq += 1
            else:
                await asyncio.sleep(RETRY_S)


def ce_headers(key: Key) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": f"{key[0]}-{key[1]}",
        "ce-source": f"/soak/{key[0]}",
        "ce-type": "com.example.order.created",
        "Content-Type": "application/json",
    }


class Http:
    """Plain JSON to /orders, CloudEvents binary to /events, CloudEvents structured with an API key to the
    authenticated listener. While ``pad`` is set (the disk-full fault) the plain and binary events carry
    8 KiB more: tiny events fit in the pages SQLite's WAL already has, so the outbox would never need the
    space that is gone."""

    def __init__(self, port: int, secure_port: int) -> None:
        self.port = port
        self.secure_port = secure_port
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S))
        self.pad = False

    def body(self, key: Key) -> bytes:
        if not self.pad:
            return payload(key)
        return json.dumps({"p": key[0], "s": key[1], "pad": "x" * PAD_BYTES}).encode()

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> bool:
        try:
            async with self.session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status == 202
        except (aiohttp.ClientError, OSError):
            return False

    async def plain(self, key: Key) -> bool:
        return await self._post(
            f"http://127.0.0.1:{self.port}/orders", self.body(key), {"Content-Type": "application/json"}
        )

    async def binary(self, key: Key) -> bool:
        return await self._post(f"http://127.0.0.1:{self.port}/events", self.body(key), ce_headers(key))

    async def structured(self, key: Key) -> bool:
        event = {
            "specversion": "1.0",
            "id": f"{key[0]}-{key[1]}",
            "source": f"/soak/{key[0]}",
            "type": "com.example.order.created",
            "datacontenttype": "application/json",
            "data": json.loads(payload(key)),
        }
        headers = {"Content-Type": "application/cloudevents+json", "X-API-Key": API_KEY}
        return await self._post(f"http://127.0.0.1:{self.secure_port}/events", json.dumps(event).encode(), headers)

    async def close(self) -> None:
        await self.session.close()


class Grpc:
    def __init__(self, port: int, uid: str) -> None:
        self.uid = uid
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = service_pb2_grpc.MediatorStub(self.channel)

    async def publish(self, key: Key) -> bool:
        try:
            reply = await self.stub.Publish(grpc_event(self.uid, key), timeout=SEND_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.id == f"{key[0]}-{key[1]}")

    async def close(self) -> None:
        await self.channel.close()


class MqttSender:
    """One connection per producer, reconnected on demand; ``publish`` returns after the PUBACK / PUBCOMP."""

    def __init__(self, port: int, topic: str, qos: int, name: str) -> None:
        self.port = port
        self.topic = topic
        self.qos = qos
        self.name = name
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: aiomqtt.Client | None = None

    async def publish(self, key: Key) -> bool:
        try:
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                client = aiomqtt.Client("127.0.0.1", self.port, identifier=self.name, timeout=SEND_TIMEOUT_S)
                await stack.enter_async_context(client)
                self._stack, self._client = stack, client
            await self._client.publish(self.topic, payload(key), qos=self.qos, timeout=SEND_TIMEOUT_S)
            return True
        except (aiomqtt.MqttError, TimeoutError, OSError):
            await self.close()
            return False

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await stack.aclose()


class AmqpSender:
    """Persistent, mandatory publishes with confirms to the daemon's inbound exchange, message id = event id."""

    def __init__(self, url: str, exchange: str, routing_key: str) -> None:
        self.url = url
        self.exchange_name = exchange
        self.routing_key = routing_key
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def publish(self, key: Key) -> bool:
        try:
            if self._exchange is None:
                self._conn = await aio_pika.connect(self.url, timeout=SEND_TIMEOUT_S)
                channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = await channel.get_exchange(self.exchange_name, ensure=True)
            message = aio_pika.Message(
                payload(key),
                content_type="application/json",
                message_id=f"{key[0]}-{key[1]}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await self._exchange.publish(message, routing_key=self.routing_key, mandatory=True)
            return True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() > 0:
                raise
            await self.close()  # aiormq cancels a pending confirmation when the channel closes under it
            return False
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError):
            await self.close()
            return False

    async def close(self) -> None:
        conn, self._conn, self._exchange = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.close()


# ------------------------------------------------------------------------------------------- the rig


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Sample:
    rss_mb: float
    fds: int


@dataclass
class Rig:
    work: Path
    outbox_dir: Path
    rabbit: RabbitNode
    mosquitto: MosquittoInstance
    rabbit_proxy: TcpProxy
    mqtt_proxy: TcpProxy
    qs: Quickstart
    config: Path
    daemon: DaemonProcess
    books: Books = field(default_factory=Books)
    http: Http | None = None
    expected_exit: bool = False  # a fault is killing the daemon on purpose
    crashes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    faults: int = 0
    fault_windows: list[tuple[float, float]] = field(default_factory=list)

    def sample(self) -> Sample:
        pid = self.daemon.pid
        if pid is None or self.daemon.proc is None or self.daemon.proc.returncode is not None:
            return Sample(0.0, 0)
        return Sample(rss_mb(pid), fds(pid))

    async def watch(self) -> None:
        """Restart a daemon that died outside a fault, and count it as a failure."""
        while True:
            await asyncio.sleep(1)
            proc = self.daemon.proc
            if proc is not None and proc.returncode is not None and not self.expected_exit:
                tail = self.daemon.logs()[-3000:]
                self.crashes.append(f"exit {proc.returncode}")
                log(f"DAEMON DIED (exit {proc.returncode}) outside a fault; restarting. Log tail:\n{tail}")
                await self.daemon.start(timeout_s=90)

    async def reload(self) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mediator",
            "reload",
            "--config",
            str(self.config),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace").strip()

    # ---------------------------------------------------------------------------- the faults, in turn

    async def kill_daemon(self) -> None:
        self.expected_exit = True
        try:
            await self.daemon.kill()
            await asyncio.sleep(1)
            await self.daemon.start(timeout_s=90)
        finally:
            self.expected_exit = False

    async def restart_rabbit(self) -> None:
        await self.rabbit.actl("stop", timeout_s=90)
        await asyncio.sleep(5)
        await self.rabbit.astart()

    async def restart_mosquitto(self) -> None:
        await self.mosquitto.restart(down_s=5)

    async def partition_rabbit(self) -> None:
        self.rabbit_proxy.black_hole()
        await asyncio.sleep(HOLD_S)
        self.rabbit_proxy.heal()

    async def partition_mosquitto(self) -> None:
        self.mqtt_proxy.black_hole()
        await asyncio.sleep(HOLD_S)
        self.mqtt_proxy.heal()

    async def fill_disk(self) -> None:
        filler = self.outbox_dir / "filler"
        written = await asyncio.to_thread(_fill, filler)
        log(f"  filled the outbox's tmpfs with {written // 1024} KiB")
        acked = self.books.acked()
        if self.http is not None:
            self.http.pad = True
        try:
            await asyncio.sleep(HOLD_S)
        finally:
            if self.http is not None:
                self.http.pad = False
            await asyncio.to_thread(filler.unlink)
        log(f"  {self.books.acked() - acked} acks while full (the outbox refuses what it cannot write)")

    async def bad_then_good_reload(self) -> None:
        good = self.config.read_text()
        # A type error the loader names (drain_timeout_s must be a number): refused, the running config stays.
        self.config.write_text(good.replace("drain_timeout_s = 10.0", 'drain_timeout_s = "ten"', 1))
        code, out = await self.reload()
        if code == 0:
            self.failures.append(f"a bad config was not refused by reload: {out}")
        log(f"  bad edit: reload exit {code}: {' '.join(out.split())[:300]}")
        await asyncio.sleep(5)
        # A good edit, applied live under load: the orders exchange outbound's retry cap (that outbound is
        # restarted by the reload, its undelivered events kept in the outbox).
        old, new = ("backoff_max_s = 2.0", "backoff_max_s = 3.0")
        if old not in good:
            old, new = new, old
        good = good.replace(old, new, 1)
        self.config.write_text(good)
        code, out = await self.reload()
        if code != 0:
            self.failures.append(f"a good config was not applied by reload: {out}")
        log(f"  good edit: reload exit {code}: {' '.join(out.split())[:300]}")

    def faults_in_turn(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [
            ("kill -9 of the daemon", self.kill_daemon),
            ("stop and start of RabbitMQ", self.restart_rabbit),
            ("restart of Mosquitto", self.restart_mosquitto),
            ("partition to RabbitMQ", self.partition_rabbit),
            ("partition to Mosquitto", self.partition_mosquitto),
            ("the outbox's disk full", self.fill_disk),
            ("reload: a bad edit, then a good one", self.bad_then_good_reload),
        ]

    async def healthy(self, timeout_s: float = 90.0) -> bool:
        """Ready again (/readyz 200: every broker connected) within ``timeout_s``."""
        try:
            await self.daemon.wait_ready(timeout_s)
            return True
        except (TimeoutError, AssertionError):
            return False


def _fill(path: Path) -> int:
    """Write until the filesystem is full (unbuffered: every byte that fits is written); the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096):  # megabytes, then the last partial one a page at a time
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    written += os.write(fd, block)
    finally:
        os.close(fd)
    return written


def mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"soak: cannot mount a tmpfs for the outbox (needs root): {result.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


EXTRA_TOML = """
[listeners.secure]
kind = "http"
host = "127.0.0.1"
port = {secure_port}
auth = ["keys"]

[auth.keys]
kind = "api_key"
keys_file = "api-keys.toml"

[inbound.secure-events]
kind = "http"
listener = "secure"
path = "/events"
mode = "cloudevents"
"""


def overrides() -> dict[str, dict[str, object]]:
    fast_retry = {"send_timeout_s": 5.0, "retry": {"backoff_initial_s": 0.1, "backoff_max_s": 2.0}}
    return {
        "brokers.mosquitto": {"reconnect_initial_s": 0.2, "reconnect_max_s": 2.0},
        "brokers.rabbit": {"reconnect_initial_s": 0.2, "reconnect_max_s": 2.0, "heartbeat_s": 5},
        "inbound.devices": {"qos": 2},
        **{f"outbound.{n}": dict(fast_retry) for n in ("orders-exchange", "telemetry-exchange", "mqtt")},
    }


# ------------------------------------------------------------------------------------------- the run


def calm_rate(load: Load, windows: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Acks per second over the seconds of [t0, t1) away from every fault window."""
    calm = [s for s in range(int(t0), int(t1)) if all(not (a - 1 <= s <= b + CALM_AFTER_S) for a, b in windows)]
    if not calm:
        return 0.0
    calm_set = set(calm)
    count = sum(1 for at in load.acks_at if int(at) in calm_set)
    return count / len(calm)


async def loop_lag(lags: list[float], stop: asyncio.Event) -> None:
    """The generator's own event-loop lag: a sleep of 100 ms that overran says the soak is the limit."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(0.1)
        lags.append(time.monotonic() - before - 0.1)


def workdir() -> Path:
    work = Path(tempfile.mkdtemp(prefix="mediator-soak-"))
    work.chmod(0o755)  # the RabbitMQ node runs as the user rabbitmq, which must reach its directory
    (work / "rabbit").mkdir()
    return work


async def soak(work: Path, minutes: float, fault_s: float, rate: float) -> int:
    outbox_dir = work / "outbox"
    stack = contextlib.AsyncExitStack()
    try:
        mount_tmpfs(outbox_dir)
        log(f"work directory {work} (daemon log: {work / 'daemon.log'}), outbox on a {TMPFS_MB} MiB tmpfs")
        rabbit = RabbitNode(base=work / "rabbit")
        mosquitto = MosquittoInstance(work / "mosquitto")
        await asyncio.to_thread(rabbit.start)
        stack.callback(rabbit.remove)
        stack.callback(rabbit.stop)
        await mosquitto.start()
        stack.push_async_callback(mosquitto.stop)
        rabbit_proxy = await stack.enter_async_context(TcpProxy(rabbit.port))
        mqtt_proxy = await stack.enter_async_context(TcpProxy(mosquitto.port))
        secure_port = free_port()
        qs = Quickstart(
            work,
            mqtt_port=mqtt_proxy.port,
            amqp_port=rabbit_proxy.port,
            outbox_path=outbox_dir / "outbox.sqlite",
            overrides=overrides(),
            extra_toml=EXTRA_TOML.format(secure_port=secure_port),
        )
        sha = hashlib.sha256(API_KEY.encode()).hexdigest()
        (work / "api-keys.toml").write_text(f'[[keys]]\nprincipal = "soak"\nsha256 = "{sha}"\nroles = ["publisher"]\n')
        config = qs.write()
        daemon = DaemonProcess(config, qs.http_port, work / "daemon.log")
        rig = Rig(work, outbox_dir, rabbit, mosquitto, rabbit_proxy, mqtt_proxy, qs, config, daemon)
        return await _run(rig, stack, minutes, fault_s, rate, secure_port)
    finally:
        await stack.aclose()
        umount(outbox_dir)


async def _run(
    rig: Rig, stack: contextlib.AsyncExitStack, minutes: float, fault_s: float, rate: float, secure_port: int
) -> int:
    qs, url = rig.qs, rig.rabbit.url
    books = rig.books
    kinds = {  # producer kind: (share of the rate, destinations)
        "http-plain": (60, ["amqp-orders", "mqtt-orders"]),
        "http-ce": (50, ["amqp-orders", "mqtt-orders"]),
        "http-auth": (40, ["amqp-orders", "mqtt-orders"]),
        "grpc": (60, ["amqp-orders", "mqtt-orders"]),
        "mqtt-q1": (40, ["amqp-telemetry"]),
        "mqtt-q2": (30, ["amqp-telemetry"]),
        "amqp": (40, ["mqtt-commands"]),
    }
    scale = rate / sum(share for share, _ in kinds.values())
    per_dest: dict[str, list[str]] = {}
    for kind, (_, dests) in kinds.items():
        for dest in dests:
            per_dest.setdefault(dest, []).extend(f"{kind}-{i}" for i in range(2))
    for dest, pids in per_dest.items():
        books.flow(dest, dest, pids)

    await declare_queue(url, f"soak.orders-{qs.uid}", [(qs.orders_exchange, "orders.created")])
    await declare_queue(url, f"soak.telemetry-{qs.uid}", [(qs.telemetry_exchange, "telemetry.#")])
    await rig.daemon.start(timeout_s=90)

    async def stop_daemon() -> None:
        rig.expected_exit = True
        if rig.daemon.proc is not None and rig.daemon.proc.returncode is None:
            try:
                await rig.daemon.stop(timeout_s=30)
            except TimeoutError:
                await rig.daemon.kill()

    stack.push_async_callback(stop_daemon)
    await stack.enter_async_context(consuming(url, f"soak.orders-{qs.uid}", books, "amqp-orders", robust=True))
    await stack.enter_async_context(consuming(url, f"soak.telemetry-{qs.uid}", books, "amqp-telemetry", robust=True))
    await stack.enter_async_context(
        MqttReceiver(rig.mosquitto.port, [f"{qs.topic_prefix}orders/created"], books, "mqtt-orders")
    )
    await stack.enter_async_context(
        MqttReceiver(rig.mosquitto.port, [f"{qs.topic_prefix}devices/+/commands"], books, "mqtt-commands")
    )

    http = rig.http = Http(qs.http_port, secure_port)
    stack.push_async_callback(http.close)
    grpc_client = Grpc(qs.grpc_port, qs.uid)
    stack.push_async_callback(grpc_client.close)
    load = Load(books)
    closers: list[Callable[[], Awaitable[None]]] = []
    for i in range(2):
        share = {k: s * scale / 2 for k, (s, _) in kinds.items()}
        load.start(f"http-plain-{i}", share["http-plain"], http.plain)
        load.start(f"http-ce-{i}", share["http-ce"], http.binary)
        load.start(f"http-auth-{i}", share["http-auth"], http.structured)
        load.start(f"grpc-{i}", share["grpc"], grpc_client.publish)
        for qos in (1, 2):
            name = f"mqtt-q{qos}-{i}"
            mqtt = MqttSender(
                rig.mosquitto.port, f"{qs.topic_prefix}devices/{name}/telemetry", qos, f"soak-{qs.uid}-{name}"
            )
            closers.append(mqtt.close)
            load.start(name, share[f"mqtt-q{qos}"], mqtt.publish)
        amqp = AmqpSender(url, qs.commands_exchange, f"amqp-{i}")
        closers.append(amqp.close)
        load.start(f"amqp-{i}", share["amqp"], amqp.publish)
    log(f"load: {len(load.tasks)} producers, target {load.target:.0f} events/s; a fault every {fault_s:.0f} s")

    lags: list[float] = []
    watcher = asyncio.create_task(rig.watch(), name="watch")
    lagger = asyncio.create_task(loop_lag(lags, load.stop), name="lag")
    faults = rig.faults_in_turn()
    t_start = time.monotonic()
    t_end = t_start + minutes * 60
    baseline: Sample | None = None
    first_sample: Sample | None = None
    try:
        while True:
            next_fault = t_start + (rig.faults + 1) * fault_s
            if next_fault > t_end - 20:
                break
            await asyncio.sleep(max(0.0, next_fault - time.monotonic()))
            name, run = faults[rig.faults % len(faults)]
            if rig.faults == len(faults):
                baseline = rig.sample()  # the end of the first cycle: the next fault restarts the daemon
                log(f"  end of the first fault cycle: rss={baseline.rss_mb:.1f} MiB fds={baseline.fds}")
            before = rig.sample()
            used = shutil.disk_usage(rig.outbox_dir).used >> 20
            log(
                f"fault {rig.faults + 1}: {name} (rss={before.rss_mb:.1f} MiB fds={before.fds} outbox={used} MiB, "
                f"acked={books.acked()})"
            )
            began = time.monotonic()
            await run()
            if not await rig.healthy():
                rig.failures.append(f"not ready 90 s after {name}")
                log(f"  NOT READY 90 s after {name}:\n{rig.daemon.logs()[-3000:]}")
            rig.faults += 1
            rig.fault_windows.append((began, time.monotonic()))
            if rig.faults == 1:
                await asyncio.sleep(min(30.0, fault_s / 3))
                first_sample = rig.sample()
            log(f"  healed in {time.monotonic() - began:.1f} s; acked={books.acked()}")
        await asyncio.sleep(max(0.0, t_end - time.monotonic()))
        end_sample = rig.sample()
        load.stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*load.tasks)
        for close in closers:
            await close()
        log(f"load stopped; draining (up to {DRAIN_S:.0f} s)")
        deadline = time.monotonic() + DRAIN_S
        while not books.drained() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(QUIET_S)
    finally:
        watcher.cancel()
        lagger.cancel()
        load.stop.set()
        for task in load.tasks:
            task.cancel()
        await asyncio.wait([watcher, lagger, *load.tasks], timeout=10)

    log(books.report("soak"))
    flows = list(books.flows.values())
    acked_keys = {key for f in flows for key in f.acked()}
    lost_keys = {key for f in flows for key in f.lost()}
    received_keys = received_everywhere(books)
    sent = sum(len(s.attempted) for s in books.senders.values())
    duplicates = sum(f.duplicates() for f in flows)
    unexpected = sum(len(f.unexpected()) for f in flows)
    start = baseline or first_sample or Sample(0.0, 0)
    line = (
        f"soak: sent={sent} acked={len(acked_keys)} received={len(received_keys)} lost={len(lost_keys)} "
        f"duplicates={duplicates} faults={rig.faults} rss_start={start.rss_mb:.1f} rss_end={end_sample.rss_mb:.1f} "
        f"fds_start={start.fds} fds_end={end_sample.fds}"
    )
    problems = list(rig.failures)
    if lost_keys:
        problems.append(f"{len(lost_keys)} acknowledged events never arrived: {sorted(lost_keys)[:10]}")
    if unexpected or books.strays:
        problems.append(f"{unexpected} events arrived that were never sent; strays {books.strays[:3]}")
    if rig.crashes:
        problems.append(f"the daemon died outside a fault: {rig.crashes}")
    if baseline is None:
        # Before the dedup window (300 s) and the caches are full, growth is warm-up, not a leak.
        log("RSS/fd check skipped: no full fault cycle in this run (rss_start is the sample 30 s after fault 1)")
    elif start.rss_mb and end_sample.rss_mb > start.rss_mb * (1 + RSS_GROWTH_MAX):
        problems.append(f"RSS grew from {start.rss_mb:.1f} to {end_sample.rss_mb:.1f} MiB (> {RSS_GROWTH_MAX:.0%})")
    if baseline is not None and start.fds and end_sample.fds > start.fds + FD_SLACK:
        problems.append(f"open descriptors grew from {start.fds} to {end_sample.fds} (> {FD_SLACK} more)")
    achieved = calm_rate(load, rig.fault_windows, t_start + 10, t_end)
    lag_p99 = statistics.quantiles(lags, n=100)[98] if len(lags) >= 100 else max(lags, default=0.0)
    log(f"rate: target {load.target:.0f}/s, calm {achieved:.0f}/s; generator loop lag p99 {lag_p99 * 1000:.0f} ms")
    if achieved < RATE_FLOOR * load.target:
        who = "the load generator (its loop lagged)" if lag_p99 > 0.05 else "the daemon or the brokers"
        problems.append(
            f"calm rate {achieved:.0f}/s is below {RATE_FLOOR:.0%} of the target {load.target:.0f}/s: {who}"
        )
    for problem in problems:
        log(f"FAIL: {problem}")
    print(line, flush=True)
    return 1 if problems else 0


def received_everywhere(books: Books) -> set[Key]:
    """Events (sent ones) that arrived at every destination their producer's flows name."""
    seen = {f.name: set(f.received) for f in books.flows.values()}
    dests: dict[str, list[str]] = {}
    for f in books.flows.values():
        for s in f.senders:
            dests.setdefault(s.pid, []).append(f.name)
    return {
        (pid, n)
        for pid, names in dests.items()
        for n in books.senders[pid].attempted
        if all((pid, n) in seen[name] for name in names)
    }


def main() -> int:
    # The clients' own reconnect chatter (aio-pika, aiormq, aiomqtt) would drown the soak's lines.
    for name in ("aio_pika", "aiormq", "aiomqtt", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    minutes = float(os.environ.get("SOAK_MINUTES", "30"))
    fault_s = float(os.environ.get("SOAK_FAULT_S", "120"))
    rate = float(os.environ.get("SOAK_RATE", "300"))
    try:  # the generator's own CPU is part of its rate budget: uvloop (the "fast" extra) when installed
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(soak(workdir(), minutes, fault_s, rate))


if __name__ == "__main__":
    raise SystemExit(main())
