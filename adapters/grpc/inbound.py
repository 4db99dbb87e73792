"""Publish and PublishStream: gRPC calls in, envelopes to the sink, answers only after the commit."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NoReturn

import grpc
import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from adapters.grpc.codec import Undecodable, code_number, pushback, rejected_trailers, status_for, to_envelope
from adapters.grpc.status import to_message
from mediator.core.envelope import SPEC_VERSION, Envelope
from mediator.core.errors import NotReady, Overloaded, Rejected, RequestTimeout, RequestUndeliverable
from mediator.core.ingress import Origin, PeerCertificate
from mediator.core.prefer import applied, prefer_wait
from mediator.core.seams import Requests, Sink, StatusReader
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE
from mediator.v1.service_pb2 import PublishAck, PublishReply


def not_ready_status(exc: NotReady) -> grpc.StatusCode:
    """Back-pressure is RESOURCE_EXHAUSTED; draining or a failed commit is UNAVAILABLE."""
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, Overloaded) else grpc.StatusCode.UNAVAILABLE


async def abort(context: Any, code: grpc.StatusCode, details: str, trailers: tuple[Any, ...] = ()) -> NoReturn:
    """``context.abort`` (which raises) typed as never returning."""
    await context.abort(code, details, trailers)
    raise AssertionError("grpc context.abort returned")  # pragma: no cover


@functools.lru_cache(maxsize=1024)
def peer_certificate(pem: bytes) -> PeerCertificate:
    """The identity in a verified client certificate (grpc's ``x509_pem_cert``): its SAN URIs and DNS
    names and its subject's common name (the last one, as Go reads it, if there are several).

    Cached per PEM (bounded): parsing costs tens of microseconds, and a client sends the same certificate
    on every connection. Raises ``ValueError`` on a PEM that is not a certificate (grpc never hands one).
    """
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        uris: list[str] = []
        dns: list[str] = []
    else:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = names[-1].value if names else None
    if isinstance(common_name, bytes):
        common_name = common_name.decode("utf-8", "replace")
    return PeerCertificate(uris=tuple(uris), dns=tuple(dns), common_name=common_name)


def origin_of(context: Any, inbound: str, credential_headers: frozenset[str], *, certificates: bool = True) -> Origin:
    """The ``Origin`` of one gRPC call: the peer address, the invocation metadata whose names are in
    ``credential_headers`` (in order, duplicates kept; grpc hands names lower-case, as HTTP/2 requires)
    and, when ``certificates`` (a TLS listener), the client certificate grpc-core verified against the
    client CA. grpc puts ``x509_pem_cert`` in the auth context only after that verification (a TLS
    listener here either requires and verifies a client certificate or never asks for one), so a
    certificate here is always a verified one."""
    metadata: Iterable[tuple[str, str | bytes]] = context.invocation_metadata() or ()
    # Binary ("-bin") metadata arrives as bytes; a credential is text, so those are not credentials.
    credentials = tuple((key, value) for key, value in metadata if key in credential_headers and isinstance(value, str))
    certificate = None
    if certificates:
        pems = context.auth_context().get("x509_pem_cert")
        if pems:
            certificate = peer_certificate(pems[0])
    origin = Origin(
        inbound=inbound, protocol="grpc", peer=context.peer(), credentials=credentials, certificate=certificate
    )
    for key, value in metadata:  # the call's W3C trace context: the parent of its receive span
        if key == TRACEPARENT and isinstance(value, str):
            origin.traceparent = value
        elif key == TRACESTATE and isinstance(value, str):
            origin.tracestate = value
    return origin


REQUEST_MARGIN_S = 0.05
"""The Request RPC answers DEADLINE_EXCEEDED this long before the call's own deadline."""

REPLY_TYPE = "io.mediator.reply"


class GrpcInbound:
    """The inbound half of a gRPC listener. One per listener at most; the listener's servicer calls it."""

    def __init__(
        self,
        name: str,
        sink: Sink,
        *,
        stream_max_in_flight: int,
        credential_headers: frozenset[str] = frozenset({"authorization"}),
        certificates: bool = False,
        status: StatusReader | None = None,
        max_wait_s: float = 30.0,
        requests: Requests | None = None,
        request_timeout_s: float = 5.0,
        max_request_timeout_s: float = 30.0,
    ) -> None:
        self.name = name
        self._sink = sink
        self._status = status  # this daemon's own: Publish with "prefer: wait=N" waits on it
        self._max_wait_s = max_wait_s
        self._requests = requests
        self._request_timeout_s = request_timeout_s
        self._max_request_timeout_s = max_request_timeout_s
        self._max_in_flight = stream_max_in_flight
        self._credential_headers = credential_headers
        self._certificates = certificates  # a TLS listener: read the client certificate of each call
        self._log = structlog.get_logger(__name__).bind(inbound=name, protocol="grpc")

    def origin(self, context: Any) -> Origin:
        return origin_of(context, self.name, self._credential_headers, certificates=self._certificates)

    async def publish(self, request: Envelope | Undecodable, context: Any) -> PublishReply:
        """Unary Publish: authenticates the caller (before the request is even validated, so a stranger
        learns nothing about it), then returns the reply once the event is committed, or aborts with the
        mapped status and trailers."""
        origin = self.origin(context)
        try:
            await self._sink.authenticate(origin)
            try:
                env = to_envelope(request, inbound=self.name, method="Publish", received_ns=time.time_ns())
            except Rejected as exc:  # refused here, not by a stage: the sink logs and counts it all the same
                self._sink.refused(origin, exc)
                raise
            duplicates = await self._sink.accept([env], origin)
        except Rejected as exc:
            self._log.debug("envelope.rejected", event_id=request.id, code=exc.code.value, rule=exc.rule)
            await abort(context, status_for(exc.code), exc.reason, rejected_trailers(exc))
        except NotReady as exc:
            await abort(context, not_ready_status(exc), exc.reason, (pushback(exc.retry_after_s),))
        self._log.debug("envelope.accepted", event_id=env.id, size=env.ByteSize())
        reply = PublishReply(id=env.id, duplicate=bool(duplicates))
        wait = self._wait_asked(context)
        if wait is not None and self._status is not None:
            await self._wait(env.id, min(wait, self._max_wait_s), reply, context)
        return reply

    @staticmethod
    def _wait_asked(context: Any) -> float | None:
        for key, value in context.invocation_metadata() or ():
            if key == "prefer" and isinstance(value, str):
                return prefer_wait(value)
        return None

    async def _wait(self, event_id: str, wait_s: float, reply: PublishReply, context: Any) -> None:
        """Metadata ``prefer: wait=N`` (HTTP's ``Prefer: wait``): the reply carries the status once every
        destination confirmed or one was dead-lettered within N s (capped by the listener's max_wait_s);
        otherwise it comes without one. Trailing metadata ``preference-applied`` says the wait was honoured."""
        status = self._status
        assert status is not None
        outcome = await status.wait(event_id, wait_s)
        if outcome == "final":
            found = await status.lookup(event_id)
            if found.document is not None:
                reply.status.CopyFrom(to_message(found.document))
        if outcome in ("final", "timeout"):
            context.set_trailing_metadata((("preference-applied", applied(wait_s)),))

    async def request(self, request: Envelope | Undecodable, context: Any) -> Envelope:
        """Unary Request: like Publish up to the routing, then the consumer's reply as an envelope (see
        service.proto). The timeout is the call's own deadline (answered ``REQUEST_MARGIN_S`` before it, so
        the caller reads our DEADLINE_EXCEEDED and the waiter is gone by then), capped by
        ``max_request_timeout_s``; ``request_timeout_s`` for a call without one."""
        origin = self.origin(context)
        remaining = context.time_remaining()
        timeout_s = (
            self._request_timeout_s
            if remaining is None
            else max(0.001, min(self._max_request_timeout_s, remaining - REQUEST_MARGIN_S))
        )
        try:
            await self._sink.authenticate(origin)
            try:
                env = to_envelope(request, inbound=self.name, method="Request", received_ns=time.time_ns())
            except Rejected as exc:
                self._sink.refused(origin, exc)
                raise
            if self._requests is None:
                raise NotReady("request-reply is not available in this process")
            reply = await self._requests.request(env, origin, timeout_s)
        except Rejected as exc:
            await abort(context, status_for(exc.code), exc.reason, rejected_trailers(exc))
        except NotReady as exc:
            await abort(context, not_ready_status(exc), exc.reason, (pushback(exc.retry_after_s),))
        except RequestTimeout as exc:
            await abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, exc.reason)
        except RequestUndeliverable as exc:
            code = grpc.StatusCode.UNAVAILABLE if exc.retryable else grpc.StatusCode.FAILED_PRECONDITION
            await abort(context, code, exc.reason)
        if reply.error:
            await abort(context, grpc.StatusCode.UNKNOWN, reply.body.decode("utf-8", "replace")[:4096])
        out = Envelope(id=env.id, source=env.source, spec_version=SPEC_VERSION, type=REPLY_TYPE)
        out.binary_data = reply.body
        if reply.content_type:
            out.attributes["datacontenttype"].ce_string = reply.content_type
        return out

    async def publish_stream(self, context: Any) -> None:
        """Bidirectional PublishStream: one PublishAck per event, in the order the events came.

        A reader takes events off the stream while the previous ones commit; what it read meanwhile is
        committed next, as one batch (one outbox operation), so the per-event cost shrinks as the rate
        grows and a lone event still goes through at once. At most ``stream_max_in_flight`` events await
        their ack; when that many are pending the reader stops reading, so HTTP/2 flow control pushes back
        on the client. A refused event gets a non-zero ack and the stream goes on. Cancellation (the client
        went away) abandons the pending accepts without acknowledging them.

        The caller is authenticated once, before anything is read: a refusal aborts the whole call with
        the mapped status; otherwise every batch of the stream reuses the same ``Origin`` (and so the
        principal cached on it).
        """
        origin = self.origin(context)
        try:
            await self._sink.authenticate(origin)
        except Rejected as exc:
            self._log.debug("stream.rejected", code=exc.code.value, rule=exc.rule)
            await abort(context, status_for(exc.code), exc.reason, rejected_trailers(exc))
        except NotReady as exc:
            await abort(context, not_ready_status(exc), exc.reason, (pushback(exc.retry_after_s),))
        slots = asyncio.Semaphore(self._max_in_flight)
        # Unbounded on purpose: every item holds a slot of ``slots``, so neither exceeds max_in_flight + 1.
        incoming: deque[PublishAck | tuple[Envelope, int] | None] = deque()
        arrived = asyncio.Event()
        acks: asyncio.Queue[PublishAck | None] = asyncio.Queue()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                self._read(context, origin, slots, incoming, arrived), name=f"inbound:{self.name}:stream-reader"
            )
            tg.create_task(self._commit(origin, incoming, arrived, acks), name=f"inbound:{self.name}:stream-commits")
            while (ack := await acks.get()) is not None:
                await context.write(ack)
                slots.release()

    async def _read(
        self,
        context: Any,
        origin: Origin,
        slots: asyncio.Semaphore,
        incoming: deque[PublishAck | tuple[Envelope, int] | None],
        arrived: asyncio.Event,
    ) -> None:
        sequence = 0
        while True:
            await slots.acquire()  # before reading: a full window stops the reads, not just the accepts
            request = await context.read()
            if request is grpc.aio.EOF:
                break
            try:
                env = to_envelope(request, inbound=self.name, method="PublishStream", received_ns=time.time_ns())
            except Rejected as exc:
                self._sink.refused(origin, exc)
                code = code_number(status_for(exc.code))
                incoming.append(PublishAck(id=request.id, code=code, reason=exc.reason, sequence=sequence))
            else:
                incoming.append((env, sequence))
            arrived.set()
            sequence += 1
        incoming.append(None)
        arrived.set()
        self._log.debug("stream.closed", events=sequence)

    async def _commit(
        self,
        origin: Origin,
        incoming: deque[PublishAck | tuple[Envelope, int] | None],
        arrived: asyncio.Event,
        acks: asyncio.Queue[PublishAck | None],
    ) -> None:
        """Commit whatever the reader has queued, as one batch, then queue the acks in stream order."""
        while True:
            while not incoming:
                arrived.clear()
                await arrived.wait()
            batch = list(incoming)
            incoming.clear()
            events = [item for item in batch if isinstance(item, tuple)]
            duplicates: set[str] = set()
            outcome = await self._accept_all([env for env, _ in events], origin, duplicates) if events else {}
            for item in batch:
                if item is None:
                    acks.put_nowait(None)
                    return
                if isinstance(item, PublishAck):
                    acks.put_nowait(item)
                    continue
                env, sequence = item
                code, reason = outcome.get(id(env), (0, ""))
                duplicate = not code and env.id in duplicates
                acks.put_nowait(PublishAck(id=env.id, code=code, reason=reason, sequence=sequence, duplicate=duplicate))

    async def _accept_all(
        self, events: list[Envelope], origin: Origin, duplicates: set[str]
    ) -> dict[int, tuple[int, str]]:
        """Accept ``events`` together; the (code, reason) of each refused one, by ``id()`` of its envelope.
        A refusal of the whole batch by a stage is retried event by event, so only the refused ones say so.
        The ids the sink reports as duplicates are added to ``duplicates``."""
        try:
            duplicated = await self._sink.accept(events, origin)
        except Rejected as exc:
            if len(events) > 1:
                refused: dict[int, tuple[int, str]] = {}
                for env in events:
                    refused.update(await self._accept_all([env], origin, duplicates))
                return refused
            return {id(events[0]): (code_number(status_for(exc.code)), exc.reason)}
        except NotReady as exc:
            code = code_number(not_ready_status(exc))
            return {id(env): (code, exc.reason) for env in events}
        if duplicated:
            duplicates.update(duplicated)
        return {}
