"""The registry's REST API on an HTTP listener, and the unit the daemon starts and stops.

The registry serves its paths (``/subjects``, ``/schemas``, ``/config``, ``/compatibility``, ``/mode``)
on the HTTP listener ``[registry] listener`` names, through the daemon's ``Mounts``, as a push outbound
serves ``/subscribe``: the listener keeps its edge limits, TLS and authenticators, and the registry
decides who may do what:

- the listener names authenticators (``auth``): every caller must authenticate; reading takes one of
  ``read_roles`` (any authenticated caller when empty) or a write role; registering, deleting and
  configuring take one of ``write_roles``. 401 / 403 with the registry's error body.
- no authenticators (a loopback listener, or ``allow_anonymous``): anyone may read, and only callers
  on a loopback address may write, as ``/admin`` is guarded today.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from mediator.core.errors import Rejected
from mediator.core.health import Health
from mediator.core.seams import LOOPBACK_HOSTS, MountRequest, Mounts, Sink
from mediator.schemaregistry.config import RegistryConfig
from mediator.schemaregistry.service import Raw, Registry
from mediator.schemaregistry.store import PostgresSchemaStore, SchemaStore, SqliteSchemaStore, StoreError

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
PREFIXES = ("/subjects", "/schemas", "/config", "/compatibility", "/mode")
_ACCEPTED = ("application/vnd.schemaregistry.v1+json", "application/vnd.schemaregistry+json", "application/json")
BODY_TIMEOUT_S = 10.0
COMPONENT = "registry"


def store_for(cfg: RegistryConfig, outbox_path: str | None, environ: dict[str, str]) -> SchemaStore:
    """The backend ``cfg`` names. Raises ValueError when the DSN's variable is not set."""
    if cfg.backend == "postgresql":
        assert cfg.dsn_env is not None  # the model insists
        dsn = environ.get(cfg.dsn_env)
        if not dsn:
            raise ValueError(f"registry.dsn_env: the environment variable {cfg.dsn_env!r} is not set")
        return PostgresSchemaStore(dsn)
    if cfg.path is not None:
        return SqliteSchemaStore(cfg.path)
    if outbox_path is None:
        return SqliteSchemaStore(":memory:")
    return SqliteSchemaStore(str(Path(outbox_path).with_name("registry.sqlite")))


def _answer(status: int, value: Any) -> web.Response:
    if isinstance(value, Raw):
        return web.Response(status=status, text=value.text, content_type=CONTENT_TYPE)
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return web.Response(status=status, text=body, content_type=CONTENT_TYPE)


def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = _answer(status, {"error_code": code, "message": message})
    response.headers.update(headers or {})
    return response


class _Mount:
    """One path prefix of the registry on its listener (``Mounts`` takes one prefix per mount)."""

    def __init__(self, server: RegistryServer, prefix: str) -> None:
        self.component = COMPONENT
        self.prefix = prefix
        self._server = server

    async def handle(self, call: MountRequest) -> Any:
        return await self._server.handle(call)


class RegistryServer:
    """The registry unit: opens its store, serves its paths on the listener while it runs (a ``Service``),
    closes the store when stopped."""

    name = "registry"

    def __init__(self, cfg: RegistryConfig, registry: Registry, mounts: Mounts, sink: Sink, health: Health) -> None:
        self.cfg = cfg
        self.registry = registry
        self._mounts = mounts
        self._sink = sink
        self._health = health
        self._read_roles = frozenset(cfg.read_roles)
        self._write_roles = frozenset(cfg.write_roles)
        self._served = [_Mount(self, p) for p in PREFIXES]

    async def open(self) -> None:
        """Open the store (creates its tables); raises ``StoreError``."""
        await self.registry.store.open()

    async def close(self) -> None:
        await self.registry.store.close()

    async def run(self) -> None:
        for mount in self._served:
            self._mounts.add(self.cfg.listener, mount)
        self._health.set(COMPONENT, True, f"serving on listener {self.cfg.listener!r}")
        log.info("registry.started", listener=self.cfg.listener, backend=self.cfg.backend)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            for mount in self._served:
                self._mounts.remove(self.cfg.listener, mount)

    async def _may_write(self, call: MountRequest) -> bool | web.Response:
        """Whether the caller may change the registry, or the refusal when it may not even read."""
        if not call.auth:
            return call.origin.peer in LOOPBACK_HOSTS
        try:
            principal = await self._sink.authenticate(call.origin)
        except Rejected as exc:
            log.info("registry.refused", code=exc.code.value, peer=call.origin.peer)
            return _error(401, 40101, f"Unauthorized: {exc.reason}", {"WWW-Authenticate": "Bearer"})
        if principal.anonymous:
            return _error(
                401, 40101, "Unauthorized: the registry needs an authenticated caller", {"WWW-Authenticate": "Bearer"}
            )
        writer = bool(principal.roles & self._write_roles)
        if not writer and self._read_roles and not principal.roles & self._read_roles:
            log.info("registry.refused", principal=principal.id, peer=call.origin.peer)
            return _error(
                403,
                40301,
                "Forbidden: reading the registry needs one of the roles " + ", ".join(sorted(self._read_roles)),
            )
        return writer

    async def handle(self, call: MountRequest) -> web.StreamResponse:
        request: web.BaseRequest = call.request
        may_write = await self._may_write(call)
        if isinstance(may_write, web.Response):
            return may_write
        body = b""
        if request.method in ("POST", "PUT"):
            media = request.content_type.lower()
            if request.can_read_body and media not in _ACCEPTED and media != "application/octet-stream":
                return _error(415, 415, f"HTTP 415 Unsupported Media Type: {media!r}")
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):
                    body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _error(413, 413, "HTTP 413 the request body is too large")
            except TimeoutError:
                return _error(408, 408, "HTTP 408 the request body did not arrive in time")
        status, value = await self.registry.handle(
            request.method, request.rel_url.path, dict(request.rel_url.query), body, may_write
        )
        if status == 403 and not may_write and not call.auth:
            value = {"error_code": 40301, "message": "Forbidden: off loopback, a registry without auth is read-only"}
        return _answer(status, value)


def base_url(cfg: RegistryConfig, listener: Any) -> str:
    """``url``, or the listener's (an HTTP listener config: ``host``, ``port``, ``tls``) scheme, host and port."""
    if cfg.url:
        return cfg.url
    host: str = listener.host
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if listener.tls is not None else 'http'}://{shown}:{listener.port}"


def make_registry(cfg: RegistryConfig, listener: Any, outbox_path: str | None) -> Registry:
    """The registry ``[registry]`` describes, served on ``listener`` (its typed HTTP listener config, for
    the base URL). Nothing is opened. Raises ValueError when the DSN's variable is not set."""
    import os

    store = store_for(cfg, outbox_path, dict(os.environ))
    url = base_url(cfg, listener)
    return Registry(store, cfg.compatibility, url, cfg.latest_ttl_s)


__all__ = ["RegistryServer", "StoreError", "base_url", "make_registry", "store_for"]
