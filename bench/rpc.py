"""Request-reply beside plain publish (issue 21): HTTP -> AMQP through one daemon, in the same round.

``.venv/bin/python -m bench.rpc [--rounds 3] [--seconds 10] [--rate 500]``

- **plain**: wrk (2 threads, 64 connections, the suite's 1 KiB bodies) POSTs to ``/plain``, published (through
  the outbox) to a queue an aio-pika consumer drains; rate = the deliveries / (the last delivery - wrk's start).
- **Prefer: wait**: the same wrk POSTs to ``/plain`` with ``Prefer: wait=10``: each answer comes once the
  consumer's queue confirmed the delivery; rate = wrk's 2xx / its duration, beside plain's in the round.
- **request-reply**: the same wrk POSTs to ``/rpc`` (``request = true``), published to a queue an aio-pika
  responder (its own process) answers by direct reply-to; rate = wrk's 200s / its duration (a 200 is a whole
  round trip).
- **ceiling**: an aio-pika requester straight to the same responder, 64 round trips at once (no daemon).
- **latency at a fixed rate**: an open-loop aiohttp client at ``--rate`` requests/s on ``/rpc``; p50/p99 of
  the round trip beside the responder's own time per request (receipt to its reply's publish returning).

Each round runs plain then request-reply; the ratio is taken within a round, the table shows medians.
Results go to ``bench/.work/rpc.json``. Needs the shared RabbitMQ (127.0.0.1:5672) and ``wrk``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench.infra import WORK
from bench.runner import run_wrk

ROOT = Path(__file__).resolve().parents[1]
RABBIT = "amqp://guest:guest@127.0.0.1:5672/"


WAIT = {"Prefer": "wait=10"}  # RFC 7240: answered once every destination confirmed (or after 10 s, 202)


def config(port: int, outbox: Path, plain_q: str, rpc_q: str) -> str:
    return f"""
[daemon]
log_level = "warning"
log_format = "json"

[outbox]
path = "{outbox}"
max_pending = 100000

[listeners.http]
kind = "http"
port = {port}

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT}"

[inbound.plain]
kind = "http"
listener = "http"
path = "/plain"
type = "bench.plain"
source = "/plain"

[inbound.rpc]
kind = "http"
listener = "http"
path = "/rpc"
type = "bench.rpc"
source = "/rpc"
request = true
request_timeout_s = 10.0

[outbound.out]
kind = "amqp"
broker = "rabbit"
exchange = ""
queues = ["{plain_q}", "{rpc_q}"]

[[routes]]
name = "plain"
match = {{ inbound = ["plain"] }}
to = [{{ outbound = "out", address = "{plain_q}" }}]

