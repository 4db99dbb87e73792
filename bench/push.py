"""HTTP -> push fan-out: events POSTed to the daemon, delivered to 1, 100 and 1,000 SSE subscribers.

``python -m bench.push`` (``make bench`` runs it after the main suite). One daemon with one HTTP inbound and
one push outbound (the shipped defaults: durable ring, ``synchronous = full``); per subscriber count:

- the subscribers connect from a process of their own (asyncio, raw sockets, HTTP/1.0 so the stream is not
  chunked) and say when every one has its ``: subscribed`` comment; the daemon's ``VmRSS`` before they
  connect and once they are all connected and idle gives the **RSS per idle subscriber**;
- a producer POSTs ``--rate`` events per second for ``--seconds`` (open loop, 1 KiB bodies of
  ``bench/payload.py``, each stamped with its send time);
- every subscriber counts the events it receives; ``--sample`` of them parse each event's send time for the
  **latency from the POST to the subscriber's read** (p50, p99); the **fan-out rate** is the events delivered
  to all subscribers over the time from the first send to the last arrival. Loss (an event a subscriber did
  not get) and subscribers the daemon disconnected are counted, never hidden.

Results: a table on stdout and ``bench/results-push.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import payload
from bench.infra import Daemon, cpu_seconds, free_port, log, rss_mb

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "push"

CONFIG = """
[daemon]
log_level = "warning"

[outbox]
path = "{work}/outbox.sqlite"
max_pending = 100000

[listeners.http]
kind = "http"
port = {port}
max_connections = 5000

[inbound.posts]
kind = "http"
listener = "http"
path = "/in"
type = "com.example.bench"
source = "/bench"

[outbound.fan]
kind = "push"
listener = "http"
max_subscribers = 5000
max_subscribers_per_principal = 5000
subscriber_buffer = 1000

