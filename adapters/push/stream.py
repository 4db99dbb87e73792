"""Subscriptions at ``GET {prefix}/{address}``: Server-Sent Events or a WebSocket, fed from the ring.

SSE (WHATWG HTML, section 9.2 "Server-sent events"): ``retry:`` on connect, then one message per event
(``id:`` the cursor, ``event:`` the CloudEvent type, ``data:`` the event as CloudEvents structured JSON),
a comment line as heartbeat, and a comment before the stream ends when the server ends it. A reconnecting
``EventSource`` sends ``Last-Event-ID`` by itself; ``?lastEventId=`` and ``?after=`` do the same for
clients that cannot set headers.

WebSocket (RFC 6455, the CloudEvents WebSocket binding): subprotocol ``cloudevents.json`` (one structured
event per text frame) or ``cloudevents.proto`` (one CloudEvents Protobuf message per binary frame); no
subprotocol offered means ``cloudevents.json``. The cursor travels as the ``mediatorcursor`` extension
attribute; resume with ``?after=<cursor>``. Pings every ``heartbeat_s``; a peer that does not answer is
closed. Refusals after the upgrade are close codes: 1008 (not authenticated, not allowed, too slow), 1013
(too many subscribers), 1002 (no subprotocol we speak), 1003 (a data frame: this socket only delivers).

Everything that can be refused is refused before the stream starts: an SSE client gets the HTTP status
(401, 403, 404, 406, 503) and a JSON body; a ``WebSocket`` from a disallowed ``Origin`` gets 403 before
the upgrade (cross-site WebSocket hijacking), other refusals the close codes above.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import structlog
from aiohttp import WSMsgType, hdrs, web

from adapters.push.config import SUBPROTOCOLS, PushOutboundConfig, validate_address_pattern
from adapters.push.hub import DEFAULT_DENY, Hub, Subscriber, SubscribeRule, refusing_rule
from adapters.push.ring import Entry
from mediator.core.errors import RejectCode, Rejected
from mediator.core.seams import MountRequest, Sink

STATUS = {
    RejectCode.UNAUTHENTICATED: 401,
    RejectCode.FORBIDDEN: 403,
    RejectCode.RATE_LIMITED: 429,
}

# WebSocket close codes (RFC 6455 7.4.1; 1013 from the IANA registry).
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013

FAREWELL_TIMEOUT_S = 0.5
"""How long the last words (an SSE comment, a close frame) to a subscriber being cut off may take."""


def json_error(status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": error, "reason": reason}, ensure_ascii=False).encode("utf-8")
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class Refusal(Exception):
    """A subscription refused before its stream starts: the HTTP answer and the WebSocket close code."""

    def __init__(
        self, status: int, error: str, reason: str, close: int = CLOSE_POLICY, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.close = close
        self.headers = headers

    def response(self, cors: dict[str, str]) -> web.Response:
        return json_error(self.status, self.error, self.reason, {**cors, **(self.headers or {})})


def _cursor(request: web.BaseRequest) -> int | None:
    """The cursor to resume after: ``Last-Event-ID`` (what EventSource sends), ``?lastEventId=`` or
    ``?after=``; None when the client asks for live events only. Raises ``Refusal`` (400) when not an
    integer."""
    raw = request.headers.get("Last-Event-ID")
    query = request.rel_url.query
    if raw is None:
        raw = query.get("lastEventId", query.get("after"))
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise Refusal(400, "invalid", f"the cursor must be an integer, got {raw[:40]!r}") from None
    if value < 0:
        raise Refusal(400, "invalid", "the cursor must not be negative")
    return value


def _wants_sse(request: web.BaseRequest) -> bool:
    accept = request.headers.get(hdrs.ACCEPT)
    if not accept:
        return True
    media = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return bool(media & {"text/event-stream", "*/*", "text/*"})


def _direct_transport(request: web.BaseRequest, response: web.StreamResponse) -> asyncio.Transport | None:
    """The transport ``Hub.publish`` may write a prepared SSE response's events to directly, or None when
    the response's body is not written as is (compressed). (No isinstance check: uvloop's transports are
    not subclasses of asyncio's.)"""
    transport = request.transport
    if transport is None or response.compression:
        return None
    return transport


