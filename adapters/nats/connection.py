"""One NATS connection per inbound or outbound, and the loop that keeps it up.

The FIRST connect is ours: nats-py raises when no server answers, so we retry with capped exponential
backoff and jitter. Once connected, nats-py reconnects by itself (``reconnect_wait_s``, up to
``max_reconnect_attempts`` per outage), restoring subscriptions; its disconnected and reconnected
callbacks drive the component's health, and ``_restored`` lets a component redo what the server may have
lost (streams a restarted server without its store no longer has). A connection nats-py gives up on is
closed, and the loop starts again from a fresh connect.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from adapters.nats.config import NatsBrokerConfig, NatsStreamConfig
from mediator.core.health import Health
from mediator.core.tls import client_context

CLOSE_TIMEOUT_S = 5.0
SETUP_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class BrokerAccess:
    """A broker's config, its name, and the secrets read from the environment at build time."""

    name: str
    config: NatsBrokerConfig
    secrets: dict[str, str]
    ssl_context: ssl.SSLContext | None


# One TLS context per broker config, as the AMQP adapter keeps: held only while that config lives.
_CONTEXTS: weakref.WeakKeyDictionary[NatsBrokerConfig, ssl.SSLContext] = weakref.WeakKeyDictionary()


def broker_access(name: str, cfg: NatsBrokerConfig) -> BrokerAccess:
    """Raises ConfigError when a secret's variable is unset or a TLS file cannot be read."""
    context: ssl.SSLContext | None = None
    if cfg.tls is not None:
        context = _CONTEXTS.get(cfg)
        if context is None:
            context = _CONTEXTS[cfg] = client_context(f"brokers.{name}.tls", cfg.tls)
    return BrokerAccess(name=name, config=cfg, secrets=cfg.secrets(name), ssl_context=context)


def safe_servers(servers: tuple[str, ...]) -> str:
    """host:port of each server, never credentials."""
    out = []
    for url in servers:
        parts = urlsplit(url)
        out.append(f"{parts.hostname}:{parts.port or 4222}")
    return ",".join(out)


def stream_config(stream: NatsStreamConfig) -> StreamConfig:
    return StreamConfig(
        name=stream.name,
        subjects=list(stream.subjects),
        storage=StorageType.MEMORY if stream.storage == "memory" else StorageType.FILE,
        num_replicas=stream.replicas,
        max_age=stream.max_age_s,
        max_bytes=stream.max_bytes,
        duplicate_window=stream.duplicate_window_s,
    )


async def declare_streams(js: JetStreamContext, streams: tuple[NatsStreamConfig, ...]) -> None:
    """Create each stream, or update it to the config when it exists with another one."""
    for stream in streams:
        config = stream_config(stream)
        try:
            await js.add_stream(config)
        except BadRequestError:  # exists with another configuration
            await js.update_stream(config)


async def stream_exists(js: JetStreamContext, name: str) -> bool:
    try:
        await js.stream_info(name)
    except NotFoundError:
        return False
    return True