[[routes]]
name = "fan"
to = [{{ outbound = "fan", address = "bench" }}]
"""


# ------------------------------------------------------------------------------------------- subscribers


async def _subscriber(
    port: int,
    index: int,
    sample: bool,
    counts: list[int],
    latencies: list[float],
    ready: asyncio.Event,
    last: list[float],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(b"GET /subscribe/bench HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    buf = b""
    while b": subscribed" not in buf:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError(f"subscriber {index}: the stream ended before it was subscribed: {buf[:300]!r}")
        buf += chunk
    ready.set()
    counts[index] += buf.count(b"\nid: ")  # the first events may have come with the head
    carry = buf[-64:]
    while True:
        chunk = await reader.read(262144)
        if not chunk:
            return
        now = time.monotonic_ns()
        data = carry + chunk
        n = data.count(b"\nid: ") - carry.count(b"\nid: ")
        if n:
            counts[index] += n
            last[0] = now
        if sample and n:
            pos = 0
            while True:
                i = data.find(b'"t":"', pos)
                if i < 0:
                    break
                stamp = data[i + 5 : i + 24]
                if len(stamp) < 19:
                    break
                latencies.append((now - int(stamp)) / 1e6)
                pos = i + 24
            carry = data[pos:][-64:] if pos else data[-64:]
        else:
            carry = data[-8:]


def subscriber_main(port: int, count: int, sample: int, conn: multiprocessing.connection.Connection) -> None:
    """The subscriber process: ``count`` SSE streams; reports 'ready', then on 'report' its counts."""

    async def run() -> None:
        counts = [0] * count
        latencies: list[float] = []
        last = [0.0]
        readies = [asyncio.Event() for _ in range(count)]
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(_subscriber(port, i, i < sample, counts, latencies, readies[i], last)))
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # do not flood the listen backlog
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
        conn.send(("ready", None))
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) == "report":
            ended = sum(1 for t in tasks if t.done())
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(
                (
                    "report",
                    {
                        "counts": counts,
                        "latencies_ms": latencies,
                        "last_arrival_ns": last[0],
                        "streams_ended": ended,
                        "cpu_s": usage.ru_utime + usage.ru_stime,
                    },
                )
            )
        for t in tasks:
            t.cancel()

    asyncio.run(run())


# ------------------------------------------------------------------------------------------- producer


async def produce(port: int, rate: float, seconds: float, run: int) -> tuple[int, int]:
    """POST ``rate`` events/s for ``seconds`` (open loop); returns (accepted, first send ns)."""
    total = int(rate * seconds)
    accepted = 0
    url = f"http://127.0.0.1:{port}/in"
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(seq: int) -> None:
            nonlocal accepted
            body = payload.make(run * payload.RUN_SPAN + seq, time.monotonic_ns())
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                if resp.status == 202:
                    accepted += 1

        start = time.monotonic()
        first = time.monotonic_ns()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return accepted, first


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cell(
    daemon: Daemon, port: int, subscribers: int, rate: float, seconds: float, sample: int, run: int
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    rss_before = rss_mb(daemon.pid)
    proc = ctx.Process(target=subscriber_main, args=(port, subscribers, min(sample, subscribers), child), daemon=True)
    proc.start()
    try:
        if not parent.poll(180):
            raise RuntimeError(f"{subscribers} subscribers did not all connect within 180 s")
        tag, _ = parent.recv()
        assert tag == "ready"
        time.sleep(2.0)  # idle: let allocations settle before reading RSS
        rss_idle = rss_mb(daemon.pid)
        cpu0 = cpu_seconds(daemon.pid)
        accepted, first_ns = asyncio.run(produce(port, rate, seconds, run))
        # Until every subscriber has every event, or 5 s without progress (what is missing then is loss).
        progress, quiet_since = -1, time.monotonic()
        while True:
            parent.send("report")
            if not parent.poll(60):
                raise RuntimeError("the subscriber process did not report")
            tag, rep = parent.recv()
            counts: list[int] = rep["counts"]
            total = sum(counts)
            if min(counts) >= accepted:
                break
            if total != progress:
                progress, quiet_since = total, time.monotonic()
            elif time.monotonic() - quiet_since > 5.0:
                break
            time.sleep(0.25)
        cpu1 = cpu_seconds(daemon.pid)
        parent.send("stop")
    finally:
        proc.terminate()
        proc.join(10)
    delivered = sum(min(c, accepted) for c in counts)
    span_s = max(1e-9, (rep["last_arrival_ns"] - first_ns) / 1e9)
    lat = rep["latencies_ms"]
    return {
        "subscribers": subscribers,
        "rate_per_s": rate,
        "seconds": seconds,
        "accepted": accepted,
        "delivered": delivered,
        "expected": accepted * subscribers,
        "lost": accepted * subscribers - delivered,
        "duplicates": sum(max(0, c - accepted) for c in counts),
        "streams_ended": rep["streams_ended"],
        "fanout_events_per_s": round(delivered / span_s, 1),
        "latency_p50_ms": round(statistics.median(lat), 2) if lat else None,
        "latency_p99_ms": round(percentile(lat, 0.99) or 0.0, 2) if lat else None,
        "latency_samples": len(lat),
        "daemon_cpu_percent": round(100.0 * (cpu1 - cpu0) / span_s, 1),
        "subscriber_process_cpu_s": round(rep["cpu_s"], 2),
        "rss_before_mb": round(rss_before, 2),
        "rss_idle_mb": round(rss_idle, 2),
        "rss_per_idle_subscriber_kib": round((rss_idle - rss_before) * 1024 / subscribers, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.push", description=__doc__)
    ap.add_argument("--subscribers", default="1,100,1000", help="comma-separated subscriber counts")
    ap.add_argument("--rate", type=float, default=100.0, help="events per second posted")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long each cell posts")
    ap.add_argument("--sample", type=int, default=20, help="subscribers that time every event")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-push.json"))
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.subscribers.split(",") if x.strip()]
    WORK.mkdir(parents=True, exist_ok=True)
    for old in WORK.glob("outbox*"):
        old.unlink()
    load_before: float = os.getloadavg()[0]
    port = free_port()
    daemon = Daemon(CONFIG.format(work=WORK, port=port), WORK, port)
    daemon.start()
    results: list[dict[str, Any]] = []
    try:
        asyncio.run(produce(port, 200.0, 1.0, 0))  # warm-up: imports, caches, the ring's file
        for i, n in enumerate(counts, start=1):
            log(f"push fan-out: {n} subscribers, {args.rate:g} events/s for {args.seconds:g} s")
            res = cell(daemon, port, n, args.rate, args.seconds, args.sample, i)
            log(f"  {json.dumps(res)}")
            results.append(res)
    finally:
        daemon.stop()
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": os.cpu_count(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: other work too
        "cells": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(
        f"{'subs':>5} {'events/s in':>11} {'fan-out/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'lost':>6}"
        f" {'cpu %':>6} {'RSS/idle sub':>13}"
    )
    for r in results:
        print(
            f"{r['subscribers']:>5} {r['accepted'] / r['seconds']:>11.0f} {r['fanout_events_per_s']:>10,.0f}"
            f" {r['latency_p50_ms'] or 0:>7.1f} {r['latency_p99_ms'] or 0:>7.1f} {r['lost']:>6}"
            f" {r['daemon_cpu_percent']:>6.0f} {r['rss_per_idle_subscriber_kib']:>9.1f} KiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
