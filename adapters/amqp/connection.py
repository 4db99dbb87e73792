"""One broker connection per inbound or outbound, and the loop that keeps it up.

The FIRST connect is ours: aio-pika's robust connection gives up at once when the broker is down
(``fail_fast``), so we retry with capped exponential backoff and jitter. Once connected, the robust
connection restores channels, exchanges, queues, bindings and consumers by itself after a connection loss;
its close and reconnect callbacks drive the component's health.

Over ``amqps://`` the connection uses one TLS context per broker, built when the component is built
(``broker_ssl_context``); aio-pika hands the same context to every reconnect.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import weakref
from abc import ABC, abstractmethod
from typing import Any

import structlog
from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.connection import make_url
from yarl import URL

from adapters.amqp.config import AmqpBrokerConfig
from mediator.core.health import Health
from mediator.core.tls import client_context

CLOSE_TIMEOUT_S = 5.0
SETUP_TIMEOUT_S = 10.0
# aio-pika's robust connection retries at a fixed interval; below a second it floods the log with one
# warning per attempt during an outage.
MIN_ROBUST_INTERVAL_S = 1.0


class Backoff:
    """Capped exponential backoff with jitter (each delay drawn from [d/2, d])."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.max_s, self.initial_s * (2.0 ** min(self._attempt, 32)))
        self._attempt += 1
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self._attempt = 0


def safe_address(url: str) -> str:
    """host:port/vhost of an AMQP URL, never its credentials."""
    parsed = URL(url)
    port = parsed.explicit_port or (5671 if parsed.scheme == "amqps" else 5672)
    return f"{parsed.host}:{port}{parsed.path or '/'}"


# One context per broker: every inbound and outbound of a broker opens a connection of its own. Keyed by
# the (frozen, hashable) broker config, held only while that config lives; a weak map because the
# daemon's config object is the only owner that matters (and ``check`` builds and drops one).
_CONTEXTS: weakref.WeakKeyDictionary[AmqpBrokerConfig, ssl.SSLContext] = weakref.WeakKeyDictionary()


def broker_ssl_context(where: str, broker: AmqpBrokerConfig, url: str) -> ssl.SSLContext | None:
    """The TLS context for ``url`` (None for ``amqp://``), built at most once per broker config.

    Built here rather than left to aiormq, which would read its files (or the system store) again at
    every connect; the URL's own TLS parameters are refused by the config, so nothing is lost.
    """
    if not url.startswith("amqps://"):
        return None
    context = _CONTEXTS.get(broker)
    if context is None:
        context = _CONTEXTS[broker] = client_context(f"{where}: tls", broker.tls)
    return context


async def open_connection(
    url: str, broker: AmqpBrokerConfig, connection_name: str, ssl_context: ssl.SSLContext | None = None
) -> AbstractRobustConnection:
    """Connect once (bounded by ``connect_timeout_s``); raises on failure after closing what it opened.
    ``ssl_context`` is required for an ``amqps://`` URL (``broker_ssl_context``)."""
    interval = min(broker.reconnect_max_s, max(broker.reconnect_initial_s, MIN_ROBUST_INTERVAL_S))
    conn = RobustConnection(
        make_url(url, heartbeat=broker.heartbeat_s, reconnect_interval=interval),
        # aio-pika keeps it for every reconnect; aiormq uses it instead of building its own.
        ssl_context=ssl_context,
        client_properties={"connection_name": connection_name},
    )
    try:
        # aiormq bounds the TCP and AMQP handshakes with ``timeout``; the outer bound covers the rest.
        async with asyncio.timeout(broker.connect_timeout_s + 1.0):
            await conn.connect(timeout=broker.connect_timeout_s)
    except BaseException:
        await close_quietly(conn)
        raise
    return conn