def _small_send_buffer(request: web.BaseRequest, size: int) -> None:
    """Bound what a stalled reader holds in our kernel: with Linux's autotuning a socket's send buffer grows
    to megabytes, which a subscriber that stops reading would fill before its own buffer ever did."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class PushMount:
    """The ``HttpMount`` of one push outbound: serves its subscriptions on its listener."""

    def __init__(self, name: str, cfg: PushOutboundConfig, hub: Hub, sink: Sink) -> None:
        self.name = name
        self.component = f"outbound:{name}"
        self.prefix = cfg.prefix
        self.cfg = cfg
        self.hub = hub
        self._sink = sink
        self._rules = tuple(SubscribeRule.compile(r) for r in cfg.subscribe)
        self._log = structlog.get_logger(__name__).bind(outbound=name, protocol="push")

    # ---------------------------------------------------------------- admission

    async def _admit(self, call: MountRequest, address: str) -> str:
        """The subscriber's key for the per-principal limit; raises ``Refusal``."""
        try:
            principal = await self._sink.authenticate(call.origin)
        except Rejected as exc:
            headers = (
                {"WWW-Authenticate": exc.challenge or "Bearer"} if exc.code is RejectCode.UNAUTHENTICATED else None
            )
            raise Refusal(STATUS.get(exc.code, 400), exc.code.value, exc.reason, headers=headers) from None
        if call.auth and principal.anonymous:
            raise Refusal(
                401,
                "unauthenticated",
                "subscribing needs credentials on this listener",
                headers={"WWW-Authenticate": "Bearer"},
            )
        rule = refusing_rule(self._rules, principal, address, call.auth)
        if rule is not None:
            who = f"principal {principal.id!r}" if principal.id else "an anonymous caller"
            how = "no rule allows it; rule" if rule == DEFAULT_DENY else "denied by rule"
            raise Refusal(403, "forbidden", f"{who} may not subscribe to {address!r} ({how} {rule!r})")
        key = principal.id or f"peer:{call.origin.peer}"
        full = self.hub.full(key)
        if full is not None:
            raise Refusal(503, "not_ready", full, close=CLOSE_TRY_AGAIN, headers={"Retry-After": "1"})
        return key

    async def handle(self, call: MountRequest) -> web.StreamResponse:
        request: web.BaseRequest = call.request
        cors = dict(call.cors_headers)
        if request.method != hdrs.METH_GET:
            return json_error(
                405, "method_not_allowed", f"{request.method} is not allowed here (allowed: GET)", {hdrs.ALLOW: "GET"}
            )
        websocket = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        if not call.origin_allowed:
            # Before anything else, and before any upgrade: a page from another site must not read events
            # with the visitor's credentials (cookies, a client certificate).
            self._log.info("subscriber.refused", reason="origin", origin=request.headers.get(hdrs.ORIGIN, "")[:100])
            return json_error(403, "forbidden", "origin not allowed")
        address = request.rel_url.path[len(self.prefix) + 1 :]
        try:
            problem = validate_address_pattern(address)
            if problem is not None:
                raise Refusal(404 if not address else 400, "not_found" if not address else "invalid", problem)
            if not websocket and not _wants_sse(request):
                raise Refusal(406, "not_acceptable", "subscriptions are text/event-stream or a WebSocket upgrade")
            after = _cursor(request)
            key = await self._admit(call, address)
        except Refusal as refusal:
            self._log.info("subscriber.refused", status=refusal.status, address=address[:200], peer=call.origin.peer)
            if websocket and refusal.status in (401, 403, 503):
                return await self._ws_refuse(request, cors, refusal)
            return refusal.response(cors)
        if websocket:
            return await self._websocket(request, cors, address, after, key, call)
        return await self._sse(request, cors, address, after, key, call)

    async def _ws_refuse(self, request: web.BaseRequest, cors: dict[str, str], refusal: Refusal) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=SUBPROTOCOLS)
        ws.headers.update(cors)
        await ws.prepare(request)
        await ws.close(code=refusal.close, message=refusal.reason.encode("utf-8")[:123])
        return ws

    # ---------------------------------------------------------------- SSE

    async def _sse(
        self,
        request: web.BaseRequest,
        cors: dict[str, str],
        address: str,
        after: int | None,
        key: str,
        call: MountRequest,
    ) -> web.StreamResponse:
        cfg = self.cfg
        headers = {
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            **cors,
        }
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        _small_send_buffer(request, cfg.send_buffer_bytes)
        sub = Subscriber(address, key, call.origin.peer, "sse", cfg.subscriber_buffer, 0)
        attached = self.hub.attach(sub, after)
        head = [f"retry: {cfg.retry_ms}\n\n: subscribed to {address} after cursor {sub.cursor}\n\n"]
        if attached.missed is not None:
            gone_after, gone_to = attached.missed
            head.append(
                f": gap: events after cursor {gone_after} up to {gone_to} are no longer retained and were missed;"
                f" resuming with the oldest retained\n\n"
            )
        if attached.ahead:
            head.append(
                f": cursor {after} is newer than this stream's newest ({self.hub.ring.last}); live from here\n\n"
            )
        self._log.info(
            "subscriber.connected",
            transport="sse",
            address=address,
            peer=sub.peer,
            after=after,
            backlog=len(attached.backlog),
        )
        reason = "client_closed"
        try:
            await response.write("".join(head).encode("utf-8"))
            sub.task = asyncio.create_task(
                self._pump_sse(sub, response, attached.backlog, _direct_transport(request, response)),
                name=f"{self.component}:sse",
            )
            await asyncio.wait((sub.task, call.disconnected), return_when=asyncio.FIRST_COMPLETED)
            if sub.task.done() and not sub.task.cancelled() and sub.task.exception() is not None:
                reason = "error" if not isinstance(sub.task.exception(), ConnectionError) else "client_closed"
        except ConnectionError:
            pass
        finally:
            if sub.task is not None and not sub.task.done():
                sub.task.cancel()
            self.hub.detach(sub, reason)
        if sub.kicked is not None:
            await self._sse_farewell(request, response, sub)
        self._log.info(
            "subscriber.disconnected", transport="sse", peer=sub.peer, reason=sub.kicked or reason, cursor=sub.cursor
        )
        return response

    async def _sse_farewell(self, request: web.BaseRequest, response: web.StreamResponse, sub: Subscriber) -> None:
        """The comment that ends a stream the server cut off, then the connection's end."""
        text = f": disconnected: {sub.kicked}; resume with Last-Event-ID: {sub.cursor}\n\n"
        try:
            async with asyncio.timeout(FAREWELL_TIMEOUT_S):
                await response.write(text.encode())
                await response.write_eof()
        except (TimeoutError, ConnectionError, RuntimeError):
            transport = request.transport
            if transport is not None:
                transport.abort()  # a reader that stopped reading cannot take even the farewell

    async def _pump_sse(
        self,
        sub: Subscriber,
        response: web.StreamResponse,
        backlog: list[Entry],
        direct: asyncio.Transport | None,
    ) -> None:
        """Writes the backlog, then whatever queues in the subscriber's buffer; whenever it has caught up,
        it hands the stream to ``Hub.publish`` (``sub.direct``), which writes live entries straight to the
        transport while the socket keeps up, so a fan-out wakes no task per subscriber per event."""
        pushed = self.hub.pushed
        write = response.write
        chunk: list[memoryview] = []
        for entry in backlog:
            if entry.cursor > sub.cursor:
                chunk.append(entry.sse())
                sub.cursor = entry.cursor
                if len(chunk) >= 64:
                    await write(b"".join(chunk))
                    pushed["sse"] += len(chunk)
                    chunk = []
        if chunk:
            await write(b"".join(chunk))
            pushed["sse"] += len(chunk)
        if direct is not None:
            sub.chunked = response.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked"
        buffer = sub.buffer
        wake = sub.wake
        while True:
            if buffer:
                chunk = []
                while buffer and len(chunk) < 64:
                    entry = buffer.popleft()
                    if entry.cursor > sub.cursor:
                        chunk.append(entry.sse())
                        sub.cursor = entry.cursor
                if chunk:
                    await write(b"".join(chunk))
                    pushed["sse"] += len(chunk)
                    sub.written = time.monotonic()
                continue
            if sub.beat:
                sub.beat = False
                await write(b": heartbeat\n\n")
                sub.written = time.monotonic()
                continue
            # Caught up: the head (and with it the HTTP headers) went out through ``write`` above, so
            # what ``Hub.publish`` writes to the transport from here follows them.
            sub.direct = direct
            wake.clear()
            await wake.wait()  # queued entries (the socket was behind), the heartbeat ticker or a kick

    # ---------------------------------------------------------------- WebSocket

    async def _websocket(
        self,
        request: web.BaseRequest,
        cors: dict[str, str],
        address: str,
        after: int | None,
        key: str,
        call: MountRequest,
    ) -> web.StreamResponse:
        cfg = self.cfg
        offered = [p.strip() for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",") if p.strip()]
        ws = web.WebSocketResponse(protocols=SUBPROTOCOLS, heartbeat=cfg.heartbeat_s, max_msg_size=4096)
        ws.headers.update(cors)
        await ws.prepare(request)
        if offered and ws.ws_protocol is None:
            await ws.close(
                code=CLOSE_PROTOCOL_ERROR,
                message=f"no subprotocol offered is spoken here; use {' or '.join(SUBPROTOCOLS)}".encode()[:123],
            )
            return ws
        binary = ws.ws_protocol == "cloudevents.proto"
        _small_send_buffer(request, cfg.send_buffer_bytes)
        sub = Subscriber(address, key, call.origin.peer, "websocket", cfg.subscriber_buffer, 0)
        attached = self.hub.attach(sub, after)
        self._log.info(
            "subscriber.connected",
            transport="websocket",
            subprotocol=ws.ws_protocol,
            address=address,
            peer=sub.peer,
            after=after,
            backlog=len(attached.backlog),
        )
        reason = "client_closed"
        reader = asyncio.create_task(self._read_ws(ws), name=f"{self.component}:ws-reader")
        try:
            if attached.missed is not None:
                gone_after, gone_to = attached.missed
                await ws.send_str(
                    json.dumps(
                        {
                            "gap": {"after": gone_after, "to": gone_to},
                            "reason": "events after the cursor are gone; resuming with the oldest retained",
                        }
                    )
                )
            sub.task = asyncio.create_task(
                self._pump_ws(sub, ws, attached.backlog, binary), name=f"{self.component}:ws"
            )
            await asyncio.wait((sub.task, reader), return_when=asyncio.FIRST_COMPLETED)
            protocol_error = reader.result() if reader.done() and not reader.cancelled() else None
            if protocol_error is not None:
                code, text = protocol_error
                sub.kicked = sub.kicked or "error"
                with contextlib.suppress(TimeoutError, ConnectionError):
                    async with asyncio.timeout(FAREWELL_TIMEOUT_S):
                        await ws.close(code=code, message=text.encode()[:123])
        except ConnectionError:
            pass
        finally:
            for task in (sub.task, reader):
                if task is not None and not task.done():
                    task.cancel()
            self.hub.detach(sub, reason)
        if sub.kicked in ("slow_consumer", "shutdown"):
            code = CLOSE_POLICY if sub.kicked == "slow_consumer" else 1001
            message = f"{sub.kicked.replace('_', ' ')}; resume with after={sub.cursor}"
            try:
                async with asyncio.timeout(FAREWELL_TIMEOUT_S):
                    await ws.close(code=code, message=message.encode())
            except (TimeoutError, ConnectionError):
                transport = request.transport
                if transport is not None:
                    transport.abort()
        self._log.info(
            "subscriber.disconnected",
            transport="websocket",
            peer=sub.peer,
            reason=sub.kicked or reason,
            cursor=sub.cursor,
        )
        return ws

    async def _read_ws(self, ws: web.WebSocketResponse) -> tuple[int, str] | None:
        """Reads what the client sends (aiohttp answers pings and reads pongs and the close here). A data
        frame is a protocol error on a subscription: returns the close code and reason; None when the
        socket closed."""
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                return CLOSE_UNSUPPORTED, "this socket only delivers events; publish on a websocket inbound"
            if msg.type == WSMsgType.ERROR:
                return None
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return None

    async def _pump_ws(self, sub: Subscriber, ws: web.WebSocketResponse, backlog: list[Entry], binary: bool) -> None:
        pushed = self.hub.pushed
        for entry in backlog:
            if entry.cursor > sub.cursor:
                # The frame is in the transport before the send waits for it to drain: it counts as sent
                # then (a disconnect during the wait must not make the resume cursor skip it or repeat it).
                sending = ws.send_bytes(entry.proto()) if binary else ws.send_str(entry.text())
                sub.cursor = entry.cursor
                pushed["websocket"] += 1
                await sending
        buffer = sub.buffer
        wake = sub.wake
        while True:
            while buffer:
                entry = buffer.popleft()
                if entry.cursor > sub.cursor:
                    sending = ws.send_bytes(entry.proto()) if binary else ws.send_str(entry.text())
                    sub.cursor = entry.cursor
                    pushed["websocket"] += 1
                    await sending
            wake.clear()
            await wake.wait()
