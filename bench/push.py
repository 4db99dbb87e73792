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
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

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
{extra}
[[routes]]
name = "fan"
to = [{{ outbound = "fan", address = "bench" }}]
"""


# ------------------------------------------------------------------------------------------- subscribers


ID = b"\nid: "
STAMP = b'"t":"'


class SseCounter(asyncio.Protocol):
    """One SSE subscriber, as cheap as a reader can be: an ``asyncio.Protocol`` whose ``data_received``
    (called by the loop itself, no task woken, no future resolved) counts the ``id:`` lines and, when
    sampled, reads each event's send stamp. HTTP/1.0, so the body is the stream itself (no chunk framing)."""

    def __init__(self, index: int, sample: bool, stats: ReaderStats) -> None:
        self.index = index
        self.sample = sample
        self.stats = stats
        self.head = b""
        self.subscribed = False
        self.carry = b""
        self.ended = False
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport.write(b"GET /subscribe/bench HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        stats = self.stats
        stats.reads += 1
        stats.bytes += len(data)
        if not self.subscribed:
            self.head += data
            if b": subscribed" not in self.head:
                if len(self.head) > 65536:
                    self._fail(f"no ': subscribed' comment in {self.head[:300]!r}")
                return
            self.subscribed = True
            data, self.head = self.head, b""
            if not self.ready.done():
                self.ready.set_result(None)
        now = time.monotonic_ns()
        # An ``id:`` line split across two reads is found at the seam (the previous read's last 4 bytes).
        carry = self.carry
        n = data.count(ID) + (carry[-4:] + data[:4]).count(ID)
        if n:
            stats.counts[self.index] += n
            stats.last_arrival_ns = now
        if not self.sample:
            self.carry = data[-4:]
            return
        text = carry + data
        pos = 0
        while True:
            i = text.find(STAMP, pos)
            if i < 0 or i + 24 > len(text):
                break
            sent = int(text[i + 5 : i + 24])
            stats.latencies_ms.append((now - sent) / 1e6)
            stats.sent_ns.append(sent)
            pos = i + 24
        self.carry = text[max(pos, len(text) - 24) :]  # a stamp this read cut is read with the next one

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"subscriber {self.index}: {why}"))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._fail(f"the stream ended before it was subscribed: {self.head[:300]!r}")


class ReaderStats:
    """What one subscriber process saw, and how busy it was (the generator must not be the limit)."""

    def __init__(self, count: int) -> None:
        self.counts = [0] * count
        self.latencies_ms: list[float] = []
        self.sent_ns: list[int] = []  # each sample's send time, for --dump-latencies
        self.last_arrival_ns = 0
        self.reads = 0
        self.bytes = 0
        self.lags_ms: list[float] = []


async def _lag_probe(stats: ReaderStats, interval_s: float = 0.01) -> None:
    """The subscriber process's own loop lag: how late a 10 ms sleep wakes (a late wake-up is latency the
    process adds to every read it was about to do)."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval_s)
        stats.lags_ms.append((loop.time() - t0 - interval_s) * 1000)


def subscriber_main(
    port: int, first: int, count: int, sample: int, conn: multiprocessing.connection.Connection
) -> None:
    """A subscriber process: ``count`` SSE streams (``sample`` of them timed); reports 'ready', then on
    'report' its counts, latencies, reads, CPU and loop lag; 'reset' starts the CPU and lag window."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stats = ReaderStats(count)
        protocols: list[SseCounter] = []
        for i in range(count):
            proto = SseCounter(i, first + i < sample, stats)
            await loop.create_connection(_factory(proto), "127.0.0.1", port)
            protocols.append(proto)
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # do not flood the listen backlog
        await asyncio.wait_for(asyncio.gather(*(p.ready for p in protocols)), 120)
        probe = asyncio.create_task(_lag_probe(stats))
        conn.send(("ready", None))
        window = (time.monotonic(), _cpu_self())
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "reset":
                window = (time.monotonic(), _cpu_self())
                stats.lags_ms.clear()
                stats.reads = stats.bytes = 0
                continue
            if cmd != "report":
                break
            conn.send(
                (
                    "report",
                    {
                        "counts": stats.counts,
                        "latencies_ms": stats.latencies_ms,
                        "sent_ns": stats.sent_ns,
                        "last_arrival_ns": stats.last_arrival_ns,
                        "streams_ended": sum(1 for p in protocols if p.ended),
                        "cpu_s": _cpu_self() - window[1],
                        "wall_s": time.monotonic() - window[0],
                        "reads": stats.reads,
                        "bytes": stats.bytes,
                        "lag_p99_ms": percentile(stats.lags_ms, 0.99),
                        "lag_max_ms": max(stats.lags_ms, default=None),
                    },
                )
            )
        probe.cancel()
        for p in protocols:
            if p.transport is not None:
                p.transport.abort()

    try:
        import uvloop  # the daemon's loop too (mediator/cli.py): its C read path is the cheaper reader
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


def _factory(proto: SseCounter) -> Callable[[], SseCounter]:
    return lambda: proto


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def _ask(conns: list[multiprocessing.connection.Connection]) -> dict[str, Any]:
    """One report from every subscriber process, merged."""
    for conn in conns:
        conn.send("report")
    reps = []
    for conn in conns:
        if not conn.poll(60):
            raise RuntimeError("a subscriber process did not report")
        tag, rep = conn.recv()
        assert tag == "report"
        reps.append(rep)
    lags = [r["lag_p99_ms"] for r in reps if r["lag_p99_ms"] is not None]
    maxes = [r["lag_max_ms"] for r in reps if r["lag_max_ms"] is not None]
    return {
        "counts": [c for r in reps for c in r["counts"]],
        "latencies_ms": [x for r in reps for x in r["latencies_ms"]],
        "sent_ns": [x for r in reps for x in r["sent_ns"]],
        "last_arrival_ns": max(r["last_arrival_ns"] for r in reps),
        "streams_ended": sum(r["streams_ended"] for r in reps),
        "cpu_s": sum(r["cpu_s"] for r in reps),
        "wall_s": max(r["wall_s"] for r in reps),
        "reads": sum(r["reads"] for r in reps),
        "bytes": sum(r["bytes"] for r in reps),
        "lag_p99_ms": max(lags, default=None),
        "lag_max_ms": max(maxes, default=None),
    }


