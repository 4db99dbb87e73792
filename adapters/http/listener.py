"""One aiohttp server per ``[listeners.X]`` section: the inbound POST routes plus /healthz and /readyz.

The edge limits aiohttp leaves to us live here (DESIGN section 4: aiohttp has no header read timeout):
a connection handler (``_EdgeHandler``) that bounds the time a request head may take, answers header floods
431 instead of aiohttp's 400, and caps the connections of one listener; TLS (and mTLS) with certificates
reloaded on SIGHUP; CORS for browsers; and who may use the admin endpoints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, cast
from urllib.parse import unquote

import structlog
from aiohttp import hdrs, http_parser, web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_urldispatcher import AbstractRoute

from adapters.http import openapi
from adapters.http.admin import AdminApi, Caller
from adapters.http.config import CorsConfig, HttpListenerConfig
from adapters.http.dashboard import Dashboard
from adapters.http.inbound import (
    DEFAULT_CHALLENGE,
    DEFAULT_CREDENTIAL_HEADERS,
    STATUS_PATH,
    HttpInbound,
    error_response,
    make_origin,
    rejection_response,
)
from mediator.core.errors import RejectCode, Rejected
from mediator.core.health import Health
from mediator.core.seams import (
    LOOPBACK_HOSTS,
    Admin,
    HttpMount,
    MetricsEndpoint,
    MountRequest,
    Mounts,
    Sink,
    StatusReader,
    TlsConfig,
)

# Bounded grace for in-flight requests when the listener stops (the daemon's drain happens before).
SHUTDOWN_GRACE_S = 5.0
# After a refusal that leaves part of the body unread, aiohttp reads and discards the rest for this long
# before closing (so the client sees the answer rather than a reset); its default of 10 s is generous.
LINGER_S = 2.0
# The request line (method, target, version) has its own limit, distinct from ``max_header_bytes`` so that
# a too-long target is told apart from a too-long header field (414 rather than 431).
MAX_REQUEST_LINE_BYTES = 8192
# A refused connection is logged at most this often (a flood must not become a log flood).
REFUSAL_LOG_INTERVAL_S = 10.0

_HEALTHZ = b'{"status":"ok"}'


def _raw_response(status: str, error: str, reason: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 answer written straight to a transport, outside any request (no request was
    parsed, so aiohttp's response machinery has nothing to answer)."""
    body = json.dumps({"error": error, "reason": reason}).encode("utf-8")
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_BUSY = _raw_response("503 Service Unavailable", "not_ready", "too many connections", "Retry-After: 1\r\n")
_HEAD_TIMEOUT = _raw_response("408 Request Timeout", "timeout", "request head not received in time")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def route_error(exc: web.HTTPException, request: web.BaseRequest) -> web.Response:
    """The router's 404 or 405 in the daemon's JSON error shape (aiohttp's own is plain text); a 405
    keeps its Allow header (RFC 9110 15.5.6). Only requests no route serves come here."""
    path = request.rel_url.path
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = exc.headers.get(hdrs.ALLOW, "")
        reason = f"{request.method} is not allowed on {path} (allowed: {allow or 'none'})"
        return error_response(405, "method_not_allowed", reason, {hdrs.ALLOW: allow})
    if isinstance(exc, web.HTTPNotFound):
        return error_response(404, "not_found", f"nothing is served at {path}")
    return error_response(exc.status, "error", exc.reason)


