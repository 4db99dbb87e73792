"""Real clients for push subscriptions: an SSE reader over aiohttp's client (WHATWG event-stream parsing),
a subscriber on a raw socket that never reads, and an AMQP queue counted with a deadline."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aio_pika.abc import AbstractQueue


@dataclass
class SseMessage:
    id: str | None
    event: str | None
    data: str

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.data)
        return doc


@dataclass
class SseStream:
    """Parses a ``text/event-stream`` body as EventSource does (WHATWG HTML 9.2.6): fields, comments, the
    blank line that dispatches a message."""

    response: aiohttp.ClientResponse
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    last_id: str | None = None

    async def _line(self) -> str | None:
        raw = await self.response.content.readline()
        if not raw:
            return None
        return raw.decode("utf-8").rstrip("\r\n")

    async def next(self, timeout_s: float = 10.0) -> SseMessage | None:
        """The next message; None when the stream ended. Comments seen on the way are kept in ``comments``."""
        data: list[str] = []
        event: str | None = None
        msg_id: str | None = None
        async with asyncio.timeout(timeout_s):
            while True:
                line = await self._line()
                if line is None:
                    return None
                if line == "":
                    if data:
                        if msg_id is not None:
                            self.last_id = msg_id
                        return SseMessage(msg_id, event, "\n".join(data))
                    event = None
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
                elif name == "id":
                    msg_id = value
                elif name == "retry" and value.isdigit():
                    self.retry = int(value)

    async def until_comment(self, prefix: str, timeout_s: float = 10.0) -> str:
        """Read (messages are an error) until a comment starting with ``prefix``."""
        async with asyncio.timeout(timeout_s):
            while True:
                for comment in self.comments:
                    if comment.startswith(prefix):
                        return comment
                line = await self._line()
                if line is None:
                    raise AssertionError(f"stream ended before a comment {prefix!r}; comments: {self.comments}")
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("retry:"):
                    self.retry = int(line.split(":", 1)[1])
                elif line:
                    raise AssertionError(f"a message before the comment {prefix!r}: {line[:200]}")

    async def take(self, count: int, timeout_s: float = 20.0) -> list[SseMessage]:
        got: list[SseMessage] = []
        try:
            async with asyncio.timeout(timeout_s):
                while len(got) < count:
                    msg = await self.next(timeout_s)
                    if msg is None:
                        break
                    got.append(msg)
        except TimeoutError:
            pass
        assert len(got) == count, f"expected {count} messages, got {len(got)}; comments: {self.comments[-5:]}"
        return got


async def open_sse(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **params: str
) -> SseStream:
    """An SSE subscription whose ``: subscribed`` comment has arrived (so it is registered)."""
    resp = await http.get(url, headers={"Accept": "text/event-stream", **(headers or {})}, params=params or None)
    assert resp.status == 200, f"{resp.status}: {await resp.text()}"
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    stream = SseStream(resp)
    await stream.until_comment("subscribed")
    return stream


class StalledSubscriber:
    """An SSE subscriber on a raw socket with a tiny receive buffer that sends its request and then never
    reads: what a frozen browser tab or a wedged proxy looks like to the daemon."""

    def __init__(self, port: int, path: str, websocket: bool = False) -> None:
        self.port = port
        self.path = path
        self.websocket = websocket
        self.sock: socket.socket | None = None

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        sock.connect(("127.0.0.1", self.port))
        if self.websocket:  # RFC 6455 4.1, by hand: the client then never reads a frame
            head = (
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: cloudevents.json\r\n"
            )
        else:
            head = "Accept: text/event-stream\r\n"
        sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
        self.sock = sock

    def drain(self) -> tuple[bytes, bool]:
        """Everything the daemon sent, read only now (after the test), and whether the daemon ended the
        connection (False: still open after 5 s of silence)."""
        assert self.sock is not None
        self.sock.settimeout(5.0)
        chunks = []
        ended = False
        while True:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        return b"".join(chunks), ended

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


async def drain_queue(queue: AbstractQueue, expected: int, timeout_s: float = 30.0, settle_s: float = 0.5) -> list[str]:
    """The message ids ``queue`` receives: waits for ``expected``, then ``settle_s`` more for extras."""
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    while True:
        msg = await queue.get(fail=False)
        if msg is not None:
            await msg.ack()
            got.append(str(msg.message_id))
            continue
        now = time.monotonic()
        if len(got) >= expected:
            if quiet_until is None:
                quiet_until = now + settle_s
            elif now >= quiet_until:
                return got
        elif now >= deadline:
            raise AssertionError(f"queue received {len(got)} of {expected} messages in {timeout_s} s")
        await asyncio.sleep(0.05)


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    """The value of one sample of the daemon's /metrics (0 when absent)."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{", 1)[0] != name:
            continue
        got = head[len(name) + 1 : -1] if "{" in head else ""
        if ",".join(sorted(got.split(","))) == want:
            return float(value)
    return 0.0
