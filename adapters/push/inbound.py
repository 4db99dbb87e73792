"""The WebSocket inbound: a client publishes events over one socket, each answered on its own.

Subprotocol ``cloudevents.json``: one structured CloudEvent per text frame; ``cloudevents.proto``: one
CloudEvents Protobuf message per binary frame; none offered means ``cloudevents.json``. Each event passes
the same ingress stages as an HTTP POST (``Sink.accept``: authentication, authorization, limits,
validation, transforms) and is answered with a text frame: ``{"ack": "<id>"}`` once committed (with
``"duplicate": true`` when the dedup window recognised it), or ``{"error": "<code>", "reason": "...",
"id": "<id>"}`` with the reason an HTTP 4xx would carry (``id`` null when the frame did not decode). Up to
``max_in_flight`` events of one socket wait for their commit at once, so answers may come out of order:
match them by id. A frame over ``max_frame_bytes`` closes the socket (1009); the daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import structlog
from aiohttp import WSMsgType, hdrs, web

from adapters.push.config import SUBPROTOCOLS, WebSocketInboundConfig
from adapters.push.stream import CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, json_error
from mediator.core import formats
from mediator.core.envelope import Envelope, now_timestamp
from mediator.core.errors import NotReady, RejectCode, Rejected
from mediator.core.ingress import Origin
from mediator.core.seams import MountRequest, Runtime

PROTOCOL = "websocket"


class WebSocketInbound:
    """A ``Service`` (registers its mount while it runs) and the ``HttpMount`` at its path."""

    def __init__(self, name: str, cfg: WebSocketInboundConfig, rt: Runtime) -> None:
        self.name = f"inbound:{name}"
        self.inbound = name
        self.component = self.name
        self.prefix = cfg.path
        self.cfg = cfg
        self._rt = rt
        self._log = structlog.get_logger(__name__).bind(inbound=name, protocol=PROTOCOL)

    async def run(self) -> None:
        mounts = self._rt.mounts
        mounts.add(self.cfg.listener, self)
        self._rt.health.set(self.name, True, f"serving {self.cfg.path} on listener {self.cfg.listener}")
        try:
            await asyncio.Future()
        finally:
            self._rt.health.set(self.name, False, "stopped")
            mounts.remove(self.cfg.listener, self)

    async def handle(self, call: MountRequest) -> web.StreamResponse:
        request: web.BaseRequest = call.request
        if request.rel_url.path != self.prefix:
            return json_error(404, "not_found", f"nothing is served at {request.rel_url.path}")
        if request.method != hdrs.METH_GET or request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
            return json_error(400, "invalid", "this path takes a WebSocket upgrade (GET with Upgrade: websocket)")
        if not call.origin_allowed:
            self._log.info("websocket.refused", reason="origin", peer=call.origin.peer)
            return json_error(403, "forbidden", "origin not allowed")
        origin = dataclasses.replace(call.origin, inbound=self.inbound, protocol=PROTOCOL, principal=None)
        sink = self._rt.sink
        refusal: str | None = None
        try:
            principal = await sink.authenticate(origin)
            if call.auth and principal.anonymous and not self.cfg.allow_anonymous:
                refusal = "publishing needs credentials on this listener"
        except Rejected as exc:
            refusal = exc.reason
            sink.refused(origin, exc)
        offered = [p.strip() for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",") if p.strip()]
        ws = web.WebSocketResponse(
            protocols=SUBPROTOCOLS, heartbeat=self.cfg.heartbeat_s, max_msg_size=self.cfg.max_frame_bytes
        )
        ws.headers.update(call.cors_headers)
        await ws.prepare(request)
        if refusal is not None:
            await ws.close(code=CLOSE_POLICY, message=refusal.encode("utf-8")[:123])
            return ws
        if offered and ws.ws_protocol is None:
            reason = f"no subprotocol offered is spoken here; use {' or '.join(SUBPROTOCOLS)}"
            await ws.close(code=CLOSE_PROTOCOL_ERROR, message=reason.encode()[:123])
            return ws
        binary = ws.ws_protocol == "cloudevents.proto"
        self._log.info("websocket.connected", peer=origin.peer, subprotocol=ws.ws_protocol or "cloudevents.json")
        slots = asyncio.Semaphore(self.cfg.max_in_flight)
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                msg = await ws.receive()
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type == WSMsgType.ERROR:
                    self._log.info("websocket.frame_refused", peer=origin.peer, error=str(ws.exception()))
                    break
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                try:
                    event = self._decode(msg.type, msg.data, binary, request.rel_url.path)
                except Rejected as exc:
                    sink.refused(origin, exc)
                    await ws.send_str(_error(exc.code.value, exc.reason, None))
                    continue
                await slots.acquire()
                task = asyncio.create_task(self._publish(ws, event, origin, slots), name=f"{self.name}:frame")
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            if pending:
                # The socket is going away: answers cannot be sent, but commits under way finish (bounded).
                await asyncio.wait(pending, timeout=10.0)
            self._log.info("websocket.disconnected", peer=origin.peer, close_code=ws.close_code)
        return ws

    def _decode(self, kind: WSMsgType, data: object, binary: bool, path: str) -> Envelope:
        if binary:
            if kind != WSMsgType.BINARY or not isinstance(data, bytes):
                raise Rejected(
                    RejectCode.UNSUPPORTED_MEDIA, "cloudevents.proto takes binary frames (CloudEvents Protobuf)"
                )
            event = formats.from_protobuf(data)
        else:
            if kind != WSMsgType.TEXT or not isinstance(data, str):
                raise Rejected(RejectCode.UNSUPPORTED_MEDIA, "cloudevents.json takes text frames (structured JSON)")
            event = formats.from_structured(data.encode("utf-8"))
        prov = event.provenance
        prov.Clear()  # a sender cannot forge gateway facts
        prov.inbound = self.inbound
        prov.protocol = PROTOCOL
        prov.topic = path[1:]
        prov.topic_separator = "/"
        prov.received.CopyFrom(now_timestamp())
        return event

    async def _publish(
        self, ws: web.WebSocketResponse, event: Envelope, origin: Origin, slots: asyncio.Semaphore
    ) -> None:
        try:
            try:
                duplicates = await self._rt.sink.accept([event], origin)
            except Rejected as exc:
                answer = _error(exc.code.value, exc.reason, event.id)
            except NotReady as exc:
                answer = _error("not_ready", str(exc) or "not ready", event.id)
            else:
                doc: dict[str, object] = {"ack": event.id}
                if duplicates and event.id in duplicates:
                    doc["duplicate"] = True
                answer = json.dumps(doc, ensure_ascii=False)
            if not ws.closed:
                with contextlib.suppress(ConnectionError):
                    await ws.send_str(answer)
        finally:
            slots.release()


def _error(code: str, reason: str, event_id: str | None) -> str:
    return json.dumps({"error": code, "reason": reason, "id": event_id}, ensure_ascii=False)