class _EdgeServer(web.Server):
    """aiohttp's low-level server with our connection handler, and the count of open connections."""

    def __init__(self, handler: Handler, cfg: HttpListenerConfig, log: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = cfg.header_timeout_s
        self.max_header_bytes = cfg.max_header_bytes
        self.max_headers = cfg.max_headers
        self.max_connections = cfg.max_connections
        self.open = 0  # connections past connection_made and before connection_lost, refused ones excluded
        self.refused = 0  # connections refused over max_connections since start
        self.log = log
        self._refusal_logged = 0.0

    def __call__(self) -> _EdgeHandler:
        return _EdgeHandler(self, loop=self._loop, **self._kwargs)

    def refusing(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            self._refusal_logged = now
            self.log.warning("listener.connections_refused", open=self.open, refused=self.refused)


_parse = web_protocol.RequestHandler.data_received  # called directly: no super() lookup per segment


class _EdgeHandler(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol with the edge limits.

    Head timeout: a request head (request line and headers) must be complete within ``header_timeout_s``
    of its first byte. A head is starting when bytes arrive while no head is pending and the previous
    request's body (if any) has been received in full; it is complete once aiohttp's parser queued its
    message. One timer per connection at most: it is armed lazily and, when it fires early (a later head
    moved the deadline), re-armed for the pending deadline, so a keep-alive connection serving many requests
    does not create and cancel a timer per request. A head that starts within the same segment as the end
    of the previous request's body is only noticed at its next segment (we cannot see into the C parser's
    buffer), which delays the deadline by at most that gap.

    Connection cap: beyond ``max_connections`` a new connection is answered 503 with ``Retry-After: 1``
    at once, without parsing anything, and closed. A client that already wrote its request may see a reset
    instead of the answer (the unread request is discarded by the kernel); either way it is refused quickly
    and holds nothing.
    """

    __slots__ = ("_close_waiters", "_edge", "_head_deadline", "_head_timer", "_last_payload", "_refused")

    def __init__(self, manager: _EdgeServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        max_headers = manager.max_headers
        if getattr(web_protocol, "HttpRequestParser", None) is http_parser.HttpRequestParserPy:
            # The pure-Python parser (AIOHTTP_NO_EXTENSIONS) counts the request line and the empty line that
            # ends the head among its "headers"; the C parser counts header fields only. Both then allow
            # exactly ``max_headers`` header fields (tested with each parser).
            max_headers += 2
        super().__init__(
            manager,
            loop=loop,
            max_line_size=MAX_REQUEST_LINE_BYTES,
            max_field_size=manager.max_header_bytes,
            max_headers=max_headers,
            **kwargs,
        )
        self._edge = manager
        self._head_deadline = 0.0  # 0: no request head pending
        self._head_timer: asyncio.TimerHandle | None = None
        self._last_payload: StreamReader | None = None
        self._refused = False
        self._close_waiters: list[asyncio.Future[None]] | None = None

    def disconnected(self) -> asyncio.Future[None]:
        """A future resolved when this connection is lost (a streamed answer's way to notice a client that
        went away without writing to it; a publish waiting for delivery stops waiting then). A caller done
        with it cancels it: the ones already done are dropped here, so a keep-alive connection that asks
        again and again holds only the live ones."""
        future: asyncio.Future[None] = self._loop.create_future()
        if self.transport is None:
            future.set_result(None)
        else:
            if self._close_waiters is None:
                self._close_waiters = []
            elif len(self._close_waiters) >= 8:
                self._close_waiters = [f for f in self._close_waiters if not f.done()]
            self._close_waiters.append(future)
        return future

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        edge = self._edge
        if edge.open >= edge.max_connections:
            self._refused = True
            edge.refusing()
            writer = cast(asyncio.Transport, transport)  # a stream transport (TCP or TLS; asyncio's or uvloop's)
            writer.write(_BUSY)
            writer.close()
            return
        edge.open += 1
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._edge.open -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        waiters, self._close_waiters = self._close_waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline or self._force_close or self._close:
            starting = False
        else:
            last = self._last_payload
            starting = last is None or last.is_eof()
        messages = self._messages
        queued = len(messages)
        _parse(self, data)
        if len(messages) > queued:
            self._head_deadline = 0.0
            self._last_payload = messages[-1][1]
        elif starting and data:
            loop = self._loop
            self._head_deadline = deadline = loop.time() + self._edge.header_timeout_s
            if self._head_timer is None:
                self._head_timer = loop.call_at(deadline, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if not deadline or self.transport is None:
            return
        loop = self._loop
        if loop.time() < deadline:
            self._head_timer = loop.call_at(deadline, self._head_timed_out)
            return
        self._edge.log.debug("request.head_timed_out", peer=self.peername, timeout_s=self._edge.header_timeout_s)
        if not self._request_in_progress:
            # RFC 9110 15.5.9: a server may send 408 on an idle connection it is about to close.
            self.transport.write(_HEAD_TIMEOUT)
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp answers every parser error 400; a header field or count over its limit is 431 (RFC 6585),
        a request target over its limit 414. Both parsers (C llhttp and pure Python) raise ``LineTooLong``
        with the limit it hit for a long line, and ``BadHttpMessage("Too many headers received")`` for a
        count. The reason never quotes the header: it may be a credential."""
        if status == 400 and isinstance(exc, BadHttpMessage):
            response: web.Response | None = None
            if isinstance(exc, LineTooLong):
                limit = exc.args[1] if len(exc.args) > 1 else None
                if limit == MAX_REQUEST_LINE_BYTES and limit != self._edge.max_header_bytes:
                    response = error_response(
                        414, "uri_too_long", f"the request line exceeds {MAX_REQUEST_LINE_BYTES} bytes"
                    )
                else:
                    response = error_response(
                        431, "headers_too_large", f"a header field exceeds {self._edge.max_header_bytes} bytes"
                    )
            elif "Too many headers" in exc.message:
                response = error_response(431, "headers_too_large", f"more than {self._edge.max_headers} header fields")
            if response is not None:
                self._edge.log.debug("request.headers_refused", peer=self.peername, status=response.status)
                response.force_close()
                return response
        return super().handle_error(request, status, exc, message)


def _same_origin(origin: str, host: str | None, tls: bool) -> bool:
    """True when ``origin`` (RFC 6454 serialisation) is this listener as the client addressed it."""
    if host is None:
        return False
    scheme = "https" if tls else "http"
    default = ":443" if tls else ":80"
    return origin in (f"{scheme}://{host}", f"{scheme}://{host.removesuffix(default)}")


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server-side context from the files named in ``tls``; reads them (a few KiB), so call it off the
    loop once serving. Raises ``OSError`` (missing file) or ``ssl.SSLError`` (bad PEM, key not matching)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
    ctx.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}[
        tls.client_cert
    ]
    return ctx


class _Cors:
    """The CORS protocol (Fetch standard, section 3.2) for one listener's inbounds, headers precomputed."""

    def __init__(self, cfg: CorsConfig) -> None:
        self.any = "*" in cfg.allow_origins  # the validator refuses "*" with credentials
        self.origins = frozenset(cfg.allow_origins)
        self.methods = frozenset(cfg.allow_methods)
        self.headers = frozenset(h.lower() for h in cfg.allow_headers)
        common: dict[str, str] = {}
        if cfg.allow_credentials:
            common[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        self.actual = dict(common)
        if cfg.expose_headers:
            self.actual[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(cfg.expose_headers)
        self.preflight = dict(common)
        self.preflight[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ", ".join(cfg.allow_methods)
        if cfg.allow_headers:
            self.preflight[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(cfg.allow_headers)
        if cfg.max_age_s is not None:
            self.preflight[hdrs.ACCESS_CONTROL_MAX_AGE] = str(cfg.max_age_s)

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def _allow_origin(self, response: web.StreamResponse, origin: str) -> None:
        if self.any:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"
        else:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` with the CORS headers on its answers (202 and refusals alike) to allowed origins."""

        async def with_cors(request: web.BaseRequest) -> web.StreamResponse:
            response = await handler(request)
            origin = request.headers.get(hdrs.ORIGIN)
            if not self.any:
                # The answer depends on Origin whether or not this one is allowed: caches must key on it.
                response.headers.add(hdrs.VARY, hdrs.ORIGIN)
            if origin is not None and self.allowed(origin):
                self._allow_origin(response, origin)
                response.headers.update(self.actual)
            return response

        return with_cors

    def headers_for(self, origin: str | None) -> dict[str, str]:
        """The CORS headers of a streamed answer (which must carry them before it starts) to ``origin``."""
        out: dict[str, str] = {} if self.any else {hdrs.VARY: hdrs.ORIGIN}
        if origin is not None and self.allowed(origin):
            out[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*" if self.any else origin
            out.update(self.actual)
        return out

    def answer_preflight(self, request: web.BaseRequest) -> web.Response:
        headers = request.headers
        origin = headers.get(hdrs.ORIGIN)
        if not self.allowed(origin):
            return error_response(403, "forbidden", "origin not allowed")
        assert origin is not None
        method = headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD, "").strip()
        if method not in self.methods:
            return error_response(403, "forbidden", f"method {method!r} not allowed")
        asked = headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        refused = [h for h in (p.strip().lower() for p in asked.split(",")) if h and h not in self.headers]
        if refused:
            return error_response(403, "forbidden", f"headers not allowed: {', '.join(refused)}")
        response = web.Response(status=204, headers=self.preflight)
        self._allow_origin(response, origin)
        if not self.any:
            response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        return response


def _status_problem(event_id: str, expired: bool, status: StatusReader) -> web.Response:
    """404 as RFC 9457 problem details: the status of ``event_id`` expired, or was never known here."""
    if expired:
        kept = f" (kept {status.window_s:g} s after delivery)"
        title, detail, code = "Status expired", f"the delivery status of event {event_id!r} expired{kept}", "expired"
    else:
        title = "Unknown event"
        detail = f"no event {event_id!r} is known here (never accepted, or its status expired long ago)"
        code = "not_found"
    problem = {
        "type": f"urn:mediator:problem:{code}",
        "title": title,
        "status": 404,
        "detail": detail,
        "error": code,
        "reason": detail,
    }
    return web.json_response(problem, status=404, content_type="application/problem+json")


class HttpListener:
    """A ``Service``: serves until cancelled. A port that cannot be bound, or TLS files that cannot be
    loaded, are start-up errors (raise)."""

    def __init__(
        self,
        name: str,
        cfg: HttpListenerConfig,
        inbounds: list[HttpInbound],
        health: Health,
        admin: Admin | None = None,
        admin_token: str | None = None,
        *,
        sink: Sink | None = None,
        admin_roles: Collection[str] = frozenset({"admin"}),
        credential_headers: Collection[str] = DEFAULT_CREDENTIAL_HEADERS,
        metrics: MetricsEndpoint | None = None,
        status: StatusReader | None = None,
        mounts: Mounts | None = None,
    ) -> None:
        self.name = f"listener:{name}"
        self.status = status  # GET /events/{id}/status (a worker of workers = N swaps in its fleet's)
        self._sink = sink
        self._short_name = name
        self._mounts = mounts if mounts is not None else Mounts()
        self.max_streams = cfg.max_subscribers or max(1, cfg.max_connections * 3 // 4)
        self.streams = 0  # requests a mount (a push outbound, a WebSocket inbound) is answering now
        self.streams_refused = 0  # refused over max_streams since start
        self.cfg = cfg
        self.metrics = metrics
        self.inbounds = inbounds
        self.health = health
        self.admin = admin if cfg.admin else None
        self._admin_api: AdminApi | None = None
        self._admin_auth = f"Bearer {admin_token}".encode() if admin_token else None
        # Admin by principal only when the listener authenticates; otherwise today's rules (token, loopback).
        self._admin_sink = sink if cfg.auth else None
        self._admin_roles = frozenset(admin_roles)
        self._credential_names = tuple(sorted({n.lower() for n in credential_headers}))
        self.started = asyncio.Event()
        self.port: int | None = None  # the bound port once started (useful with port = 0)
        self._log = structlog.get_logger(__name__).bind(listener=name, protocol="http")
        self._router = web.UrlDispatcher()  # the Application's, once running
        self._fast: dict[tuple[str, str], Handler] = {}
        self._inbound_routes: set[AbstractRoute] = set()  # the POST routes of the inbounds (CORS preflights)
        self._cors = _Cors(cfg.cors) if cfg.cors is not None else None
        self._server: _EdgeServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls_current: ssl.SSLContext | None = None  # what new handshakes use (swapped on reload)
        self._reloads: set[asyncio.Task[bool]] = set()
        self.last_reload: asyncio.Task[bool] | None = None  # the latest TLS reload, for whoever waits on it

    @property
    def open_connections(self) -> int:
        return self._server.open if self._server is not None else 0

    def _inbound_handler(self, inbound: HttpInbound) -> Handler:
        return self._cors.wrap(inbound.handle) if self._cors is not None else inbound.handle

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self.cfg.openapi:
            app.router.add_get(openapi.OPENAPI_PATH, self._openapi)
        if self.metrics is not None:
            app.router.add_get(self.metrics.path, self._metrics)
        if self.admin is not None:
            api = self._admin_api = AdminApi(
                self.admin, self._admin_caller, self.health, secure=self.cfg.tls is not None
            )
            api.add_routes(app.router)
            Dashboard(api).add_routes(app.router)
            # The event store and replays (mediator/history/): the admin's history answers, this only routes.
            for path in ("/admin/events", "/admin/events/{id}", "/admin/replays", "/admin/replays/{id}"):
                app.router.add_get(path, self._history)
            app.router.add_post("/admin/replays", self._history)
            app.router.add_delete("/admin/replays/{id}", self._history)
        if self.status is not None:
            app.router.add_get(STATUS_PATH, self._event_status)
        for inbound in self.inbounds:
            # Only POST is routed, so aiohttp answers any other method on the path with 405 and Allow.
            # No route name: aiohttp refuses one with a Python keyword (an inbound named "in" or "class").
            self._inbound_routes.add(app.router.add_post(inbound.path, self._inbound_handler(inbound)))
            if inbound.handshake is not None:  # CloudEvents webhook abuse protection (a CORS preflight goes first)
                app.router.add_route(hdrs.METH_OPTIONS, inbound.path, inbound.answer_handshake)
        return app

    def fast_routes(self) -> dict[tuple[str, str], Handler]:
        """(method, path) -> handler for the routes without variables: what ``_dispatch`` serves directly."""
        table: dict[tuple[str, str], Handler] = {("GET", "/healthz"): self._healthz, ("GET", "/readyz"): self._readyz}
        for inbound in self.inbounds:
            if "{" not in inbound.path:
                table["POST", inbound.path] = self._inbound_handler(inbound)
        return table

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's low-level server hands every request here.

        A request for a route without variables (and without an Expect header) goes straight to its
        handler: a dict lookup instead of the Application's router, match info, web.Request and middleware
        chain (the listener and an inbound with a sink that accepts at once, under wrk: 97 -> 79 us of CPU
        per request). Everything else is resolved by the Application's router as before: templated paths,
        404, 405 with Allow, HEAD, admin routes, ``Expect: 100-continue``, CORS preflights. aiohttp resolves
        the most explicit path first, so an exact path wins over a template either way.
        """
        handler = self._fast.get((request.method, request.rel_url.path_safe))
        if handler is not None and hdrs.EXPECT not in request.headers:
            return await handler(request)
        mount = self._mounts.find(self._short_name, request.rel_url.path)
        if mount is not None:
            return await self._mounted(mount, request)
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            preflight = await self._preflight(request)
            if preflight is not None:
                return preflight
        match = await self._router.resolve(request)  # type: ignore[arg-type]  # reads path and method only
        if match.http_exception is not None:
            return route_error(match.http_exception, request)
        if request.headers.get(hdrs.EXPECT):
            early = await match.expect_handler(request)  # type: ignore[arg-type]
            await request.writer.drain()
            if early is not None:
                return early
        response: web.StreamResponse = await match.handler(request)  # type: ignore[arg-type]
        return response

    async def _mounted(self, mount: HttpMount, request: web.BaseRequest) -> web.StreamResponse:
        """A request for a path another adapter serves here (a push outbound's subscriptions): the
        listener's part is what it knows and the mount does not: who is calling (its credential headers,
        the client certificate, a token in the query where ``query_token`` allows it), CORS, and whether
        the page's ``Origin`` may use this listener."""
        headers = request.headers
        origin_header = headers.get(hdrs.ORIGIN)
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in headers:
            if self._cors is None:
                return error_response(403, "forbidden", "cross-origin requests are not enabled on this listener")
            return self._cors.answer_preflight(request)
        tls = self.cfg.tls is not None
        origin = make_origin(request, self.name, self._credential_names, tls)
        token_name = self.cfg.query_token
        if token_name is not None and token_name in request.rel_url.query:
            if not tls and (request.remote or "") not in LOOPBACK_HOSTS:
                # The token would have crossed the network in the clear (and may sit in a proxy's log).
                return error_response(
                    400, "invalid", f"a token in the {token_name!r} query parameter needs TLS off loopback"
                )
            token = request.rel_url.query[token_name]
            origin.credentials = (*origin.credentials, ("authorization", f"Bearer {token}"))
        cors = self._cors.headers_for(origin_header) if self._cors is not None else {}
        allowed = (
            origin_header is None
            or _same_origin(origin_header, headers.get(hdrs.HOST), tls)
            or (self._cors is not None and self._cors.allowed(origin_header))
        )
        protocol = request.protocol
        if isinstance(protocol, _EdgeHandler):
            disconnected = protocol.disconnected()
        else:  # not served by our server (a test's own): never resolved
            disconnected = asyncio.get_running_loop().create_future()
        if self.streams >= self.max_streams:
            # Every mounted request counts while it is answered: a subscription for as long as it is open, a
            # refusal for the moment it takes. Refused here, before any upgrade, so a WebSocket client sees
            # the 503 of its handshake.
            self.streams_refused += 1
            return error_response(
                503,
                "not_ready",
                f"listener {self._short_name!r} has its {self.max_streams} subscribers (max_subscribers)",
                {"Retry-After": "1", **cors},
            )
        call = MountRequest(request, origin, self._short_name, bool(self.cfg.auth), cors, allowed, disconnected)
        self.streams += 1
        try:
            response: web.StreamResponse = await mount.handle(call)
        finally:
            self.streams -= 1
            if not disconnected.done():
                disconnected.cancel()
        return response

    async def _preflight(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """The answer to a CORS preflight for an inbound's path; None for any other path (the router
        answers it: 404 or 405)."""
        match = await self._router.resolve(request.clone(method=hdrs.METH_POST))  # type: ignore[arg-type]
        if match.http_exception is not None or match.route not in self._inbound_routes:
            return None
        if self._cors is None:
            return error_response(403, "forbidden", "cross-origin requests are not enabled on this listener")
        return self._cors.answer_preflight(request)

    async def run(self) -> None:
        app = self.make_app()
        self._router = app.router
        self._fast = self.fast_routes()
        loop = asyncio.get_running_loop()
        ssl_context: ssl.SSLContext | None = None
        if self.cfg.tls is not None:
            try:
                ssl_context = server_context(self.cfg.tls)  # start-up: reading a few KiB on the loop is fine
            except (OSError, ssl.SSLError) as exc:
                self._log.error("listener.tls_failed", error=str(exc))
                raise
            self._tls_current = ssl_context
            # New handshakes switch to the latest context here (reload swaps it); established connections
            # keep the SSL object, and so the certificate, they started with. OpenSSL calls the server
            # name callback for every ClientHello, with None when the client sent no SNI.
            ssl_context.sni_callback = self._pick_context
        server = _EdgeServer(
            self._dispatch,
            self.cfg,
            self._log,
            access_log=None,  # per-request logging costs more than the request itself
            lingering_time=LINGER_S,
            keepalive_timeout=self.cfg.keepalive_timeout_s,
        )
        self._server = server
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        listening: asyncio.Server | None = None
        try:
            try:
                # loop.create_server rather than aiohttp's TCPSite, which cannot bound the TLS handshake:
                # asyncio's default is 60 s, a slowloris of its own for connections not yet counted.
                listening = await loop.create_server(
                    server,
                    self.cfg.host,
                    self.cfg.port,
                    backlog=self.cfg.backlog,
                    reuse_port=self.cfg.reuse_port or None,
                    ssl=ssl_context,
                    ssl_handshake_timeout=self.cfg.header_timeout_s if ssl_context is not None else None,
                )
            except OSError as exc:
                self._log.error("listener.bind_failed", host=self.cfg.host, port=self.cfg.port, error=str(exc))
                raise
            self.port = listening.sockets[0].getsockname()[1]
            scheme = "https" if ssl_context is not None else "http"
            self.health.set(self.name, True, f"listening on {scheme}://{self.cfg.host}:{self.port}")
            for inbound in self.inbounds:  # served by this listener's routes: ready exactly when it is
                url = f"{scheme}://{self.cfg.host}:{self.port}{inbound.path}"
                self.health.set(f"inbound:{inbound.name}", True, f"serving {url} on {self.name}")
            self._log.info(
                "listener.started", host=self.cfg.host, port=self.port, inbounds=len(self.inbounds), scheme=scheme
            )
            self._loop = loop  # from now on, reload_tls has a loop to run on
            self.started.set()
            await asyncio.Future()  # serve until cancelled
        finally:
            self.health.set(self.name, False, "stopped")
            for inbound in self.inbounds:
                self.health.set(f"inbound:{inbound.name}", False, f"{self.name} stopped")
            self.started.clear()
            for task in self._reloads:
                task.cancel()
            self._loop = None
            if self._admin_api is not None:
                self._admin_api.close_streams()  # an open dashboard never holds the stop
            if listening is not None:
                listening.close()  # stop accepting; runner.cleanup then closes the connections
            try:
                # cleanup: close idle connections, wait up to the grace for handlers.
                async with asyncio.timeout(SHUTDOWN_GRACE_S + 1.0):
                    await runner.cleanup()
            except TimeoutError:
                self._log.warning("listener.stop_timed_out", grace_s=SHUTDOWN_GRACE_S)
            self._log.info("listener.stopped")

    # ---------------------------------------------------------------- TLS reload

    def _pick_context(self, conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._tls_current
        if current is not None and current is not ctx:
            conn.context = current

    def reload_tls(self) -> None:
        """The SIGHUP hook (``Runtime.reload_hooks``): re-read the certificate, key and client CA.

        Returns at once. The files are read in a worker thread into a new context, which new handshakes
        then use; a fresh context rather than ``load_cert_chain`` on the live one, because OpenSSL installs
        a new certificate before it checks the key, so a half-replaced pair (new certificate, missing or old
        key) would leave the live context without a usable key. A failure is logged (``tls.reload_failed``)
        and the old certificate keeps serving. A no-op when the listener is not serving TLS.
        """
        loop = self._loop
        if loop is None or self.cfg.tls is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._start_reload()
        else:
            loop.call_soon_threadsafe(self._start_reload)

    def _start_reload(self) -> None:
        task = asyncio.create_task(self._reload_tls(), name=f"{self.name}:tls-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        self.last_reload = task

    async def _reload_tls(self) -> bool:
        tls = self.cfg.tls
        assert tls is not None
        try:
            ctx = await asyncio.to_thread(server_context, tls)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._log.error("tls.reload_failed", cert_file=tls.cert_file, error=str(exc))
            return False
        self._tls_current = ctx
        self._log.info("tls.reloaded", cert_file=tls.cert_file)
        return True

    # ---------------------------------------------------------------- health and admin

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=_HEALTHZ, content_type="application/json")

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        body = json.dumps(self.health.snapshot()).encode("utf-8")
        return web.Response(status=200 if self.health.ready else 503, body=body, content_type="application/json")

    def surface(self) -> openapi.Surface:
        """What this listener serves now, for its OpenAPI description."""
        return openapi.Surface(
            self._short_name,
            self.inbounds,
            admin=self.admin is not None,
            admin_token=self._admin_auth is not None,
            status=self.status is not None,
            metrics_path=self.metrics.path if self.metrics is not None else None,
            mounts=self._mounts.served(self._short_name),
            authenticated=bool(self.cfg.auth),
            credential_headers=self._credential_names,
            max_body_bytes=self.cfg.max_body_bytes,
        )

    async def _openapi(self, request: web.BaseRequest) -> web.Response:
        scheme = "https" if self.cfg.tls is not None else "http"
        return web.json_response(openapi.describe(self.surface(), f"{scheme}://{request.host}"))

    async def _admin_caller(self, request: web.BaseRequest, authorization: str | None = None) -> Caller | web.Response:
        """Who may use admin, or the refusal: the admin token's holder, or (when the listener authenticates)
        a principal with one of the admin roles; with neither configured, admin is open (the config only
        allows that on loopback). 401 without a valid credential, 403 for an authenticated principal
        without an admin role. ``authorization``: the credential to check instead of the request's
        ``Authorization`` header (the dashboard's session cookie, its login form)."""
        header = authorization if authorization is not None else request.headers.get(hdrs.AUTHORIZATION, "")
        if self._admin_auth is not None:
            given = header.encode("utf-8", "surrogateescape")
            if hmac.compare_digest(given, self._admin_auth):  # constant time: the token is a secret
                return Caller("admin-token")
        sink = self._admin_sink
        if sink is None:
            if self._admin_auth is None:
                return Caller(f"loopback {request.remote or ''}".rstrip())
            return error_response(401, "unauthenticated", "admin token required", {"WWW-Authenticate": "Bearer"})
        origin = make_origin(request, self.name, self._credential_names, self.cfg.tls is not None)
        if authorization is not None:
            others = tuple(c for c in origin.credentials if c[0] != "authorization")
            origin = dataclasses.replace(origin, credentials=(("authorization", authorization), *others))
        try:
            principal = await sink.authenticate(origin)
        except Rejected as exc:
            self._log.info("admin.refused", code=exc.code.value, rule=exc.rule, peer=origin.peer)
            return rejection_response(exc)
        if principal.anonymous:
            self._log.info("admin.refused", code=RejectCode.UNAUTHENTICATED.value, peer=origin.peer)
            return error_response(
                401, "unauthenticated", "admin needs an authenticated caller", {"WWW-Authenticate": DEFAULT_CHALLENGE}
            )
        if principal.roles & self._admin_roles:
            return Caller(principal.id, frozenset(principal.roles))
        self._log.info("admin.refused", code=RejectCode.FORBIDDEN.value, principal=principal.id, peer=origin.peer)
        return error_response(403, "forbidden", "admin needs one of the roles " + ", ".join(sorted(self._admin_roles)))

    async def _admin_refusal(self, request: web.BaseRequest) -> web.Response | None:
        caller = await self._admin_caller(request)
        return caller if isinstance(caller, web.Response) else None

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        """The Prometheus exposition; on a listener with ``auth``, for admins only unless ``public``."""
        metrics = self.metrics
        assert metrics is not None
        if self.cfg.auth and not metrics.public:
            refusal = await self._admin_refusal(request)
            if refusal is not None:
                return refusal
        return web.Response(body=metrics.render(), headers={hdrs.CONTENT_TYPE: metrics.content_type})

    async def _event_status(self, request: web.BaseRequest) -> web.Response:
        """An event's delivery status (``mediator/status.py``), for its publisher or an admin.

        The caller is authenticated by the authenticators of the inbound that took the event (those of
        this listener for an event not known here), so the credential that published it reads it: 401
        without one when that inbound authenticates, 403 for another principal (admins excepted: the admin
        token or an admin role). 404 with a problem body for an expired or unknown event."""
        status = self.status
        assert status is not None
        # From the raw path (the low-level dispatch has no match info); the id was percent-encoded in Location.
        event_id = unquote(request.rel_url.raw_path.removeprefix("/events/").removesuffix("/status"))
        found = await status.lookup(event_id)
        admin_token = self._admin_auth is not None and hmac.compare_digest(
            request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogateescape"), self._admin_auth
        )
        if not admin_token and self._sink is not None:
            inbound = found.inbound if found.found == "known" and found.inbound else self.name
            origin = make_origin(request, inbound, self._credential_names, self.cfg.tls is not None)
            try:
                principal = await self._sink.authenticate(origin)
            except Rejected as exc:
                return rejection_response(exc)
            owner = found.principal
            if owner and owner != principal.id and not principal.roles & self._admin_roles:
                if principal.anonymous:
                    return error_response(
                        401, "unauthenticated", "this event's status needs its publisher's credential",
                        {"WWW-Authenticate": DEFAULT_CHALLENGE},
                    )  # fmt: skip
                self._log.info("status.refused", principal=principal.id, event_id=event_id)
                return error_response(403, "forbidden", "only the event's publisher or an admin may read its status")
        if found.document is None:
            return _status_problem(event_id, found.found == "expired", status)
        return web.json_response(found.document)

    async def _history(self, request: web.BaseRequest) -> web.Response:
        """``/admin/events``, ``/admin/events/{id}``, ``/admin/replays``, ``/admin/replays/{id}``: answered
        by the admin's ``history`` (the id from the raw path: the low-level dispatch has no match info)."""
        refusal = await self._admin_refusal(request)
        if refusal is not None:
            return refusal
        assert self.admin is not None
        history = getattr(self.admin, "history", None)
        if history is None:
            return error_response(404, "not_found", "this daemon keeps no event history")
        head, _, rest = request.rel_url.raw_path.removeprefix("/admin/").partition("/")
        path = f"{head}/{unquote(rest)}" if rest else head
        body: object = None
        if request.method == hdrs.METH_POST and request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return error_response(400, "invalid", "the body must be JSON")
        status, doc = await history(request.method, path, dict(request.query), body)
        return web.json_response(doc, status=status)
