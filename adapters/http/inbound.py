"""HTTP inbound: one POST endpoint per ``[inbound.X]`` section, served by its listener (``listener.py``).

A request is answered 202 only after ``Sink.accept`` returned (the events are committed); refusals map
onto status codes and never become a 500. The caller is authenticated (``Sink.authenticate``) before its
body is read, so an unauthenticated client is refused without the gateway buffering what it sent.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf.timestamp_pb2 import Timestamp

from adapters.http import codec
from adapters.http.config import HttpInboundConfig, HttpListenerConfig
from mediator.core import formats
from mediator.core.envelope import SPEC_VERSION, Envelope, new_id, now_timestamp
from mediator.core.errors import (
    NotReady,
    RateLimitState,
    RejectCode,
    Rejected,
    RequestError,
    RequestTimeout,
    RequestUndeliverable,
)
from mediator.core.ingress import Origin, PeerCertificate
from mediator.core.patterns import Template, TemplateError
from mediator.core.prefer import applied, prefer_wait
from mediator.core.seams import Reply, Requests, Sink, StatusReader
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE

STATUS_BY_CODE: dict[RejectCode, int] = {
    RejectCode.INVALID: 400,
    RejectCode.UNAUTHENTICATED: 401,
    RejectCode.FORBIDDEN: 403,
    RejectCode.TOO_LARGE: 413,
    RejectCode.UNSUPPORTED_MEDIA: 415,
    RejectCode.RATE_LIMITED: 429,
    RejectCode.UNPROCESSABLE: 422,
}

# W3C Trace Context: version-traceid-parentid-flags; an invalid value is ignored, as the spec asks.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_JSON = "application/json"
DEFAULT_CHALLENGE = 'Bearer realm="mediator"'
DEFAULT_CREDENTIAL_HEADERS = frozenset({"authorization"})
_PROBLEM = "application/problem+json"
REPLAYED = "Idempotent-Replayed"
"""On a 202 for an event committed before (a repeat within the dedup window, not delivered again)."""
# Content refusals are RFC 9457 problem details (with the {"error", "reason"} of every refusal as well).
_PROBLEM_TITLES = {
    RejectCode.INVALID: "Malformed event",
    RejectCode.UNSUPPORTED_MEDIA: "Unsupported media type",
    RejectCode.UNPROCESSABLE: "Event does not match its schema",
}
# Read as CloudEvents on a plain inbound too: never forwarded as opaque data.
_CLOUDEVENTS_MEDIA = frozenset({formats.JSON_CONTENT_TYPE, formats.BATCH_CONTENT_TYPE, formats.PROTOBUF_CONTENT_TYPE})
_CLOUDEVENTS_ACCEPT_POST = ", ".join(sorted(_CLOUDEVENTS_MEDIA))
STATUS_PATH = "/events/{id}/status"
"""Where a listener serves an event's delivery status; every 202 for one event names it in ``Location``."""
# CloudEvents http-webhook.md section 4, the abuse-protection handshake.
REQUEST_ORIGIN = "WebHook-Request-Origin"
ALLOWED_ORIGIN = "WebHook-Allowed-Origin"
ALLOWED_RATE = "WebHook-Allowed-Rate"


def status_url(event_id: str) -> str:
    """The status URL of ``event_id`` (relative: on the listener that answered)."""
    return STATUS_PATH.replace("{id}", quote(event_id, safe=""))


class _ReadTimeout(Exception):
    """The body did not arrive within ``read_timeout_s``."""


class _ClientGone(Exception):
    """The client closed the connection before its body arrived."""


