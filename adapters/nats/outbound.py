"""Publish to NATS subjects: confirmed by the server (core NATS) or by the stream (JetStream).

Core NATS: ``send`` publishes, then waits for a PING sent after it to be answered (the server has read
everything before it). The sends of one loop iteration share one PING, so many in flight cost one round
trip. Core NATS drops a message no one subscribes to: that is all it can confirm.

JetStream: ``send`` returns when the stream's ack says it stored the message. ``Nats-Msg-Id`` is the event
id, so a publish retried after a lost ack (or a replay) is dropped by the stream's duplicate window
instead of stored twice (the ack then says ``duplicate``, a success). A subject no stream stores
(no responders) is a terminal failure, as an unroutable AMQP message is; a stream that is not the
configured ``stream`` (``Nats-Expected-Stream``) or a message over the server's max payload too; a
timeout, a lost connection or a JetStream 503 is retried.

Request-reply (``send_request``, core NATS): the request's reply subject is ``<inbox>.<correlation id>``
on this connection's own inbox, to which it subscribes at connect. No-one subscribed to the subject means
a 503 no-responders status on that subject (nats-py sends ``no_responders`` in CONNECT), which is
answered at once as undeliverable for now (HTTP 503: a responder may be starting); anything else there
is the reply, its ``mediator-error: true`` header marking the consumer's error. ``send_request`` returns
once the first message for its correlation id came (the pipeline bounds the wait): core NATS has no expiry
for a request in flight, and none is needed, since a request is never stored: a responder that comes
later never sees it.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, MaxPayloadError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from adapters.nats.codec import MSG_ID, from_envelope
from adapters.nats.config import NatsOutboundConfig, subject_problem
from adapters.nats.connection import BrokerAccess, NatsLink, declare_streams, stream_exists
from mediator.core.deadletter import UNROUTABLE_PREFIX
from mediator.core.envelope import Envelope
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.seams import Replies, Reply
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE, outgoing

ERROR_HEADER = "mediator-error"
EXPECTED_STREAM = "Nats-Expected-Stream"
NO_RESPONDERS = "503"


class NatsOutboundLink(NatsLink):
    """The ``Service`` that keeps an outbound's connection, its streams and its reply inbox up."""

    role = "outbound"

    def __init__(
        self, name: str, cfg: NatsOutboundConfig, broker: BrokerAccess, health: Health, replies: Replies | None
    ) -> None:
        super().__init__(name, broker, health)
        self.cfg = cfg
        self.replies = replies if cfg.requests else None
        self.inbox = ""
        self.awaiting: dict[str, asyncio.Future[None]] = {}  # correlation id -> its first message came

    async def _setup(self, nc: Client) -> None:
        await self._streams(nc)
        if self.replies is not None:
            self.inbox = nc.new_inbox()
            await nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)

    async def _streams(self, nc: Client) -> None:
        """Declare the streams it publishes to (all its broker declares when it names none), or check that
        the one it names exists."""
        cfg, broker = self.cfg, self.broker.config
        if cfg.jetstream:
            js = nc.jetstream()
            if cfg.stream is None:
                await declare_streams(js, broker.streams)
            elif (declared := broker.stream(cfg.stream)) is not None:
                await declare_streams(js, (declared,))
            elif not await stream_exists(js, cfg.stream):
                raise LookupError(
                    f"stream {cfg.stream!r} does not exist: create it, or declare it in "
                    f"[[brokers.{self.broker.name}.streams]]"
                )

    async def _restored(self, nc: Client) -> None:
        await self._streams(nc)  # a server that lost its store lost the streams too

    async def _on_reply(self, msg: Msg) -> None:
        correlation_id = msg.subject.rpartition(".")[2]
        headers = msg.headers or {}
        waiting = self.awaiting.get(correlation_id)
        if headers.get("Status") == NO_RESPONDERS and not msg.data:
            if waiting is not None and not waiting.done():
                # Retryable: a responder that is starting or restarting is the usual cause (HTTP 503).
                waiting.set_exception(RetryableDeliveryError("no responder on the subject (NATS 503)"))
            return
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        assert self.replies is not None
        error = headers.get(ERROR_HEADER, "").strip().lower() in ("true", "1", "yes")
        content_type = headers.get("Content-Type") or None
        self.replies.resolve(correlation_id, Reply(msg.data, content_type, error))


