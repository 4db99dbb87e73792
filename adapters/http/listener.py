"""One aiohttp server per ``[listeners.X]`` section: the inbound POST routes plus /healthz and /readyz."""

from __future__ import annotations

import asyncio
import hmac
import json

import structlog
from aiohttp import web

from adapters.http.config import HttpListenerConfig
from adapters.http.inbound import HttpInbound
from mediator.core.health import Health
from mediator.core.seams import Admin

# Bounded grace for in-flight requests when the listener stops (the daemon's drain happens before).
SHUTDOWN_GRACE_S = 5.0
# After a refusal that leaves part of the body unread, aiohttp reads and discards the rest for this long
# before closing (so the client sees the answer rather than a reset); its default of 10 s is generous.
LINGER_S = 2.0

_HEALTHZ = b'{"status":"ok"}'


class HttpListener:
    """A ``Service``: serves until cancelled. A port that cannot be bound is a start-up error (raises)."""

    def __init__(
        self,
        name: str,
        cfg: HttpListenerConfig,
        inbounds: list[HttpInbound],
        health: Health,
        admin: Admin | None = None,
        admin_token: str | None = None,
    ) -> None:
        self.name = f"listener:{name}"
        self.cfg = cfg
        self.inbounds = inbounds
        self.health = health
        self.admin = admin if cfg.admin else None
        self._admin_auth = f"Bearer {admin_token}" if admin_token else None
        self.started = asyncio.Event()
        self.port: int | None = None  # the bound port once started (useful with port = 0)
        self._log = structlog.get_logger(__name__).bind(listener=name, protocol="http")

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self.admin is not None:
            app.router.add_get("/admin/dead-letters", self._dead_letters)
            app.router.add_post("/admin/dead-letters/replay", self._replay)
        for inbound in self.inbounds:
            # Only POST is routed, so aiohttp answers any other method on the path with 405 and Allow.
            app.router.add_post(inbound.path, inbound.handle, name=f"inbound:{inbound.name}")
        return app

    async def run(self) -> None:
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,  # per-request logging costs more than the request itself
            shutdown_timeout=SHUTDOWN_GRACE_S,
            lingering_time=LINGER_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(
                runner,
                self.cfg.host,
                self.cfg.port,
                backlog=self.cfg.backlog,
                reuse_port=self.cfg.reuse_port or None,
            )
            try:
                await site.start()
            except OSError as exc:
                self._log.error("listener.bind_failed", host=self.cfg.host, port=self.cfg.port, error=str(exc))
                raise
            self.port = site.port
            self.health.set(self.name, True, f"listening on {self.cfg.host}:{self.port}")
            self._log.info("listener.started", host=self.cfg.host, port=self.port, inbounds=len(self.inbounds))
            self.started.set()
            await asyncio.Future()  # serve until cancelled
        finally:
            self.health.set(self.name, False, "stopped")
            self.started.clear()
            try:
                # cleanup: stop accepting, close idle connections, wait up to the grace for handlers.
                async with asyncio.timeout(SHUTDOWN_GRACE_S + 1.0):
                    await runner.cleanup()
            except TimeoutError:
                self._log.warning("listener.stop_timed_out", grace_s=SHUTDOWN_GRACE_S)
            self._log.info("listener.stopped")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=_HEALTHZ, content_type="application/json")

    async def _readyz(self, request: web.Request) -> web.Response:
        body = json.dumps(self.health.snapshot()).encode("utf-8")
        return web.Response(status=200 if self.health.ready else 503, body=body, content_type="application/json")

    def _admin_refusal(self, request: web.Request) -> web.Response | None:
        if self._admin_auth is not None and not hmac.compare_digest(
            request.headers.get("Authorization", ""), self._admin_auth
        ):
            return web.json_response({"error": "unauthenticated"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _dead_letters(self, request: web.Request) -> web.Response:
        refusal = self._admin_refusal(request)
        if refusal is not None:
            return refusal
        assert self.admin is not None
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return web.json_response({"error": "invalid", "reason": "limit must be an integer"}, status=400)
        letters = await self.admin.dead_letters(max(1, min(limit, 10_000)))
        return web.json_response({"dead_letters": letters})

    async def _replay(self, request: web.Request) -> web.Response:
        refusal = self._admin_refusal(request)
        if refusal is not None:
            return refusal
        assert self.admin is not None
        ids: list[int] | None = None
        if request.can_read_body:
            try:
                body = await request.json()
                raw = body.get("ids") if isinstance(body, dict) else None
                if raw is not None:
                    ids = [int(i) for i in raw]
            except (ValueError, TypeError):
                return web.json_response(
                    {"error": "invalid", "reason": 'body must be {"ids": [integers]} or empty'}, status=400
                )
        replayed = await self.admin.replay(ids)
        return web.json_response({"replayed": replayed})