def error_response(status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": error, "reason": reason}, ensure_ascii=False).encode("utf-8")
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def rejection_response(exc: Rejected) -> web.Response:
    """The answer to a refusal: the mapped status, the JSON error body (the stage's reason, which never
    carries a credential) and the headers the status calls for."""
    headers: dict[str, str] | None = None
    if exc.code is RejectCode.UNAUTHENTICATED:
        headers = {"WWW-Authenticate": exc.challenge or DEFAULT_CHALLENGE}  # RFC 9110 15.5.2: a 401 must
    elif exc.code is RejectCode.RATE_LIMITED:
        headers = rate_limit_headers(exc.retry_after_s, exc.limit)
    elif exc.code in _PROBLEM_TITLES:
        return problem_response(exc, STATUS_BY_CODE[exc.code])
    return error_response(STATUS_BY_CODE.get(exc.code, 400), exc.code.value, exc.reason, headers)


def problem_response(exc: Rejected, status: int) -> web.Response:
    """RFC 9457 ``application/problem+json``: ``type`` (``urn:mediator:problem:<code>``), ``title``,
    ``status``, ``detail`` (the reason), every problem found in ``errors`` (``detail`` and a JSON ``pointer``
    into the data or the ``attribute`` it is about), and ``error`` and ``reason`` as every refusal has."""
    problem: dict[str, Any] = {
        "type": f"urn:mediator:problem:{exc.code.value}",
        "title": _PROBLEM_TITLES.get(exc.code, "Refused"),
        "status": status,
        "detail": exc.reason,
        "error": exc.code.value,
        "reason": exc.reason,
    }
    if exc.errors:
        listed: list[dict[str, str]] = []
        for err in exc.errors:
            item = {"detail": err.message}
            if err.pointer is not None:
                item["pointer"] = err.pointer
            if err.attribute is not None:
                item["attribute"] = err.attribute
            listed.append(item)
        problem["errors"] = listed
    body = json.dumps(problem, ensure_ascii=False).encode("utf-8")
    return web.Response(status=status, body=body, content_type=_PROBLEM)


MAX_ERROR_DETAIL = 4096
"""The most characters of a consumer's error reply a 502 problem body quotes."""


def _problem(status: int, kind: str, title: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    # With the "error" and "reason" every other refusal has, so that one reader serves every answer.
    problem = {
        "type": f"urn:mediator:problem:{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        "error": kind,
        "reason": detail,
    }
    body = json.dumps(problem, ensure_ascii=False).encode("utf-8")
    return web.Response(status=status, body=body, content_type=_PROBLEM, headers=headers)


def reply_response(reply: Reply) -> web.Response:
    """A consumer's reply as an HTTP response: 200 with its body and content type, or, for an error reply
    (``mediator-error: true``), 502 with the consumer's text as the problem's ``detail``."""
    if reply.error:
        text = reply.body.decode("utf-8", "replace")
        if len(text) > MAX_ERROR_DETAIL:
            text = text[:MAX_ERROR_DETAIL] + "..."
        return _problem(502, "consumer-error", "The consumer answered with an error", text)
    response = web.Response(status=200, body=reply.body)
    # Set whole (with its parameters, a charset say); aiohttp's content_type argument takes no parameters.
    response.headers["Content-Type"] = reply.content_type or "application/octet-stream"
    return response


def request_problem(exc: RequestError) -> web.Response:
    """504 for no reply in time; 503 (Retry-After) when the destination's broker is not reachable now;
    502 when no request-capable destination takes the request."""
    if isinstance(exc, RequestTimeout):
        return _problem(504, "reply-timeout", "No reply in time", exc.reason)
    if isinstance(exc, RequestUndeliverable) and exc.retryable:
        return _problem(
            503, "request-undeliverable", "The request could not be published", exc.reason, {"Retry-After": "1"}
        )
    return _problem(502, "request-undeliverable", "The request could not be published", exc.reason)


def media_matcher(pattern: str) -> Callable[[str], bool]:
    """A test of a (lower-case, parameterless) media type against one ``accept`` entry."""
    if pattern == "*/*":
        return bool
    if pattern.endswith("/*"):
        prefix = pattern[:-1]
        return lambda media: media.startswith(prefix)
    if pattern == "application/json":
        return formats.is_json  # text/json and every +json suffix too (never called with "")
    return pattern.__eq__


def rate_limit_headers(retry_after_s: float | None, limit: RateLimitState | None) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) and, with a limit, the IETF httpapi RateLimit headers
    (draft-ietf-httpapi-ratelimit-headers-09/-10, structured-field form)::

        RateLimit-Policy: "<policy>";q=<quota>;w=<window s>
        RateLimit: "<policy>";r=<remaining>;t=<seconds until the quota is back>
    """
    if retry_after_s is None:
        retry_after_s = limit.reset_s if limit is not None else 1.0
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    if limit is not None:
        name = _sf_string(limit.policy)
        window = max(1, math.ceil(limit.window_s))
        headers["RateLimit-Policy"] = f"{name};q={max(0, limit.quota)};w={window}"
        headers["RateLimit"] = f"{name};r={max(0, limit.remaining)};t={max(0, math.ceil(limit.reset_s))}"
    return headers


def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string: printable ASCII only (anything else dropped), with ``\\`` and ``"`` escaped."""
    printable = "".join(c for c in value if " " <= c <= "~")
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def credentials(request: web.BaseRequest, names: Collection[str]) -> tuple[tuple[str, str], ...]:
    """(name, value) for every value of the headers ``names`` (lower-case), name by name in the order of
    ``names``, each header's values in the order they came."""
    headers = request.headers
    found: tuple[tuple[str, str], ...] = ()
    for name in names:
        values = headers.getall(name, None)
        if values:  # the usual request carries one credential header at most: no list, no generator
            found += tuple([(name, value) for value in values])
    return found


def peer_certificate(request: web.BaseRequest) -> PeerCertificate | None:
    """The client certificate the TLS layer verified, if any. ``peercert`` is only filled in when the
    handshake verified a certificate against the client CA (CERT_OPTIONAL or CERT_REQUIRED); a plain
    connection, or TLS without a client certificate, gives None."""
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    return certificate_identity(cert)


def certificate_identity(cert: dict[str, Any]) -> PeerCertificate:
    """SAN URI and DNS entries and the subject's common name, from ``ssl.SSLSocket.getpeercert()``'s dict."""
    uris: list[str] = []
    dns: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI":
            uris.append(value)
        elif kind == "DNS":
            dns.append(value)
    common_name: str | None = None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common_name = value
    return PeerCertificate(uris=tuple(uris), dns=tuple(dns), common_name=common_name)


def make_origin(request: web.BaseRequest, inbound: str, names: Collection[str], tls: bool) -> Origin:
    """Who is calling, as the stages see it (``mediator.core.ingress.Origin``)."""
    # Positional arguments (inbound, protocol, peer, credentials, certificate): on the per-request path,
    # noticeably cheaper than keywords for a slotted dataclass.
    return Origin(
        inbound,
        "http",
        request.remote or "",
        credentials(request, names) if names else (),
        peer_certificate(request) if tls else None,
    )


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

    def __init__(
        self,
        name: str,
        cfg: HttpInboundConfig,
        listener: HttpListenerConfig,
        sink: Sink,
        credential_headers: Collection[str] = DEFAULT_CREDENTIAL_HEADERS,
        requests: Requests | None = None,
        status: StatusReader | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg  # what the listener's OpenAPI description says of it (adapters/http/openapi.py)
        self._request = cfg.request
        self._requests = requests
        self._request_timeout_s = cfg.request_timeout_s
        self.path = cfg.path
        self._status = status  # this daemon's own: the event it waits for was committed here
        self._max_wait_s = listener.max_wait_s
        self._sink = sink
        # (type, source) for plain mode; the config validator guarantees both there.
        self._templates: tuple[Template, Template] | None = (
            (cfg.type, cfg.source) if cfg.type is not None and cfg.source is not None else None
        )
        self._max_batch = cfg.max_batch
        self._max_bytes = listener.max_body_bytes
        self._read_timeout_s = listener.read_timeout_s
        self._credential_names = tuple(sorted({n.lower() for n in credential_headers}))
        self._tls = listener.tls is not None
        self._accepts = tuple(media_matcher(m) for m in cfg.accept)
        self._accept_post = ", ".join(cfg.accept) if self._templates is not None else _CLOUDEVENTS_ACCEPT_POST
        self._default_content_type = cfg.default_content_type
        self._any_media = "*/*" in cfg.accept
        self.handshake = cfg.handshake
        self._log = structlog.get_logger(__name__).bind(inbound=name, protocol="http")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        origin = make_origin(request, self.name, self._credential_names, self._tls)
        traceparent = request.headers.get(TRACEPARENT)
        if traceparent is not None:  # the hop's context: the parent of the receive span, when tracing is on
            origin.traceparent = traceparent
            origin.tracestate = request.headers.get(TRACESTATE, "")
        try:
            # Before the body: a caller nobody vouches for is refused without its body being buffered
            # (aiohttp discards what is left of it for at most LINGER_S, so the client reads the 401).
            await self._sink.authenticate(origin)
            try:
                if self._templates is not None:
                    self._check_media(request.headers)  # before the body: a 415 reads none of it
                body = await read_body(request, self._max_bytes, self._read_timeout_s)
                origin.body = body  # the exact bytes received: what a webhook signature covers
                events, batch = self.decode(request, body)
            except Rejected as exc:  # refused here, not by a stage: the sink logs and counts it all the same
                self._sink.refused(origin, exc)
                raise
            if self._request:
                return await self._ask(events, batch, origin)
            duplicates = (await self._sink.accept(events, origin) if events else None) or ()
        except Rejected as exc:
            self._log.debug("envelope.rejected", code=exc.code.value, reason=exc.reason, rule=exc.rule)
            response = rejection_response(exc)
            if exc.code is RejectCode.UNSUPPORTED_MEDIA:
                response.headers["Accept-Post"] = self._accept_post  # RFC 9110 style: what a POST here takes
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
        # A repeat (same source and id, or the same Idempotency-Key, within the dedup window) was committed
        # before and is not delivered again: it gets the first answer's 202, marked as a replay (the
        # idempotency-key draft has a repeat answered as the first was; the header is Stripe's name for it).
        if not batch:
            event_id = events[0].id
            duplicate = event_id in duplicates
            self._log.debug("envelope.accepted", event_id=event_id, size=len(body), duplicate=duplicate or None)
            headers = {REPLAYED: "true"} if duplicate else {}
            if self._status is not None:
                headers["Location"] = status_url(event_id)
                wait = prefer_wait(request.headers.get("Prefer"))
                if wait is not None:
                    return await self._wait(request, event_id, duplicate, min(wait, self._max_wait_s), headers)
            return web.Response(status=202, body=_id_body(event_id, duplicate), content_type=_JSON, headers=headers)
        self._log.debug("batch.accepted", count=len(events), size=len(body), duplicates=len(duplicates) or None)
        ids = [e.id for e in events]
        flags = [i in duplicates for i in ids]
        answer: dict[str, object] = {"ids": ids, "duplicate": flags}
        if self._status is not None:
            # One status URL per event (a Location names one resource); Prefer: wait is for single events.
            answer["status"] = [status_url(i) for i in ids]
        reply = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        response = web.Response(status=202, body=reply, content_type=_JSON)
        if flags and all(flags):
            response.headers[REPLAYED] = "true"  # the whole batch was a repeat
        return response

    async def answer_handshake(self, request: web.BaseRequest) -> web.StreamResponse:
        """``OPTIONS`` on the path: the CloudEvents webhook abuse-protection handshake (http-webhook.md
        4.2). An allowed ``WebHook-Request-Origin`` gets 200 with ``WebHook-Allowed-Origin`` (echoed) and
        ``WebHook-Allowed-Rate``; another 403 without them (a refusal); an OPTIONS without the header
        204 with ``Allow``. Unauthenticated: it commits nothing and grants nothing but consent to receive."""
        cfg = self.handshake
        assert cfg is not None
        asked = request.headers.get(REQUEST_ORIGIN, "").strip()
        if not asked:
            return web.Response(status=204, headers={"Allow": "OPTIONS, POST"})
        if "*" not in cfg.allowed_origins and asked.lower() not in cfg.allowed_origins:
            self._log.info("handshake.refused", origin=asked[:100])
            return error_response(403, "forbidden", "this origin may not deliver webhooks here")
        rate = str(cfg.allowed_rate) if cfg.allowed_rate is not None else "*"
        self._log.info("handshake.accepted", origin=asked[:100], rate=rate)
        headers = {"Allow": "OPTIONS, POST", ALLOWED_ORIGIN: asked, ALLOWED_RATE: rate}
        return web.Response(status=200, headers=headers)

    async def _wait(
        self, request: web.BaseRequest, event_id: str, duplicate: bool, wait_s: float, headers: dict[str, str]
    ) -> web.Response:
        """``Prefer: wait``: 200 with the status document once every destination confirmed or one was
        dead-lettered, else (after ``wait_s``) 202 as without the header. ``Preference-Applied`` says the
        wait (capped by the listener's ``max_wait_s``) was honoured; it is left out when it was not (too
        many requests waiting already: answered at once). A client that disconnects stops the wait (the
        listener's connections tell: ``disconnected``)."""
        status = self._status
        assert status is not None
        disconnected = getattr(request.protocol, "disconnected", None)
        gone = disconnected() if disconnected is not None else None
        try:
            outcome = await status.wait(event_id, wait_s, gone)
        finally:
            if gone is not None:
                gone.cancel()  # done with it: the connection drops it
        preference = applied(wait_s)
        if outcome == "final":
            found = await status.lookup(event_id)
            if found.document is not None:
                headers["Preference-Applied"] = preference
                body = json.dumps(found.document, ensure_ascii=False).encode("utf-8")
                return web.Response(status=200, body=body, content_type=_JSON, headers=headers)
        elif outcome == "timeout":
            headers["Preference-Applied"] = preference
        return web.Response(status=202, body=_id_body(event_id, duplicate), content_type=_JSON, headers=headers)

    async def _ask(self, events: list[Envelope], batch: bool, origin: Origin) -> web.Response:
        """Request mode: the consumer's reply as the response (200), its error reply as 502, no reply in
        time 504, no destination that takes the request 502 (503 when the broker is not connected)."""
        if batch or len(events) != 1:
            exc = Rejected(RejectCode.INVALID, "a request is one event; a batch cannot be answered with one reply")
            self._sink.refused(origin, exc)
            raise exc
        if self._requests is None:
            raise NotReady("request-reply is not available in this process")
        event = events[0]
        try:
            reply = await self._requests.request(event, origin, self._request_timeout_s)
        except RequestError as exc:
            return request_problem(exc)
        self._log.debug("request.answered", event_id=event.id, error=reply.error, size=len(reply.body))
        return reply_response(reply)

    def decode(self, request: web.BaseRequest, body: bytes) -> tuple[list[Envelope], bool]:
        """The request as stamped envelopes (provenance set, sender's provenance discarded), and whether it
        was a batch."""
        headers = request.headers
        now = now_timestamp()
        topic = request.path[1:]
        try:
            if self._templates is not None and not _is_cloudevent(headers):
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

    def _check_media(self, headers: Mapping[str, str]) -> None:
        """Plain mode: the Content-Type is one ``accept`` takes (a CloudEvent is read as one whatever it is)."""
        if _is_cloudevent(headers):
            return
        media = codec.media_type(headers.get("Content-Type"))
        if not media:
            if self._default_content_type is not None or self._any_media:
                return  # '*/*' takes anything, a body without a Content-Type too
            raise Rejected(RejectCode.UNSUPPORTED_MEDIA, f"a Content-Type is required; accepted: {self._accept_post}")
        if not any(accepts(media) for accepts in self._accepts):
            raise Rejected(
                RejectCode.UNSUPPORTED_MEDIA,
                f"Content-Type {media!r} is not accepted here; accepted: {self._accept_post}",
            )

    def _plain_event(
        self, request: web.BaseRequest, body: bytes, now: Timestamp, topic: str, type_: Template, source: Template
    ) -> Envelope:
        headers = request.headers
        given_id = headers.get("Idempotency-Key", "").strip()
        env = Envelope(id=given_id or new_id(), spec_version=SPEC_VERSION)
        env.binary_data = body
        env.attributes["time"].ce_timestamp.CopyFrom(now)
        content_type = headers.get("Content-Type") or self._default_content_type
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


def _is_cloudevent(headers: Mapping[str, str]) -> bool:
    """Binary mode (``ce-specversion``) or a CloudEvents structured, batch or Protobuf body."""
    return "ce-specversion" in headers or codec.media_type(headers.get("Content-Type")) in _CLOUDEVENTS_MEDIA


def _id_body(event_id: str, duplicate: bool) -> bytes:
    tail = b',"duplicate":true}' if duplicate else b',"duplicate":false}'
    return b'{"id":' + json.dumps(event_id, ensure_ascii=False).encode("utf-8") + tail


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