class Backoff:
    """Capped exponential backoff with jitter (each delay drawn from [d/2, d])."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s, self._attempt = initial_s, max_s, 0

    def next(self) -> float:
        delay = min(self.max_s, self.initial_s * (2.0 ** min(self._attempt, 32)))
        self._attempt += 1
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self._attempt = 0


class NatsLink(ABC):
    """A ``Service`` owning one NATS connection: connects (with backoff), sets up what it needs through
    ``_setup``, runs ``_serve`` while connected, reports health, and closes everything when cancelled."""

    role: str  # "inbound" or "outbound": log event names and the health component

    def __init__(self, admin_name: str, broker: BrokerAccess, health: Health) -> None:
        self.admin_name = admin_name
        self.component = f"{self.role}:{admin_name}"
        self.name = self.component  # Service.name
        self.broker = broker
        self.health = health
        self.nc: Client | None = None
        self.up = False
        self.address = safe_servers(broker.config.servers)
        self.log: Any = structlog.get_logger(__name__).bind(**{self.role: admin_name}, protocol="nats")
        self._closed: asyncio.Event = asyncio.Event()
        health.register(self.component)

    @abstractmethod
    async def _setup(self, nc: Client) -> None:
        """Subscribe and declare what this component needs; raises to retry the connect."""

    async def _serve(self, nc: Client) -> None:
        """Run while connected (an inbound's fetch loop); returns or raises to reconnect. By default it
        waits for the connection to close for good."""
        await self._closed.wait()

    async def _restored(self, nc: Client) -> None:  # noqa: B027  # a hook with a default
        """After nats-py reconnected: redo what the server may have lost. Default: nothing."""

    def _ready(self, ready: bool, detail: str) -> None:
        self.up = ready
        self.health.set(self.component, ready, detail)

    async def _connect(self) -> Client:
        cfg = self.broker.config

        async def disconnected() -> None:
            if self.up:
                self.log.warning(f"{self.role}.disconnected", broker=self.address)
            self._ready(False, f"connection to {self.address} lost; reconnecting")

        async def reconnected() -> None:
            nc = self.nc
            try:
                if nc is not None:
                    await self._restored(nc)
            except Exception as exc:
                self.log.warning(f"{self.role}.restore_failed", error=repr(exc))
                self._ready(False, f"reconnected to {self.address} but cannot set up: {exc!r}")
                return
            self.log.info(f"{self.role}.reconnected", broker=self.address)
            self._ready(True, f"reconnected to {self.address}")

        async def closed() -> None:
            self._closed.set()

        async def error(exc: Exception) -> None:
            self.log.debug(f"{self.role}.client_error", error=repr(exc))

        options: dict[str, Any] = dict(self.broker.secrets)
        if cfg.user is not None:
            options["user"] = cfg.user
        if cfg.credentials_file is not None:
            options["user_credentials"] = cfg.credentials_file
        if self.broker.ssl_context is not None:
            options["tls"] = self.broker.ssl_context
            if cfg.tls is not None and cfg.tls.server_hostname:
                options["tls_hostname"] = cfg.tls.server_hostname
        self._closed = asyncio.Event()
        return await nats.connect(
            servers=list(cfg.servers),
            name=f"{cfg.name} {self.component}",
            connect_timeout=cfg.connect_timeout_s,
            reconnect_time_wait=cfg.reconnect_wait_s,
            max_reconnect_attempts=cfg.max_reconnect_attempts,
            ping_interval=cfg.ping_interval_s,
            max_outstanding_pings=cfg.max_outstanding_pings,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            closed_cb=closed,
            error_cb=error,
            **options,
        )

    async def run(self) -> None:
        cfg = self.broker.config
        backoff = Backoff(cfg.reconnect_wait_s, max(BACKOFF_MAX_S, cfg.reconnect_wait_s))
        try:
            while True:
                self._ready(False, f"connecting to {self.address}")
                nc: Client | None = None
                try:
                    async with asyncio.timeout(cfg.connect_timeout_s * max(1, len(cfg.servers)) + 1.0):
                        nc = self.nc = await self._connect()
                    async with asyncio.timeout(SETUP_TIMEOUT_S):
                        await self._setup(nc)
                except BaseException as exc:
                    if nc is not None:
                        await self._close(nc)
                    if not isinstance(exc, Exception):
                        raise  # cancelled: stop, with nothing left open
                    delay = backoff.next()
                    self._ready(False, f"cannot connect to {self.address}: {exc!r}")
                    self.log.warning(
                        f"{self.role}.connect_failed", broker=self.address, error=repr(exc), retry_in_s=round(delay, 3)
                    )
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                self.log.info(f"{self.role}.connected", broker=self.address)
                if nc.is_connected:
                    self._ready(True, f"connected to {self.address}")
                try:
                    await self._serve(nc)
                except Exception as exc:
                    self.log.warning(f"{self.role}.serve_failed", error=repr(exc))
                    await asyncio.sleep(backoff.next())
                finally:
                    self.up = False
                    await self._close(nc)
                self.log.warning(f"{self.role}.closed", broker=self.address)
        finally:
            self.nc = None
            self._ready(False, "stopped")

    async def _close(self, nc: Client) -> None:
        self.nc = None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await nc.close()
        except Exception as exc:
            self.log.debug("connection.close_failed", error=repr(exc))
