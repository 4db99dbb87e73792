"""Loopback helpers shared by the tests."""

from __future__ import annotations

import socket
import uuid

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