def cell(
    daemon: Daemon,
    port: int,
    subscribers: int,
    rate: float,
    seconds: float,
    sample: int,
    run: int,
    readers: int,
    dump: Path | None = None,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    rss_before = rss_mb(daemon.pid)
    procs = []
    conns: list[multiprocessing.connection.Connection] = []
    readers = max(1, min(readers, subscribers))
    sample = min(sample, subscribers)
    for k in range(readers):
        first, last = k * subscribers // readers, (k + 1) * subscribers // readers
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=subscriber_main, args=(port, first, last - first, sample, child), daemon=True)
        proc.start()
        procs.append(proc)
        conns.append(parent)
    try:
        for conn in conns:
            if not conn.poll(180):
                raise RuntimeError(f"{subscribers} subscribers did not all connect within 180 s")
            tag, _ = conn.recv()
            assert tag == "ready"
        time.sleep(2.0)  # idle: let allocations settle before reading RSS
        rss_idle = rss_mb(daemon.pid)
        for conn in conns:
            conn.send("reset")  # the subscribers' CPU and loop lag from here
        cpu0 = cpu_seconds(daemon.pid)
        log(f"  {subscribers} subscribers connected; posting")
        accepted, first_ns = asyncio.run(produce(port, rate, seconds, run))
        # Until every subscriber has every event, or 5 s without progress (what is missing then is loss).
        progress, quiet_since = -1, time.monotonic()
        while True:
            rep = _ask(conns)
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
        for conn in conns:
            conn.send("stop")
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    delivered = sum(min(c, accepted) for c in counts)
    span_s = max(1e-9, (rep["last_arrival_ns"] - first_ns) / 1e9)
    lat = rep["latencies_ms"]
    if dump is not None:  # when each sampled event was sent (ms into the cell) and its latency
        rows = sorted(zip(rep["sent_ns"], lat, strict=True))
        dump.write_text("".join(f"{(t - first_ns) / 1e6:.1f} {ms:.2f}\n" for t, ms in rows))
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
        "latency_p90_ms": round(percentile(lat, 0.90) or 0.0, 2) if lat else None,
        "latency_p99_ms": round(percentile(lat, 0.99) or 0.0, 2) if lat else None,
        "latency_max_ms": round(max(lat), 2) if lat else None,
        "latency_samples": len(lat),
        "daemon_cpu_percent": round(100.0 * (cpu1 - cpu0) / span_s, 1),
        "subscriber_processes": readers,
        "subscriber_cpu_percent": round(100.0 * rep["cpu_s"] / max(1e-9, rep["wall_s"]), 1),
        "subscriber_reads_per_s": round(rep["reads"] / max(1e-9, rep["wall_s"]), 1),
        "subscriber_bytes_per_read": round(rep["bytes"] / max(1, rep["reads"]), 1),
        "subscriber_loop_lag_p99_ms": round(rep["lag_p99_ms"], 2) if rep["lag_p99_ms"] is not None else None,
        "subscriber_loop_lag_max_ms": round(rep["lag_max_ms"], 2) if rep["lag_max_ms"] is not None else None,
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
    ap.add_argument(
        "--coalesce-ms", type=float, default=None, help="the push outbound's coalesce_ms (default: its default)"
    )
    ap.add_argument("--readers", type=int, default=1, help="subscriber processes the subscribers are spread over")
    ap.add_argument("--dump-latencies", help="write each cell's samples (send ms, latency ms) to PATH.<subs>")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-push.json"))
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.subscribers.split(",") if x.strip()]
    WORK.mkdir(parents=True, exist_ok=True)
    for old in WORK.glob("outbox*"):
        old.unlink()
    load_before: float = os.getloadavg()[0]
    port = free_port()
    extra = f"coalesce_ms = {args.coalesce_ms}\n" if args.coalesce_ms is not None else ""
    daemon = Daemon(CONFIG.format(work=WORK, port=port, extra=extra), WORK, port)
    daemon.start()
    results: list[dict[str, Any]] = []
    try:
        asyncio.run(produce(port, 200.0, 1.0, 0))  # warm-up: imports, caches, the ring's file
        for i, n in enumerate(counts, start=1):
            log(f"push fan-out: {n} subscribers, {args.rate:g} events/s for {args.seconds:g} s")
            dump = Path(f"{args.dump_latencies}.{n}") if args.dump_latencies else None
            res = cell(daemon, port, n, args.rate, args.seconds, args.sample, i, args.readers, dump)
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
        f" {'cpu %':>6} {'RSS/idle sub':>13} {'subs cpu %':>10} {'subs lag p99':>12}"
    )
    for r in results:
        print(
            f"{r['subscribers']:>5} {r['accepted'] / r['seconds']:>11.0f} {r['fanout_events_per_s']:>10,.0f}"
            f" {r['latency_p50_ms'] or 0:>7.1f} {r['latency_p99_ms'] or 0:>7.1f} {r['lost']:>6}"
            f" {r['daemon_cpu_percent']:>6.0f} {r['rss_per_idle_subscriber_kib']:>9.1f} KiB"
            f" {r['subscriber_cpu_percent']:>10.0f} {r['subscriber_loop_lag_p99_ms'] or 0:>9.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
