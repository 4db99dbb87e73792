"""Push adapter: SSE and WebSocket subscribers on an HTTP listener (``kind = "push"`` outbounds), fed from a
durable ring per outbound, and events published over a WebSocket (``kind = "websocket"`` inbounds).

Both attach to an HTTP listener through the daemon's ``Mounts`` (``mediator.core.seams``): the listener
extracts who is calling and applies CORS and the ``Origin`` check; this package decides the rest.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from adapters.push.config import PushOutboundConfig, SubscribeRuleConfig, WebSocketInboundConfig
from adapters.push.hub import Hub
from adapters.push.inbound import WebSocketInbound
from adapters.push.ring import Ring, ring_path
from adapters.push.stream import PushMount
from mediator.core.envelope import Envelope
from mediator.core.errors import ConfigError, RetryableDeliveryError, TerminalDeliveryError
from mediator.core.formats import FORMATS
from mediator.core.health import Health
from mediator.core.seams import AdapterConfig, AdapterSpec, Built, Mounts, Reports, Runtime

__all__ = [
    "ADAPTERS",
    "PushOutbound",
    "PushOutboundConfig",
    "SubscribeRuleConfig",
    "WebSocketInbound",
    "WebSocketInboundConfig",
    "build",
    "build_inbounds",
]

EXPIRE_INTERVAL_S = 1.0
"""How often the ring's age limit is applied while no event arrives (and, at most, between heartbeat ticks)."""

SUBSCRIBER_GRACE_S = 2.0
"""On stop: how long the subscribers' handlers get to say goodbye before the ring closes."""


class PushOutbound:
    """Confirms a delivery once the event is in the ring; the subscribers read the ring at their pace."""

    def __init__(self, name: str, cfg: PushOutboundConfig, ring: Ring) -> None:
        self.name = name
        self.max_in_flight = cfg.max_in_flight
        self._timeout_s = cfg.send_timeout_s
        self._ring = ring

    async def send(self, event: Envelope, address: str, format: str) -> None:
        """Append ``event`` (without provenance) to the ring at ``address``; returns once it is durable.
        Every format delivers the whole event (subscribers choose JSON or Protobuf). Raises
        ``TerminalDeliveryError`` for an empty address or an unknown format, ``RetryableDeliveryError``
        when the ring is not running, cannot write, or takes longer than ``send_timeout_s``."""
        if format not in FORMATS:
            raise TerminalDeliveryError(f"unknown format {format!r}")
        if not address:
            raise TerminalDeliveryError('a push destination needs an address (route: address = "orders")')
        if event.HasField("provenance"):
            copy = Envelope()
            copy.CopyFrom(event)  # the dispatcher may retry ``event``: never modify it
            copy.ClearField("provenance")
            event = copy
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._ring.append(event, address)
        except TimeoutError:
            raise RetryableDeliveryError(f"the push ring did not commit within {self._timeout_s} s") from None


class PushService:
    """Owns a push outbound's ring and its mount on the listener while it runs."""

    def __init__(self, name: str, cfg: PushOutboundConfig, ring: Ring, hub: Hub, mount: PushMount, rt: Runtime) -> None:
        self.name = f"outbound:{name}"
        self._cfg = cfg
        self._ring = ring
        self._hub = hub
        self._mount = mount
        self._mounts: Mounts = rt.mounts
        self._reports: Reports = rt.reports
        self._health: Health = rt.health
        self._log = structlog.get_logger(__name__).bind(outbound=name, protocol="push")

    async def run(self) -> None:
        cfg = self._cfg
        try:
            await self._ring.open()
        except OSError as exc:
            self._health.set(self.name, False, str(exc))
            self._log.error("push.ring_unusable", error=str(exc))
            raise
        try:
            self._mounts.add(cfg.listener, self._mount)
            self._reports.add(self.name, self._hub)
            self._health.set(self.name, True, f"serving {cfg.prefix}/ on listener {cfg.listener}")
            self._log.info("push.started", listener=cfg.listener, prefix=cfg.prefix, retained=len(self._ring.entries))
            tick = min(EXPIRE_INTERVAL_S, cfg.heartbeat_s / 2)
            last_expiry = asyncio.get_running_loop().time()
            while True:
                await asyncio.sleep(tick)
                self._hub.heartbeat(cfg.heartbeat_s)
                now = asyncio.get_running_loop().time()
                if now - last_expiry >= EXPIRE_INTERVAL_S:
                    last_expiry = now
                    await self._ring.expire()
        finally:
            self._health.set(self.name, False, "stopped")
            self._mounts.remove(cfg.listener, self._mount)
            self._hub.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUBSCRIBER_GRACE_S):
                    await self._hub.empty.wait()
            self._reports.remove(self.name, self._hub)
            await self._ring.close()


def build(cfg: AdapterConfig, rt: Runtime) -> Built:
    """A ``PushService`` and a ``PushOutbound`` per push outbound. Its listener (an http listener, checked
    by the config) serves the subscriptions once the service runs."""
    built = Built()
    served: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    for name, ocfg in cfg.outbounds.items():
        if not isinstance(ocfg, PushOutboundConfig):
            raise TypeError(f"outbound.{name}: expected PushOutboundConfig, got {type(ocfg).__name__}")
        other = served.setdefault((ocfg.listener, ocfg.prefix), name)
        if other != name:
            problems.append(
                f"outbound.{name}.prefix: push outbound {other!r} already serves {ocfg.prefix}/"
                f" on listener {ocfg.listener!r}"
            )
        path = ring_path(rt.outbox_path, name) if rt.outbox_path is not None else None
        ring = Ring(name, path, ocfg.max_events, ocfg.max_age_s)
        hub = Hub(name, ring, ocfg.max_subscribers, ocfg.max_subscribers_per_principal, ocfg.coalesce_ms / 1000)
        ring.on_append = hub.publish
        mount = PushMount(name, ocfg, hub, rt.sink)
        rt.health.register(f"outbound:{name}")
        built.outbounds[name] = PushOutbound(name, ocfg, ring)
        built.services.append(PushService(name, ocfg, ring, hub, mount, rt))
    if problems:
        raise ConfigError("config", problems)
    return built


def build_inbounds(cfg: AdapterConfig, rt: Runtime) -> Built:
    built = Built()
    served: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    for name, icfg in cfg.inbounds.items():
        if not isinstance(icfg, WebSocketInboundConfig):
            raise TypeError(f"inbound.{name}: expected WebSocketInboundConfig, got {type(icfg).__name__}")
        other = served.setdefault((icfg.listener, icfg.path), name)
        if other != name:
            problems.append(f"inbound.{name}.path: {other!r} already serves {icfg.path} on listener {icfg.listener!r}")
        rt.health.register(f"inbound:{name}")
        built.services.append(WebSocketInbound(name, icfg, rt))
    if problems:
        raise ConfigError("config", problems)
    return built


ADAPTERS = (
    AdapterSpec(kind="push", build=build, outbound_model=PushOutboundConfig),
    AdapterSpec(kind="websocket", build=build_inbounds, inbound_model=WebSocketInboundConfig),
)