[[routes]]
name = "rpc"
match = {{ inbound = ["rpc"] }}
to = [{{ outbound = "out", address = "{rpc_q}" }}]
"""


def _responder(queue_name: str, ready: Any, stop: Any, results: Any, measure: Any) -> None:
    """An aio-pika echo responder; puts its own time per request (seconds, while ``measure`` is set: the
    fixed-rate run) on ``results`` when stopped."""
    import aio_pika

    async def main() -> None:
        own: list[float] = []
        conn = await aio_pika.connect(RABBIT)
        # No publisher confirms on the replies, as RabbitMQ's RPC tutorial writes a responder: a reply is
        # worth something only while its requester waits (and direct reply-to keeps nothing), so waiting
        # for a confirm per reply bought nothing and made the responder, not the daemon, the limit.
        channel = await conn.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(queue_name, durable=True)
        exchange = channel.default_exchange

        async def on(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            t0 = time.perf_counter()
            reply = aio_pika.Message(msg.body, content_type=msg.content_type, correlation_id=msg.correlation_id)
            await exchange.publish(reply, routing_key=msg.reply_to or "")
            await msg.ack()
            if measure.is_set():
                own.append(time.perf_counter() - t0)

        await queue.consume(on)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await conn.close()
        results.put(own)

    asyncio.run(main())


def _consumer(queue_name: str, ready: Any, stop: Any, count: Any) -> None:
    """Counts deliveries of ``queue_name`` into the shared ``count`` and the time of the last one."""
    import aio_pika

    async def main() -> None:
        conn = await aio_pika.connect(RABBIT)
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(queue_name, durable=True)

        async def on(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            count[0] += 1
            count[1] = time.monotonic()

        await queue.consume(on, no_ack=True)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await conn.close()

    asyncio.run(main())


async def ceiling(queue_name: str, seconds: float, in_flight: int = 64) -> float:
    """Round trips/s of an aio-pika requester straight to the same responder (direct reply-to, transient
    messages, publisher confirms, ``in_flight`` at once like wrk's 64 connections): what the responder and
    the broker allow without the daemon."""
    import aio_pika

    conn = await aio_pika.connect(RABBIT)
    async with conn:
        channel = await conn.channel(publisher_confirms=True)
        waiting: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            fut = waiting.pop(msg.correlation_id or "", None)
            if fut is not None and not fut.done():
                fut.set_result(msg.body)

        replies = await channel.declare_queue("amq.rabbitmq.reply-to", passive=True)
        await replies.consume(on_reply, no_ack=True)
        done = 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            from bench import payload

            i = 0
            while time.monotonic() < end:
                cid = uuid.uuid4().hex
                fut = waiting[cid] = asyncio.get_running_loop().create_future()
                message = aio_pika.Message(
                    payload.make(i, 0), correlation_id=cid, reply_to="amq.rabbitmq.reply-to", expiration=10
                )
                await channel.default_exchange.publish(message, routing_key=queue_name)
                await asyncio.wait_for(fut, 10)
                done += 1
                i += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return done / (time.monotonic() - t0)


async def fixed_rate(url: str, rate: float, seconds: float) -> tuple[list[float], int]:
    """Open loop: one request every 1/rate s whatever the answers do; the round trip of each 200, and how
    many were answered otherwise (504 when the rate is beyond what the round trip sustains)."""
    import aiohttp

    from bench import payload

    out: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            body = payload.make(i, time.monotonic_ns())
            async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status == 200:
                    out.append(time.perf_counter() - t0)
                else:
                    errors += 1

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return out, errors


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the daemon did not become ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=500.0)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    u = uuid.uuid4().hex[:8]
    plain_q, rpc_q = f"bench.plain.{u}", f"bench.rpc.{u}"
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    measure = ctx.Event()
    count = ctx.Array("d", [0.0, 0.0])
    results: Any = ctx.Queue()
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(config(port, Path(tmp) / "outbox.sqlite", plain_q, rpc_q))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "mediator", "run", "--config", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "daemon.log", "wb"),  # noqa: SIM115  # closed with the directory
        )
        ready_r, ready_c = ctx.Event(), ctx.Event()
        responder = ctx.Process(target=_responder, args=(rpc_q, ready_r, stop, results, measure), daemon=True)
        consumer = ctx.Process(target=_consumer, args=(plain_q, ready_c, stop, count), daemon=True)
        try:
            wait_ready(port, daemon)
            responder.start()
            consumer.start()
            if not (ready_r.wait(30) and ready_c.wait(30)):
                raise RuntimeError("the responder or the consumer did not start")
            run_wrk(f"http://127.0.0.1:{port}/rpc", 0, 2)  # warm-up
            for r in range(1, args.rounds + 1):
                before = int(count[0])
                t0 = time.monotonic()
                plain = run_wrk(f"http://127.0.0.1:{port}/plain", 2 * r, args.seconds)
                target = before + plain["accepted"]
                deadline = time.monotonic() + 60
                while count[0] < target and time.monotonic() < deadline:
                    time.sleep(0.05)
                delivered = int(count[0]) - before
                plain_rate = delivered / (count[1] - t0)
                # Prefer: wait on the same plain path: each answer comes once the consumer's queue confirmed.
                before_wait = int(count[0])
                wait = run_wrk(f"http://127.0.0.1:{port}/plain", 3 * args.rounds + r, args.seconds, WAIT)
                wait_rate = wait["accepted"] / (wait["duration_us"] / 1e6)
                deadline = time.monotonic() + 60
                while count[0] < before_wait + wait["accepted"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                rpc = run_wrk(f"http://127.0.0.1:{port}/rpc", 2 * r + 1, args.seconds)
                rpc_rate = rpc["accepted"] / (rpc["duration_us"] / 1e6)
                ceil = asyncio.run(ceiling(rpc_q, args.seconds))
                row = {
                    "plain_msgs_s": round(plain_rate),
                    "plain_lost": plain["accepted"] - delivered,
                    "plain_accept_p99_ms": round(plain["p99_us"] / 1e3, 1),
                    "wait_msgs_s": round(wait_rate),
                    "wait_non2xx": wait["non2xx"],
                    "wait_ratio": round(wait_rate / plain_rate, 2),
                    "wait_p99_ms": round(wait["p99_us"] / 1e3, 1),
                    "rpc_msgs_s": round(rpc_rate),
                    "rpc_non2xx": rpc["non2xx"],
                    "ratio": round(rpc_rate / plain_rate, 2),
                    "ceiling_msgs_s": round(ceil),
                    "ratio_ceiling": round(rpc_rate / ceil, 2),
                }
                rounds.append(row)
                print(f"round {r}: {row}", file=sys.stderr)
            measure.set()
            latencies, refused = asyncio.run(fixed_rate(f"http://127.0.0.1:{port}/rpc", args.rate, args.seconds))
        finally:
            stop.set()
            own: list[float] = results.get(timeout=30) if responder.is_alive() else []
            responder.join(10)
            consumer.join(10)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            _delete_queues([plain_q, rpc_q])
    summary = {
        "plain_msgs_s": statistics.median(r["plain_msgs_s"] for r in rounds),
        "wait_msgs_s": statistics.median(r["wait_msgs_s"] for r in rounds),
        "wait_ratio": statistics.median(r["wait_ratio"] for r in rounds),
        "rpc_msgs_s": statistics.median(r["rpc_msgs_s"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "ceiling_msgs_s": statistics.median(r["ceiling_msgs_s"] for r in rounds),
        "ratio_ceiling": statistics.median(r["ratio_ceiling"] for r in rounds),
        f"rpc_not_200_at_{args.rate:g}": refused,
        f"rpc_p50_ms_at_{args.rate:g}": round(pct(latencies, 0.50) * 1e3, 2),
        f"rpc_p99_ms_at_{args.rate:g}": round(pct(latencies, 0.99) * 1e3, 2),
        "responder_p50_ms": round(pct(own, 0.50) * 1e3, 3),
        "responder_p99_ms": round(pct(own, 0.99) * 1e3, 3),
        "rounds": rounds,
        "cpus": os.cpu_count(),
    }
    (WORK / "rpc.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _delete_queues(names: list[str]) -> None:
    import aio_pika

    async def go() -> None:
        conn = await aio_pika.connect(RABBIT)
        async with conn:
            channel = await conn.channel()
            for name in names:
                await channel.queue_delete(name)

    asyncio.run(go())


if __name__ == "__main__":
    raise SystemExit(main())