async def close_quietly(conn: AbstractConnection) -> None:
    """Close, bounded in time; a failure to close cleanly is not worth more than a debug line."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await conn.close()
    except Exception as exc:
        structlog.get_logger(__name__).debug("connection.close_failed", error=repr(exc))


class BrokerLink(ABC):
    """A ``Service`` owning one robust connection: connects (with backoff), sets up its channel through
    ``_setup``, reports health, and closes everything when cancelled."""

    role: str  # "inbound" or "outbound": log event names and the health component

    def __init__(self, admin_name: str, broker: AmqpBrokerConfig, url: str, health: Health) -> None:
        self.admin_name = admin_name
        self.component = f"{self.role}:{admin_name}"
        self.name = self.component  # Service.name: the task name in the supervisor's TaskGroup
        self.broker = broker
        self.url = url
        self.ssl_context = broker_ssl_context(f"{self.role}.{admin_name}: its broker", broker, url)
        self.health = health
        self.up = False  # connected, with everything ``_setup`` declared in place
        self.log: Any = structlog.get_logger(__name__).bind(**{self.role: admin_name}, protocol="amqp")
        health.register(self.component)

    @abstractmethod
    async def _setup(self, conn: AbstractRobustConnection) -> None:
        """Open the channel and declare what this component needs (restored by aio-pika on reconnect)."""

    def _ready(self, ready: bool, detail: str) -> None:
        self.health.set(self.component, ready, detail)

    async def run(self) -> None:
        backoff = Backoff(self.broker.reconnect_initial_s, self.broker.reconnect_max_s)
        address = safe_address(self.url)
        try:
            while True:
                self._ready(False, f"connecting to {address}")
                conn: AbstractRobustConnection | None = None
                try:
                    conn = await open_connection(
                        self.url, self.broker, f"mediator {self.component}", ssl_context=self.ssl_context
                    )
                    conn.close_callbacks.add(self._on_lost)
                    conn.reconnect_callbacks.add(self._on_restored)
                    async with asyncio.timeout(SETUP_TIMEOUT_S):
                        await self._setup(conn)
                except BaseException as exc:
                    if conn is not None:
                        await close_quietly(conn)
                    if not isinstance(exc, Exception):
                        raise  # cancelled: stop, with nothing left open
                    self._disconnected()
                    delay = backoff.next()
                    error = repr(exc) + self._tls_hint(exc)
                    self._ready(False, f"cannot connect to {address}: {error}")
                    self.log.warning(
                        f"{self.role}.connect_failed", broker=address, error=error, retry_in_s=round(delay, 3)
                    )
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                self.log.info(f"{self.role}.connected", broker=address)
                if conn.connected.is_set():  # else lost already: ``_on_restored`` reports the comeback
                    self._connected()
                    self._ready(True, f"connected to {address}")
                try:
                    # Resolves only if the connection is closed for good; the robust connection
                    # rides out broker restarts and network cuts by itself.
                    await conn.closed()
                finally:
                    conn.close_callbacks.discard(self._on_lost)
                    conn.reconnect_callbacks.discard(self._on_restored)
                    self._disconnected()
                    await close_quietly(conn)
                self.log.warning(f"{self.role}.closed", broker=address)
        finally:
            self._ready(False, "stopped")

    def _tls_hint(self, exc: BaseException) -> str:
        """Why an amqps connection was reset, when we can guess. RabbitMQ refuses a missing client
        certificate with a TLS 1.3 alert after our side of the handshake completed, and closes; the
        alert often arrives with a reset that discards it, leaving only "connection reset" to report."""
        tls = self.broker.tls
        if self.ssl_context is None or (tls is not None and tls.cert_file is not None):
            return ""
        if "reset" not in str(exc).lower():
            return ""
        return " (over TLS without a client certificate: a broker that requires one closes the connection so)"

    def _on_lost(self, _sender: object, exc: BaseException | None) -> None:
        # Also called for every failed reconnection attempt: warn once per outage.
        was_up = self.up
        self._disconnected()
        self._ready(False, f"connection lost: {exc!r}")
        if was_up:
            self.log.warning(f"{self.role}.disconnected", error=repr(exc))
        else:
            self.log.debug(f"{self.role}.reconnect_failed", error=repr(exc))

    def _on_restored(self, _sender: object) -> None:
        self._connected()
        self._ready(True, f"reconnected to {safe_address(self.url)}")
        self.log.info(f"{self.role}.reconnected")

    def _connected(self) -> None:
        self.up = True

    def _disconnected(self) -> None:
        self.up = False