class NatsOutbound:
    """The ``Outbound`` the dispatcher sends through; ``link`` is the service to run beside it."""

    def __init__(
        self, name: str, cfg: NatsOutboundConfig, broker: BrokerAccess, health: Health, replies: Replies | None = None
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.max_in_flight = cfg.max_in_flight
        self.link = NatsOutboundLink(name, cfg, broker, health, replies)
        self.log = self.link.log
        self._flush: asyncio.Future[None] | None = None
        self._pings: set[asyncio.Task[None]] = set()

    def request_refusal(self) -> str | None:
        refusal = self.cfg.request_refusal()
        if refusal is None and self.link.replies is None:
            return "request-reply is not available in this process"
        return refusal

    async def send(self, event: Envelope, address: str, format: str) -> None:
        nc, data, headers = self._prepare(event, address, format)
        if self.cfg.jetstream:
            await self._publish_js(nc, event, address, data, headers)
            return
        try:
            await nc.publish(address, data, headers=headers)
            await self._confirmed(nc)
        except (MaxPayloadError, ValueError) as exc:
            raise TerminalDeliveryError(f"the server refuses it: {exc!r}") from exc
        except (NatsError, OSError) as exc:
            raise RetryableDeliveryError(f"publish not confirmed: {exc!r}") from exc
        self.log.debug("delivery.confirmed", event_id=event.id, subject=address, size=len(data))

    async def send_request(
        self, event: Envelope, address: str, format: str, correlation_id: str, timeout_s: float
    ) -> None:
        link = self.link
        nc, data, headers = self._prepare(event, address, format)
        if link.replies is None or not link.inbox:
            raise RetryableDeliveryError("request-reply is not set up on this connection")
        came: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link.awaiting[correlation_id] = came
        try:
            try:
                await nc.publish(address, data, reply=f"{link.inbox}.{correlation_id}", headers=headers)
            except (MaxPayloadError, ValueError) as exc:
                raise TerminalDeliveryError(f"the server refuses it: {exc!r}") from exc
            except (NatsError, OSError) as exc:
                raise RetryableDeliveryError(f"request not sent: {exc!r}") from exc
            async with asyncio.timeout(timeout_s):
                await came
        except TimeoutError:
            return  # no message at all: the pipeline's own deadline answers 504
        finally:
            link.awaiting.pop(correlation_id, None)

    def _prepare(self, event: Envelope, address: str, format: str) -> tuple[Client, bytes, dict[str, str]]:
        nc = self.link.nc
        if nc is None or not self.link.up:
            raise RetryableDeliveryError(f"outbound {self.name!r} is not connected to its server")
        problem = subject_problem(address, wildcards=False)
        if problem is not None:
            raise TerminalDeliveryError(f"{UNROUTABLE_PREFIX}{problem}")
        try:
            out = from_envelope(event, format or self.cfg.format)
        except ValueError as exc:
            raise TerminalDeliveryError(str(exc)) from exc
        headers = dict(out.headers)
        hop = outgoing()
        if hop is not None:  # tracing on: the send span is the consumer's parent (ce-traceparent: the event's)
            headers[TRACEPARENT] = hop[0]
            if hop[1]:
                headers[TRACESTATE] = hop[1]
        return nc, out.data, headers

    async def _publish_js(
        self, nc: Client, event: Envelope, address: str, data: bytes, headers: dict[str, str]
    ) -> None:
        headers[MSG_ID] = event.id
        if self.cfg.stream is not None:
            headers[EXPECTED_STREAM] = self.cfg.stream
        js = nc.jetstream()
        try:
            ack = await js.publish(address, data, timeout=self.cfg.send_timeout_s, headers=headers)
        except NoStreamResponseError as exc:
            raise TerminalDeliveryError(f"{UNROUTABLE_PREFIX}no JetStream stream stores subject {address!r}") from exc
        except APIError as exc:
            if exc.code == 503 or (exc.code or 0) >= 500:
                raise RetryableDeliveryError(f"JetStream cannot store it now: {exc.description}") from exc
            raise TerminalDeliveryError(f"JetStream refused it: {exc.description} (code {exc.code})") from exc
        except MaxPayloadError as exc:
            raise TerminalDeliveryError(f"the server refuses it: {exc!r}") from exc
        except (NatsTimeoutError, TimeoutError) as exc:
            raise RetryableDeliveryError(f"no JetStream ack within {self.cfg.send_timeout_s} s") from exc
        except (NatsError, OSError) as exc:
            raise RetryableDeliveryError(f"publish failed: {exc!r}") from exc
        self.log.debug(
            "delivery.confirmed",
            event_id=event.id,
            subject=address,
            stream=ack.stream,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
        )

    async def _confirmed(self, nc: Client) -> None:
        """Wait for a PING sent after our publish to be answered; sends of one loop iteration share it."""
        flush = self._flush
        if flush is None:
            flush = self._flush = asyncio.get_running_loop().create_future()
            task = asyncio.get_running_loop().create_task(self._ping(nc, flush))
            self._pings.add(task)
            task.add_done_callback(self._pings.discard)
        await asyncio.shield(flush)

    async def _ping(self, nc: Client, flush: asyncio.Future[None]) -> None:
        await asyncio.sleep(0)  # the other sends of this iteration publish first
        self._flush = None
        try:
            await nc.flush(timeout=self.cfg.send_timeout_s)  # type: ignore[arg-type]  # a float is used as it is
        except BaseException as exc:
            if not flush.done():
                flush.set_exception(exc if isinstance(exc, Exception) else ConnectionClosedError())
            flush.exception()  # retrieved: no "never retrieved" warning when every sender was cancelled
            if not isinstance(exc, Exception):
                raise
            return
        flush.set_result(None)


__all__ = ["NatsOutbound", "NatsOutboundLink"]
