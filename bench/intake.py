"""Intake rates (issue 13): receive -> commit -> acknowledge per inbound, with the outbound stalled.

The daemon runs the path's inbound with its one outbound pointed at a socket that listens and never
accepts (a peer that hangs: every send waits for its timeout, the dispatcher holds ``max_in_flight`` of
them and sends nothing), so what is measured is how fast the inbound takes events into the outbox and
acknowledges them: what decides whether a burst waits in the outbox or is lost in the broker. The count
is the daemon's own ``mediator_events_accepted_total{inbound="src"}`` (committed, the sender acknowledged),
read from ``/metrics`` every 20 ms:

- HTTP: wrk (C, 64 connections) for the run's length; rate = accepted / wrk's duration.
- MQTT: the C generator (``mosquitto_pub -l -q 1 -M 100``) publishes ``count`` messages into the bench's
  Mosquitto (unlimited queues), which buffers what the daemon has not taken yet; rate = ``count`` / (the
  last one accepted - the first line sent). The generator's own rate into a direct subscriber is the
  generator row of the table: several times any rate measured here.
- AMQP: ``count`` messages are published into the inbound's queue while the daemon is stopped (the queue
  is durable), then the daemon starts; rate = ``count`` / (the last one accepted - the first one), so the
  publisher's speed plays no part.

The table shows each beside the end-to-end rate of the path with that inbound in the same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from bench import payload
from bench.clients import generator_argv
from bench.runner import run_wrk

INTAKE_PATHS = {"http": "http-amqp", "mqtt": "mqtt-amqp", "amqp": "amqp-mqtt"}
"""Inbound kind -> the path whose inbound it is (and whose end-to-end rate it is shown beside)."""
_ACCEPTED = re.compile(r'^mediator_events_accepted_total\{[^}]*inbound="src"[^}]*\} ([0-9.e+]+)$', re.M)


class Hang:
    """A TCP socket that listens and never accepts: the stalled outbound's peer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def accepted(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return int(sum(float(m) for m in _ACCEPTED.findall(text)))


def wait_accepted(http_port: int, target: int, max_s: float, alive: Callable[[], str | None]) -> tuple[float, int]:
    """(monotonic time the count reached ``target`` or the deadline passed, the count then)."""
    deadline = time.monotonic() + max_s
    while True:
        n = accepted(http_port)
        now = time.monotonic()
        if n >= target or now > deadline:
            return now, n
        dead = alive()
        if dead is not None:
            raise RuntimeError(dead)
        time.sleep(0.02)


def http_intake(http_port: int, duration_s: float, run_id: int, headers: dict[str, str]) -> dict[str, Any]:
    before = accepted(http_port)
    wrk = run_wrk(f"http://127.0.0.1:{http_port}/bench", run_id, duration_s, headers)
    count = accepted(http_port) - before
    seconds = wrk["duration_us"] / 1e6
    return {"count": count, "seconds": round(seconds, 3), "wrk_cpu_percent": wrk["cpu_percent"]}


def mqtt_intake(
    spec: dict[str, Any], http_port: int, count: int, run_id: int, alive: Callable[[], str | None]
) -> dict[str, Any]:
    before = accepted(http_port)
    lines = b"".join(payload.make(run_id * payload.RUN_SPAN + i, 0) + b"\n" for i in range(count))
    proc = subprocess.Popen(
        generator_argv(spec, f"bench-intake-{run_id}"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.3)  # connected and waiting on stdin
    started = time.monotonic()
    assert proc.stdin is not None
    proc.stdin.write(lines)
    proc.stdin.close()
    done, n = wait_accepted(http_port, before + count, 120, alive)
    generator_exit = proc.wait(30)
    return {"count": n - before, "seconds": round(done - started, 3), "generator_exit": generator_exit}


async def _prefill(url: str, exchange: str, routing_key: str, count: int, run_id: int) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel(publisher_confirms=True)
        ex = await channel.get_exchange(exchange, ensure=True)
        window = asyncio.Semaphore(512)

        async def one(i: int) -> None:
            async with window:
                body = payload.make(run_id * payload.RUN_SPAN + i, 0)
                await ex.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key)

        await asyncio.gather(*(one(i) for i in range(count)))


def amqp_prefill(url: str, exchange: str, routing_key: str, count: int, run_id: int) -> None:
    asyncio.run(asyncio.wait_for(_prefill(url, exchange, routing_key, count, run_id), 120))


def amqp_intake(
    http_port: int, count: int, start: Callable[[], None], alive: Callable[[], str | None]
) -> dict[str, Any]:
    """``start`` the daemon (its queue already holds ``count`` messages) and time it through them."""
    start()
    first_seen = time.monotonic()
    while accepted(http_port) == 0 and time.monotonic() - first_seen < 30:
        time.sleep(0.005)
    first = time.monotonic()
    done, n = wait_accepted(http_port, count, 120, alive)
    return {"count": n, "seconds": round(done - first, 3)}


def rate(result: dict[str, Any]) -> float:
    with contextlib.suppress(ZeroDivisionError, KeyError):
        return float(result["count"]) / float(result["seconds"])
    return 0.0
