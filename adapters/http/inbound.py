"""HTTP inbound: one POST endpoint per ``[inbound.X]`` section, served by its listener (``listener.py``).

A request is answered 202 only after ``Sink.accept`` returned (the events are committed); refusals map
onto status codes and never become a 500.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf.timestamp_pb2 import Timestamp

from adapters.http import codec
from adapters.http.config import HttpInboundConfig, HttpListenerConfig
from mediator.core import formats
from mediator.core.envelope import SPEC_VERSION, Envelope, new_id, now_timestamp
from mediator.core.errors import NotReady, RejectCode, Rejected
from mediator.core.patterns import Template, TemplateError
from mediator.core.seams import Sink

STATUS_BY_CODE: dict[RejectCode, int] = {
    RejectCode.INVALID: 400,
    RejectCode.UNAUTHENTICATED: 401,
    RejectCode.FORBIDDEN: 403,
    RejectCode.TOO_LARGE: 413,
    RejectCode.UNSUPPORTED_MEDIA: 415,
    RejectCode.RATE_LIMITED: 429,
}

# W3C Trace Context: version-traceid-parentid-flags; an invalid value is ignored, as the spec asks.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_JSON = "application/json"


class _ReadTimeout(Exception):
    """The body did not arrive within ``read_timeout_s``."""


class _ClientGone(Exception):
    """The client closed the connection before its body arrived."""


def error_response(status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": error, "reason": reason}, ensure_ascii=False).encode("utf-8")
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


async def read_body(request: web.BaseRequest, max_bytes: int, timeout_s: float) -> bytes:
    """The whole request body, at most ``max_bytes`` (also for chunked or compressed bodies, which
    ``client_max_size`` does not bound) and within ``timeout_s`` (aiohttp has no body read timeout)."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise Rejected(RejectCode.TOO_LARGE, f"body of {length} bytes exceeds the limit of {max_bytes}")
    content = request.content
    try:
        if content.is_eof():
            # The usual small request: the whole body arrived with the headers; no wait, no timer.
            body = content.read_nowait()
            if len(body) > max_bytes:
                raise Rejected(RejectCode.TOO_LARGE, f"body exceeds the limit of {max_bytes} bytes")
            return body
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(timeout_s):
            while chunk := await content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise Rejected(RejectCode.TOO_LARGE, f"body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _ReadTimeout from None
    except ConnectionError:
        raise _ClientGone from None
    except HttpProcessingError as exc:
        # Malformed chunked framing, a wrong Content-Length or an undecodable Content-Encoding.
        raise Rejected(RejectCode.INVALID, f"malformed request body: {exc.message}") from exc
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


class HttpInbound:
    """The request handler of one inbound section; ``path`` is where its listener routes POSTs."""

    def __init__(self, name: str, cfg: HttpInboundConfig, listener: HttpListenerConfig, sink: Sink) -> None:
        self.name = name
        self.path = cfg.path
        self._sink = sink
        # (type, source) for plain mode; the config validator guarantees both there.
        self._templates: tuple[Template, Template] | None = (
            (cfg.type, cfg.source) if cfg.type is not None and cfg.source is not None else None
        )
        self._max_batch = cfg.max_batch
        self._max_bytes = listener.max_body_bytes
        self._read_timeout_s = listener.read_timeout_s
        self._log = structlog.get_logger(__name__).bind(inbound=name, protocol="http")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            body = await read_body(request, self._max_bytes, self._read_timeout_s)
            events, batch = self.decode(request, body)
            if events:
                await self._sink.accept(events)
        except Rejected as exc:
            self._log.debug("envelope.rejected", code=exc.code.value, reason=exc.reason)
            response = error_response(STATUS_BY_CODE.get(exc.code, 400), exc.code.value, exc.reason)
            if exc.code is RejectCode.TOO_LARGE:
                response.force_close()  # the rest of an oversized body is not worth reading
            return response
        except NotReady as exc:
            retry_after = str(max(1, math.ceil(exc.retry_after_s)))
            return error_response(503, "not_ready", exc.reason, {"Retry-After": retry_after})
        except _ReadTimeout:
            response = error_response(408, "timeout", f"request body not received within {self._read_timeout_s} s")
            response.force_close()
            return response
        except _ClientGone:
            self._log.debug("request.aborted")
            response = error_response(400, "aborted", "connection closed before the body arrived")
            response.force_close()
            return response
        if not batch:
            self._log.debug("envelope.accepted", event_id=events[0].id, size=len(body))
            return web.Response(status=202, body=_id_body(events[0].id), content_type=_JSON)
        self._log.debug("batch.accepted", count=len(events), size=len(body))
        ids = json.dumps({"ids": [e.id for e in events]}, ensure_ascii=False).encode("utf-8")
        return web.Response(status=202, body=ids, content_type=_JSON)

    def decode(self, request: web.BaseRequest, body: bytes) -> tuple[list[Envelope], bool]:
        """The request as stamped envelopes (provenance set, sender's provenance discarded), and whether it
        was a batch."""
        headers = request.headers
        now = now_timestamp()
        topic = request.path[1:]
        try:
            if self._templates is not None and "ce-specversion" not in headers:
                return [self._plain_event(request, body, now, topic, *self._templates)], False
            events = codec.to_envelopes(headers, body, max_batch=self._max_batch)
        except (ValueError, TypeError) as exc:
            # protobuf refuses strings that are not valid UTF-8 (header bytes aiohttp surrogate-escaped).
            raise Rejected(RejectCode.INVALID, f"malformed request: {exc}") from exc
        trace = _traceparent(request)
        for env in events:
            self._stamp(env, topic, now)
            if trace is not None and "traceparent" not in env.attributes:
                _set_trace(env, trace, request)
        return events, codec.media_type(headers.get("Content-Type")) == formats.BATCH_CONTENT_TYPE

    def _plain_event(
        self, request: web.BaseRequest, body: bytes, now: Timestamp, topic: str, type_: Template, source: Template
    ) -> Envelope:
        headers = request.headers
        given_id = headers.get("Idempotency-Key", "").strip()
        env = Envelope(id=given_id or new_id(), spec_version=SPEC_VERSION)
        env.binary_data = body
        env.attributes["time"].ce_timestamp.CopyFrom(now)
        content_type = headers.get("Content-Type")
        if content_type:
            env.attributes["datacontenttype"].ce_string = content_type
        trace = _traceparent(request)
        if trace is not None:
            _set_trace(env, trace, request)
        self._stamp(env, topic, now)
        env.provenance.id_minted = not given_id
        try:
            env.type = type_.render(env)
            env.source = source.render(env)
        except TemplateError as exc:
            raise Rejected(RejectCode.INVALID, f"cannot name the event: {exc}") from exc
        if not env.type or not env.source:
            raise Rejected(RejectCode.INVALID, "the event's type or source rendered empty for this path")
        return env

    def _stamp(self, env: Envelope, topic: str, now: Timestamp) -> None:
        prov = env.provenance
        prov.Clear()
        prov.inbound = self.name
        prov.protocol = "http"
        prov.topic = topic
        prov.topic_separator = "/"
        prov.received.CopyFrom(now)


def _id_body(event_id: str) -> bytes:
    return b'{"id":' + json.dumps(event_id, ensure_ascii=False).encode("utf-8") + b"}"


def _traceparent(request: web.BaseRequest) -> str | None:
    value = request.headers.get("traceparent")
    if value is None:
        return None
    value = value.strip().lower()
    return value if _TRACEPARENT.match(value) else None


def _set_trace(env: Envelope, traceparent: str, request: web.BaseRequest) -> None:
    env.attributes["traceparent"].ce_string = traceparent
    tracestate = request.headers.get("tracestate")
    if tracestate and tracestate.isascii():
        env.attributes["tracestate"].ce_string = tracestate.strip()


def paths_conflict(inbounds: Sequence[HttpInbound]) -> list[str]:
    """Problems with the paths of the inbounds sharing one listener (duplicates)."""
    seen: dict[str, str] = {}
    problems: list[str] = []
    for ib in inbounds:
        other = seen.setdefault(ib.path, ib.name)
        if other != ib.name:
            problems.append(f"inbound.{ib.name}.path: {ib.path!r} is already served by inbound {other!r}")
    return problems
