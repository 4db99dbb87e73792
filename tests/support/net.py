"""Loopback helpers shared by the tests."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import Callable

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
MQTT_HOST = "127.0.0.1"
MQTT_PORT = 1883


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
# Under pytest-xdist each worker process picks from its own residue class, so two workers never hand out
# the same port (each one's ``_handed_out`` only knows its own).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, picked below the kernel's ephemeral range. A port the kernel hands out
    (bind to 0) comes from that range, which every outgoing connection also takes its local port from: one
    of the tests' own client sockets took a daemon's HTTP port between the pick and the daemon's bind (seen
    once in a clean-clone run, exit 4 "address already in use"). Never the same port twice in a session."""
    if _EPHEMERAL_LOW > 12000:
        for _ in range(500):
            port = random.randrange(10000, _EPHEMERAL_LOW)
            if port % _WORKERS != _WORKER or port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # no room below the range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        picked: int = s.getsockname()[1]
        return picked


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
