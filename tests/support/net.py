"""Loopback helpers shared by the tests."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
MQTT_HOST = "127.0.0.1"
MQTT_PORT = 1883


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def reachable(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses: queues, exchanges, topics, client ids."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition", poll_s: float = 0.01
) -> None:
    """Poll a condition that has no event to await (health state, call counts), bounded in time."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(poll_s)
