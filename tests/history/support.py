"""What the history tests share: a daemon on the shipped config with the store on, events published over
HTTP in batches, the admin API, and an AMQP consumer (basic.consume) that records when each message came."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage

from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL


def start(tmp: Path, name: str = "daemon", **kwargs: Any) -> tuple[Quickstart, DaemonProcess]:
    """A Quickstart (the shipped config, which keeps events for 7 days) and its daemon, not started."""
    qs = Quickstart(tmp / name, **kwargs)
    qs.tmp.mkdir(parents=True, exist_ok=True)
    return qs, DaemonProcess(qs.write(), qs.http_port, qs.tmp / "daemon.log")


def batch_of(sources: Sequence[str], count: int, kind: str, first: int = 0) -> list[dict[str, Any]]:
    """``count`` structured CloudEvents, numbered from ``first``, the sources taken in turn."""
    return [
        {
            "specversion": "1.0",
            "id": f"{kind}-{i}",
            "source": sources[i % len(sources)],
            "type": kind,
            "subject": f"item-{i % 5}",
            "datacontenttype": "application/json",
            "data": {"n": i},
        }
        for i in range(first, first + count)
    ]


async def publish_batch(http: aiohttp.ClientSession, port: int, events: list[dict[str, Any]]) -> None:
    """POST ``events`` to the shipped /events inbound as CloudEvents batches of 100."""
    for i in range(0, len(events), 100):
        async with http.post(
            f"http://127.0.0.1:{port}/events",
            data=json.dumps(events[i : i + 100]),
            headers={"Content-Type": "application/cloudevents-batch+json"},
        ) as resp:
            assert resp.status == 202, await resp.text()


async def admin(http: aiohttp.ClientSession, port: int, method: str, path: str, want: int = 200, **kwargs: Any) -> Any:
    async with http.request(method, f"http://127.0.0.1:{port}/admin/{path}", **kwargs) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == want, f"{method} /admin/{path}: {resp.status} {body}"
        return body


async def all_events(http: aiohttp.ClientSession, port: int, **params: str) -> list[dict[str, Any]]:
    """Every page of GET /admin/events for ``params``, following ``next``."""
    out: list[dict[str, Any]] = []
    cursor = None
    async with asyncio.timeout(30):
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            page = await admin(http, port, "GET", "events", params=query)
            out += page["events"]
            cursor = page["next"]
            if cursor is None:
                return out


async def wait_stored(
    http: aiohttp.ClientSession, port: int, count: int, timeout_s: float = 20.0, **params: str
) -> None:
    """Until the store answers ``count`` events for ``params`` (PostgreSQL ships in the background)."""
    seen = -1
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = len(await all_events(http, port, limit="1000", **params))
        if seen >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the store answered {seen} of {count} events for {params} in {timeout_s} s")


async def wait_replay(
    http: aiohttp.ClientSession, port: int, rid: str, states: tuple[str, ...] = ("done",), timeout_s: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = await admin(http, port, "GET", f"replays/{rid}")
        if doc["state"] in states:
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"replay {rid} not {states} after {timeout_s} s: {doc}")


@dataclass
class Consumer:
    """A queue bound to the shipped orders exchange, consumed (basic.consume): each message and its arrival."""

    queue: aio_pika.abc.AbstractQueue
    got: list[tuple[float, AbstractIncomingMessage]] = field(default_factory=list)
    _more: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.got.append((time.monotonic(), message))
        self._more.set()

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.got) < count:
                    self._more.clear()
                    await self._more.wait()
        except TimeoutError:
            raise AssertionError(f"the consumer got {len(self.got)} of {count} messages in {timeout_s} s") from None

    async def quiet(self, settle_s: float = 0.5) -> int:
        """How many it has once nothing came for ``settle_s``."""
        async with asyncio.timeout(30):
            while True:
                before = len(self.got)
                await asyncio.sleep(settle_s)
                if len(self.got) == before:
                    return before


@asynccontextmanager
async def consumer(exchange: str, key: str) -> AsyncIterator[Consumer]:
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=1000)
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(ex, key)
        c = Consumer(queue)
        await queue.consume(c.on_message)
        yield c
