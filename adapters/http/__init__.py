"""HTTP adapter: aiohttp listeners (HTTP or HTTPS, optionally mTLS) with POST inbounds (plain or CloudEvents),
and webhook outbounds."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from adapters.http.config import CorsConfig, HttpInboundConfig, HttpListenerConfig, HttpOutboundConfig
from adapters.http.inbound import HttpInbound, paths_conflict
from adapters.http.listener import HttpListener
from adapters.http.outbound import HttpOutbound
from mediator.core import signatures
from mediator.core.errors import ConfigError
from mediator.core.seams import AdapterConfig, AdapterSpec, Built, Runtime

__all__ = [
    "ADAPTER",
    "CorsConfig",
    "HttpInbound",
    "HttpInboundConfig",
    "HttpListener",
    "HttpListenerConfig",
    "HttpOutbound",
    "HttpOutboundConfig",
    "build",
    "signing_keys",
]


@dataclass(slots=True)
class _OutboundSession:
    """The ``Service`` that owns a webhook outbound's client session."""

    name: str
    outbound: HttpOutbound

    async def run(self) -> None:
        await self.outbound.run()


def build(cfg: AdapterConfig, rt: Runtime) -> Built:
    built = Built()
    problems: list[str] = []
    listeners: dict[str, HttpListenerConfig] = {}
    for name, lcfg in cfg.listeners.items():
        if not isinstance(lcfg, HttpListenerConfig):
            raise TypeError(f"listeners.{name}: expected HttpListenerConfig, got {type(lcfg).__name__}")
        listeners[name] = lcfg
    by_listener: dict[str, list[HttpInbound]] = {name: [] for name in listeners}
    for name, icfg in cfg.inbounds.items():
        if not isinstance(icfg, HttpInboundConfig):
            raise TypeError(f"inbound.{name}: expected HttpInboundConfig, got {type(icfg).__name__}")
        target = listeners.get(icfg.listener)
        if target is None:
            problems.append(f"inbound.{name}.listener: no http listener named {icfg.listener!r}")
            continue
        by_listener[icfg.listener].append(
            HttpInbound(name, icfg, target, rt.sink, rt.credential_headers, rt.requests, status=rt.status)
        )
    for inbounds in by_listener.values():
        problems.extend(paths_conflict(inbounds))
    if problems:
        raise ConfigError("config", problems)
    for name, lcfg in listeners.items():
        token = None
        if lcfg.admin and lcfg.admin_token_env:
            token = os.environ.get(lcfg.admin_token_env)
            if not token:
                raise ConfigError(
                    "environment", [f"listeners.{name}.admin_token_env: variable {lcfg.admin_token_env} is not set"]
                )
        listener = HttpListener(
            name,
            lcfg,
            by_listener[name],
            rt.health,
            rt.admin,
            token,
            sink=rt.sink,
            admin_roles=rt.admin_roles,
            credential_headers=rt.credential_headers,
            metrics=rt.metrics if rt.metrics is not None and rt.metrics.listener in (None, name) else None,
            status=rt.status,
            mounts=rt.mounts,
        )
        rt.health.register(listener.name)
        for inbound in by_listener[name]:  # ready once the listener is bound (HttpListener.run)
            rt.health.register(f"inbound:{inbound.name}")
        if lcfg.tls is not None:
            rt.reload_hooks.append(listener.reload_tls)
        built.services.append(listener)
    for name, ocfg in cfg.outbounds.items():
        if not isinstance(ocfg, HttpOutboundConfig):
            raise TypeError(f"outbound.{name}: expected HttpOutboundConfig, got {type(ocfg).__name__}")
        outbound = HttpOutbound(
            name,
            ocfg,
            rt.health,
            signing_keys=signing_keys(name, ocfg),
            handshake_origin=ocfg.handshake_origin or socket.gethostname(),
        )
        rt.health.register(outbound.component)
        built.outbounds[name] = outbound
        built.services.append(_OutboundSession(outbound.component, outbound))
    return built


def signing_keys(name: str, cfg: HttpOutboundConfig) -> tuple[bytes, ...]:
    """The Standard Webhooks keys of ``sign.secrets_env``, in order; ConfigError("environment") for a
    variable that is not set or holds no such secret (its value never shown)."""
    if cfg.sign is None:
        return ()
    keys: list[bytes] = []
    problems: list[str] = []
    for var in cfg.sign.secrets_env:
        value = os.environ.get(var)
        at = f"outbound.{name}.sign.secrets_env ({var})"
        if not value:
            problems.append(f"{at}: variable {var} is not set")
            continue
        try:
            keys.append(signatures.decode_standard_secret(value))
        except ValueError as exc:
            problems.append(f"{at}: {exc}")
    if problems:
        raise ConfigError("environment", problems)
    return tuple(keys)


ADAPTER = AdapterSpec(
    kind="http",
    build=build,
    listener_model=HttpListenerConfig,
    inbound_model=HttpInboundConfig,
    outbound_model=HttpOutboundConfig,
)
