"""NATS inbound: core subscriptions (at most once, as core NATS is) or a JetStream durable pull consumer
(acknowledged only once the events are committed).

JetStream: one loop fetches up to ``max_ack_pending`` messages (no more than ``[outbox] max_pending``, and
the consumer's own ``max_ack_pending`` says the same to the server: back-pressure reaches the stream),
commits them as one ``sink.accept``, then settles each:

- accepted (or a duplicate): ``ack``.
- ``NotReady``: ``nak`` with a delay (the sink's retry-after, at most ``nak_delay_max_s``): the server
  redelivers it then.
- undecodable, or refused by a stage: ``sink.dead_letter`` then ``term`` (never redelivered). A batch a
  stage refused is retried message by message, so only the refused ones are dead-lettered.
- delivered ``dead_letter_after`` times already (each earlier delivery ended in a crash, a timeout or a
  nak): dead-lettered and termed before it is tried again, so a message that kills the daemon cannot loop.
- cancelled or the connection lost: not settled; the server redelivers after ``ack_wait_s`` and the event
  id deduplicates. The delivery count is the envelope's ``provenance.deliveries``.

Core NATS: a message goes to the sink as it comes, in batches of what queued while the previous commit
ran; while the sink is not ready the batch is held and tried again, and further messages wait in a
bounded queue, then in nats-py's (beyond its limits the server's slow-consumer handling drops them: core
NATS has no redelivery). ``queue_group`` shares the subjects among competing consumers.

Request mode (core NATS): a message with a reply subject is a request (``Runtime.requests``); the reply
goes to that subject with ``Content-Type``, and for anything but a reply the headers ``mediator-error:
true`` and ``mediator-status`` (the HTTP status the outcome gets), the reason as body. A message without a
reply subject is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError

from adapters.nats.codec import NatsMessage, to_envelope, undecodable
from adapters.nats.config import NatsInboundConfig
from adapters.nats.connection import Backoff, BrokerAccess, NatsLink, declare_streams, stream_exists
from mediator.core.deadletter import REJECTED_PREFIX, UNDECODABLE_PREFIX
from mediator.core.envelope import Envelope
from mediator.core.errors import NotReady, Rejected, RequestTimeout, RequestUndeliverable
from mediator.core.ingress import Origin
from mediator.core.seams import Reply, Runtime

FETCH_WAIT_S = 1.0  # a fetch with nothing to take returns after it, so a lost connection is noticed
ERROR_PAUSE_S = 1.0
HOLD_INITIAL_S, HOLD_MAX_S = 0.05, 2.0
ERROR_HEADER, STATUS_HEADER = "mediator-error", "mediator-status"
_REFUSED_STATUS = {"unauthenticated": "401", "forbidden": "403", "too_large": "413", "rate_limited": "429"}
_REFUSED_STATUS |= {"unprocessable": "422", "unsupported_media": "415"}


def _headers(msg: Msg) -> dict[str, str]:
    return msg.headers or {}


class NatsInbound(NatsLink):
    role = "inbound"

    def __init__(self, name: str, cfg: NatsInboundConfig, broker: BrokerAccess, rt: Runtime) -> None:
        super().__init__(name, broker, rt.health)
        self.cfg = cfg
        self.rt = rt
        self.sink = rt.sink
        self.window = rt.window(cfg.max_ack_pending)
        self.durable = cfg.durable_name(name)
        self._origin = Origin(inbound=name, protocol="nats", broker=True)
        self._queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=self.window)
        self._requests = asyncio.Semaphore(cfg.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._pull: JetStreamContext.PullSubscription | None = None

    # -- set-up -----------------------------------------------------------------------------------------

    async def _setup(self, nc: Client) -> None:
        cfg = self.cfg
        if cfg.jetstream:
            assert cfg.stream is not None
            js = nc.jetstream()
            await self._declare(js)
            config = ConsumerConfig(
                durable_name=self.durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                max_ack_pending=self.window,
                ack_wait=cfg.ack_wait_s,
                max_deliver=-1,  # never dropped by the server: poison is dead-lettered here (dead_letter_after)
            )
            if len(cfg.subjects) == 1:
                config.filter_subject = cfg.subjects[0]
            else:
                config.filter_subjects = list(cfg.subjects)  # NATS 2.10+
            try:
                await js.add_consumer(cfg.stream, config)  # creates it, or updates what the server lets change
            except BadRequestError as exc:
                self.log.warning("inbound.consumer_not_updated", durable=self.durable, error=exc.description)
            self._pull = await js.pull_subscribe_bind(
                durable=self.durable, stream=cfg.stream, pending_msgs_limit=self.window * 2
            )
            return
        handler = self._on_request if cfg.request else self._on_message
        self._subs = [
            await nc.subscribe(subject, queue=cfg.queue_group or "", cb=handler, pending_msgs_limit=self.window * 4)
            for subject in cfg.subjects
        ]

    async def _declare(self, js: JetStreamContext) -> None:
        cfg, broker = self.cfg, self.broker.config
        assert cfg.stream is not None
        declared = broker.stream(cfg.stream)
        if declared is not None:
            await declare_streams(js, (declared,))
        elif not await stream_exists(js, cfg.stream):
            raise LookupError(
                f"stream {cfg.stream!r} does not exist: create it, or declare it in "
                f"[[brokers.{self.broker.name}.streams]]"
            )

    async def _restored(self, nc: Client) -> None:
        if self.cfg.jetstream:  # a server that lost its store lost the stream and the consumer too
            await self._setup(nc)

    # -- serving ----------------------------------------------------------------------------------------

    async def _serve(self, nc: Client) -> None:
        try:
            if self.cfg.jetstream:
                await self._fetch_loop(nc)
            elif self.cfg.request:
                await self._closed.wait()
            else:
                committer = asyncio.create_task(self._commit_loop(), name=f"{self.component}:commits")
                try:
                    await self._closed.wait()
                finally:
                    committer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await committer
        finally:
            for task in list(self._tasks):
                task.cancel()
            self._subs, self._pull = [], None

    async def _fetch_loop(self, nc: Client) -> None:
        while not self._closed.is_set():
            pull = self._pull
            if pull is None:
                raise ConnectionClosedError()
            try:
                msgs = await pull.fetch(self.window, timeout=FETCH_WAIT_S)
            except NatsTimeoutError:
                continue
            except ConnectionClosedError:
                return
            except Exception as exc:  # reconnecting, or a server error: wait, then fetch again
                if self._closed.is_set():
                    return
                self.log.debug("inbound.fetch_failed", error=repr(exc))
                await asyncio.sleep(min(ERROR_PAUSE_S, self.broker.config.reconnect_wait_s))
                continue
            try:
                await self._commit_js(msgs)
            except Exception as exc:  # a bug: leave them unsettled (redelivered after ack_wait)
                self.log.error("inbound.batch_failed", messages=len(msgs), error=repr(exc), exc_info=exc)
                await asyncio.sleep(ERROR_PAUSE_S)

    def _message(self, msg: Msg, deliveries: int = 0) -> NatsMessage:
        return NatsMessage(data=msg.data, subject=msg.subject, headers=_headers(msg), deliveries=deliveries)

    def _decode(self, message: NatsMessage) -> Envelope:
        cfg = self.cfg
        return to_envelope(
            message, inbound=self.admin_name, type_template=cfg.type, source_template=cfg.source, decode=cfg.decode
        )

    async def _commit_js(self, msgs: Sequence[Msg]) -> None:
        decoded: list[tuple[Msg, Envelope]] = []
        for msg in msgs:
            deliveries = msg.metadata.num_delivered
            message = self._message(msg, deliveries)
            try:
                env = self._decode(message)
            except Exception as exc:  # Rejected, or a decoder bug: either way it must not loop
                reason = exc.reason if isinstance(exc, Rejected) else f"cannot decode: {exc!r}"
                await self._dead_letter(msg, undecodable(message, self.admin_name), f"{UNDECODABLE_PREFIX}{reason}")
                continue
            if deliveries >= self.cfg.dead_letter_after:
                # The ingress class: the gateway refuses it (it never got through a commit).
                reason = f"{REJECTED_PREFIX}delivered {deliveries} times by the stream without a commit"
                await self._dead_letter(msg, env, reason)
                continue
            self.log.debug("envelope.received", event_id=env.id, size=len(msg.data), subject=msg.subject)
            decoded.append((msg, env))
        await self._accept_js(decoded)

    async def _accept_js(self, decoded: list[tuple[Msg, Envelope]]) -> None:
        if not decoded:
            return
        try:
            await self.sink.accept([env for _, env in decoded], self._origin)
        except NotReady as exc:
            await self._nak([msg for msg, _ in decoded], exc)
            return
        except Rejected as exc:
            if len(decoded) > 1:
                for item in decoded:
                    await self._accept_js([item])
                return
            msg, env = decoded[0]
            await self._dead_letter(msg, env, f"{REJECTED_PREFIX}{exc}")
            return
        for msg, _ in decoded:
            await self._settle(msg.ack)

    async def _dead_letter(self, msg: Msg, env: Envelope, reason: str) -> None:
        try:
            await self.sink.dead_letter(env, reason)
        except NotReady as exc:
            await self._nak([msg], exc)
            return
        self.log.error("envelope.dead_lettered", event_id=env.id, size=len(msg.data), reason=reason)
        await self._settle(msg.term)

    async def _nak(self, msgs: list[Msg], exc: NotReady) -> None:
        delay = min(max(exc.retry_after_s, 0.1), self.cfg.nak_delay_max_s)
        self.log.debug("envelope.nak", messages=len(msgs), reason=exc.reason, delay_s=delay)
        for msg in msgs:
            await self._settle(msg.nak, delay)

    async def _settle(self, call: Any, *args: Any) -> None:
        try:
            await call(*args)
        except Exception as exc:  # connection lost: the server redelivers; the id deduplicates
            self.log.warning("delivery.settle_failed", error=repr(exc))

    # -- core NATS --------------------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        await self._queue.put(msg)  # while it is full, nats-py's own bounded queue holds what comes

    async def _commit_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < self.window:
                batch.append(self._queue.get_nowait())
            events: list[Envelope] = []
            for msg in batch:
                message = self._message(msg)
                try:
                    events.append(self._decode(message))
                except Exception as exc:
                    reason = exc.reason if isinstance(exc, Rejected) else f"cannot decode: {exc!r}"
                    dead = undecodable(message, self.admin_name)
                    await self._hold(self.sink.dead_letter, dead, f"{UNDECODABLE_PREFIX}{reason}")
            if events:
                await self._hold(self._accept_core, events)

    async def _accept_core(self, events: list[Envelope]) -> None:
        try:
            await self.sink.accept(events, self._origin)
        except Rejected as exc:
            if len(events) > 1:
                while events:  # settled ones leave the list: a NotReady half-way retries only the rest
                    await self._accept_core(events[:1])
                    del events[0]
                return
            self.log.error("envelope.rejected", event_id=events[0].id, reason=exc.reason)
            await self.sink.dead_letter(events[0], f"{REJECTED_PREFIX}{exc}")

    async def _hold(self, call: Any, *args: Any) -> None:
        """Await ``call`` until it succeeds: core NATS will not send the messages again."""
        backoff = Backoff(HOLD_INITIAL_S, HOLD_MAX_S)
        while True:
            try:
                await call(*args)
                return
            except NotReady as exc:
                delay = max(backoff.next(), min(exc.retry_after_s, HOLD_MAX_S))
                self.log.debug("envelope.deferred", reason=exc.reason, retry_in_s=round(delay, 2))
            except Exception as exc:
                delay = backoff.next()
                self.log.exception("envelope.failed", reason=repr(exc))
            await asyncio.sleep(delay)

    # -- request mode -----------------------------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        message = self._message(msg)
        try:
            env = self._decode(message)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, Rejected) else f"cannot decode: {exc!r}"
            if msg.reply:
                await self._reply(msg, Reply(reason.encode("utf-8")), "400")
            else:
                dead = undecodable(message, self.admin_name)
                await self._hold(self.sink.dead_letter, dead, f"{UNDECODABLE_PREFIX}{reason}")
            return
        if not msg.reply:
            await self._hold(self.sink.dead_letter, env, f"{REJECTED_PREFIX}a request needs a reply subject")
            return
        await self._requests.acquire()  # bounded; released when the reply is sent
        task = asyncio.create_task(self._request(msg, env), name=f"{self.component}:request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, msg: Msg, env: Envelope) -> None:
        try:
            status = ""
            try:
                requests = self.rt.requests
                if requests is None:
                    raise NotReady("request-reply is not available in this process")
                reply = await requests.request(env, self._origin, self.cfg.request_timeout_s)
                if reply.error:
                    status = "502"
            except Rejected as exc:
                status = _REFUSED_STATUS.get(exc.code.value, "400")
                reply = Reply(f"{exc.code.value}: {exc.reason}".encode())
            except RequestTimeout as exc:
                status, reply = "504", Reply(exc.reason.encode())
            except RequestUndeliverable as exc:
                status, reply = ("503" if exc.retryable else "502"), Reply(exc.reason.encode())
            except NotReady as exc:
                status, reply = "503", Reply(exc.reason.encode())
            await self._reply(msg, reply, status)
        finally:
            self._requests.release()

    async def _reply(self, msg: Msg, reply: Reply, status: str) -> None:
        headers: dict[str, str] = {}
        if reply.content_type:
            headers["Content-Type"] = reply.content_type
        if status:
            headers[ERROR_HEADER], headers[STATUS_HEADER] = "true", status
        nc = self.nc
        try:
            if nc is None:
                raise ConnectionClosedError()
            await nc.publish(msg.reply, reply.body, headers=headers or None)
        except Exception as exc:
            self.log.warning("reply.unsent", reason=repr(exc))
