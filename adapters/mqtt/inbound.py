"""MQTT inbound: subscribe, turn each message into events, acknowledge only once they are safe.

aiomqtt 2.x acknowledges QoS 1 messages as soon as it queues them, before we run, so a crash would lose
them. We switch the wrapped paho client to manual acknowledgement and send each PUBACK after
``sink.accept`` returned. Messages are processed concurrently (up to ``max_in_flight``), but MQTT
requires PUBACKs in the order the PUBLISHes arrived (MQTT 5 section 4.6), so one task acknowledges
them strictly in receive order. The session is persistent under a fixed client id: what we never
acknowledged is redelivered after a reconnect or a restart.

Under load, messages queue up in aiomqtt while a commit runs; they are then taken together, as one batch
with one commit (one task, one outbox operation) instead of one each: the per-message overhead shrinks
exactly when the daemon is busy, and a lone message still goes through at once.

Request mode (``request = true``, MQTT 5): a message carrying a Response Topic is a request
(``Runtime.requests``); the reply is published to that topic with the same Correlation Data (when it had some:
it is optional, and mosquitto_rr sends none), its Content Type, and for anything but a reply the user
properties ``mediator-error: true`` and ``mediator-status`` (the HTTP status the same outcome gets: 502 the
consumer's error, 504 no reply in time, 502/503 undeliverable, 4xx refused by a stage), the payload then the
reason as text. A request is acknowledged once it is taken, before its reply: redelivered after a reconnect it
would be acted on twice, after its requester stopped waiting. A message without a Response Topic is
dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes

from adapters.mqtt.brokerinfo import TOPICS as SYS_TOPICS
from adapters.mqtt.brokerinfo import BrokerInfo, wanted
from adapters.mqtt.codec import InboundRules, MqttMessage, to_envelope, undecodable, user_properties
from adapters.mqtt.config import MqttDrainSessionConfig, MqttInboundConfig
from adapters.mqtt.connection import (
    Backoff,
    BrokerAccess,
    make_client,
    paho_client,
    properties,
    stop_if_cancelled,
)
from mediator.core.deadletter import REJECTED_PREFIX, UNDECODABLE_PREFIX
from mediator.core.envelope import Envelope
from mediator.core.errors import NotReady, RejectCode, Rejected, RequestTimeout, RequestUndeliverable
from mediator.core.ingress import Origin
from mediator.core.seams import Reply, Runtime

# Retrying a commit the sink refused with NotReady; the broker keeps the message meanwhile.
_RETRY_INITIAL_S = 0.05
_RETRY_MAX_S = 5.0
# What a burst may wait in, read off the socket before it is parsed (see connection._BufferedSocket):
# beyond it the kernel's buffers and then the broker's hold the rest.
READ_AHEAD_BYTES = 64 * 1024 * 1024


DRAIN_QUIET_S = 2.0
"""A drained session is deleted once no message came for this long (see ``MqttInbound._drain_session``):
the broker sends what a session holds as soon as it connects, as fast as the acknowledgements let it."""


def wire_message(message: aiomqtt.Message) -> MqttMessage:
    """What the binding reads of one PUBLISH (``fuzz/targets.py`` decodes fuzzed properties through this too)."""
    props = message.properties
    payload = message.payload
    return MqttMessage(
        topic=message.topic.value,
        payload=payload if isinstance(payload, bytes) else str(payload or "").encode(),
        content_type=getattr(props, "ContentType", None) if props is not None else None,
        user_properties=user_properties(getattr(props, "UserProperty", None)) if props is not None else (),
    )


async def _idle_ending(
    messages: AsyncIterator[aiomqtt.Message], idle_s: float, settled: Callable[[], bool]
) -> AsyncIterator[aiomqtt.Message]:
    """``messages`` until none came for ``idle_s`` while ``settled()`` (every one acknowledged). The wait
    for the next one is never cancelled while a message may be in it: a message taken off aiomqtt's queue
    by a cancelled wait would be lost, and its session deleted with it unacknowledged."""
    pending = asyncio.ensure_future(anext(messages))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=idle_s)
            if not done:
                if not settled() or not pending.cancel():
                    continue  # still acknowledging, or a message came just now
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
                return
            yield pending.result()
            pending = asyncio.ensure_future(anext(messages))
    finally:
        pending.cancel()


def _watch_session_present(client: aiomqtt.Client, present: list[bool]) -> None:
    """Append to ``present`` the CONNACK's Session Present flag (aiomqtt does not keep it)."""
    paho = paho_client(client)
    on_connect: Callable[..., None] | None = paho.on_connect

    def wrapped(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        present.append(bool(getattr(flags, "session_present", False)))
        if on_connect is not None:
            on_connect(c, userdata, flags, reason_code, properties)

    paho.on_connect = wrapped


_REFUSED_STATUS = {RejectCode.UNAUTHENTICATED: "401", RejectCode.FORBIDDEN: "403", RejectCode.TOO_LARGE: "413"}
_REFUSED_STATUS |= {RejectCode.RATE_LIMITED: "429", RejectCode.UNPROCESSABLE: "422"}


class SubscriptionRefused(Exception):
    """The broker refused one of the topic filters (SUBACK reason code >= 0x80)."""


class MqttInbound:
    """One subscription client; a ``Service``."""

    def __init__(self, name: str, cfg: MqttInboundConfig, access: BrokerAccess, rt: Runtime) -> None:
        self.name = f"inbound:{name}"
        self.inbound = name
        self.client_id = f"{access.config.client_id}-{name}"
        self._cfg = cfg
        self._access = access
        self._rt = rt
        self._rules = InboundRules(
            inbound=name, type=cfg.type, source=cfg.source, content_type=cfg.content_type, decode=cfg.decode
        )
        self._qos = min(cfg.qos, 1)  # see MqttInboundConfig: QoS 2 is received as QoS 1
        # More unacknowledged messages than the outbox takes would only wait in our memory instead.
        self.receive_maximum = rt.window(cfg.receive_maximum)
        self._log = structlog.get_logger(__name__).bind(inbound=name, protocol="mqtt")
        # The broker authenticated the publishers; what it vouches for is per message (a topic segment).
        self._origin = Origin(inbound=name, protocol="mqtt", broker=True)
        rt.health.register(self.name)
        # The broker's version and dropped count, where it publishes them on $SYS (adapters/mqtt/brokerinfo.py).
        info_log = self._log.bind(broker=access.name)
        self._info = BrokerInfo(info_log, self._show) if cfg.sys_topics and wanted(cfg.topics) else None
        self._connected = ""
        self._requests_in_flight = asyncio.Semaphore(cfg.max_in_flight)
        self._spawn: Callable[[Coroutine[Any, Any, None]], object] | None = None  # the connection's task group
        self._client_now: aiomqtt.Client | None = None  # the connected client (request mode publishes replies)

    async def run(self) -> None:
        if not self._cfg.drain_sessions:
            await self._serve(None)
            return
        subscribed = asyncio.Event()
        connected = [asyncio.Event() for _ in self._cfg.drain_sessions]
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._serve(subscribed, connected), name=self.name)
            for session, ready in zip(self._cfg.drain_sessions, connected, strict=True):
                coro = self._drain_session(session, ready, subscribed)
                tg.create_task(coro, name=f"{self.name}:drain:{session.client_id}")

    async def _serve(self, subscribed: asyncio.Event | None, drains: list[asyncio.Event] | None = None) -> None:
        """Connect, subscribe and consume, reconnecting with backoff. With sessions to drain, the first
        subscription waits (up to the connect timeout) for their connections, which unsubscribe the moment
        it stands (``subscribed``): see ``_drain_session``."""
        broker = self._access.config
        backoff = Backoff(broker.reconnect_initial_s, broker.reconnect_max_s)
        if self._cfg.qos == 2:
            self._log.warning("inbound.qos_downgraded", configured=2, used=1)
        try:
            while True:
                problem = "disconnected"
                try:
                    client, queue = self._client()
                    async with client:
                        stop_if_cancelled()  # aiomqtt's connect may have swallowed a cancellation
                        backoff.reset()
                        if drains and subscribed is not None and not subscribed.is_set():
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(broker.connect_timeout_s):
                                    await asyncio.gather(*(e.wait() for e in drains))
                        await self._subscribe(client)
                        if subscribed is not None:
                            subscribed.set()
                        self._connected = f"connected to {broker.host}:{broker.port}"
                        self._rt.health.set(self.name, True, self._connected)
                        await self._subscribe_info(client)
                        self._log.info("inbound.connected", broker=self._access.name, client_id=self.client_id)
                        await self._consume(client, queue)
                except* aiomqtt.MqttError as group:
                    problem = str(group.exceptions[0])
                except* SubscriptionRefused as group:
                    problem = str(group.exceptions[0])
                stop_if_cancelled()
                delay = backoff.next()
                self._rt.health.set(self.name, False, problem)
                self._log.warning("inbound.disconnected", reason=problem, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
        finally:
            self._rt.health.set(self.name, False, "stopped")

    async def _drain_session(
        self, session: MqttDrainSessionConfig, connected: asyncio.Event, subscribed: asyncio.Event
    ) -> None:
        """Empty the persistent session ``session`` into this inbound, then delete it (``drain_sessions``).

        Why: the broker keeps queueing for a session nobody connects as any more. Mosquitto hands a shared
        subscription's messages round-robin to its members, offline ones included (measured: with one
        member connected, the offline one was given every other message), and a plain subscription's
        session gets a copy of everything. When ``workers`` changes, the other count's sessions would hold
        messages no one handles (lost at their expiry) or copies of messages already handled (duplicates
        when that count comes back). So each is connected under its own client id, keeping its session,
        unsubscribed at once (nothing new is handed to it; what it holds still comes: measured), its
        messages accepted and acknowledged as this inbound's, and once none came for ``DRAIN_QUIET_S`` with
        every one acknowledged, the session is deleted (a clean connect). A session the broker does not
        have is deleted at once. Retried with the broker's backoff until done; cancellation stops it."""
        broker = self._access.config
        backoff = Backoff(broker.reconnect_initial_s, broker.reconnect_max_s)
        log = self._log.bind(drained_client_id=session.client_id)
        while True:
            try:
                client, queue = self._client(session.client_id)
                present: list[bool] = []
                _watch_session_present(client, present)
                async with client:
                    stop_if_cancelled()
                    connected.set()
                    taken = 0
                    if any(present):
                        # Connected before this inbound subscribes, unsubscribed the moment its subscription
                        # stands: the broker always has someone to hand a new message to, and what it hands
                        # both in between is one round trip's worth (see DRAIN_QUIET_S's neighbours).
                        await subscribed.wait()
                        await client.unsubscribe(list(session.topics))
                        taken = await self._consume(client, queue, idle_s=DRAIN_QUIET_S)
                clean = make_client(
                    self._access, session.client_id, persistent=False, receive_maximum=1, max_inflight=1
                )
                async with clean:  # clean start, no expiry: the broker drops the session
                    stop_if_cancelled()
                log.info("inbound.session_drained", present=any(present), messages=taken)
                return
            except* aiomqtt.MqttError as group:  # a naked one too (the connect's), wrapped
                problem = str(group.exceptions[0])
            stop_if_cancelled()
            delay = backoff.next()
            log.warning("inbound.session_drain_failed", reason=problem, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    def _client(self, client_id: str | None = None) -> tuple[aiomqtt.Client, asyncio.Queue[aiomqtt.Message]]:
        queues: list[asyncio.Queue[aiomqtt.Message]] = []

        class _Queue(asyncio.Queue[aiomqtt.Message]):
            # aiomqtt creates its queue from the class it is given; keeping the instance lets the consumer
            # take what is already queued without aiomqtt's per-message task and asyncio.wait.
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize)
                queues.append(self)

        client = make_client(
            self._access,
            client_id or self.client_id,
            persistent=True,
            receive_maximum=self.receive_maximum,
            max_inflight=20,  # this client does not publish
            queue_type=_Queue,
            read_ahead=READ_AHEAD_BYTES,
        )
        # Must be set before CONNECT: from then on paho leaves every PUBACK to us (paho.ack).
        paho_client(client).manual_ack_set(True)
        return client, queues[0]

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # Always resubscribe: the session may be new (expired, or the broker lost it), and a subscription
        # the config gained since the session was made must be added.
        filters: list[tuple[str, int]] = [(topic, self._qos) for topic in self._cfg.topics]
        granted = await client.subscribe(filters)
        for topic, code in zip(self._cfg.topics, granted, strict=False):
            value: int = code if isinstance(code, int) else getattr(code, "value", 0x80)
            if value >= 0x80:
                raise SubscriptionRefused(f"broker refused subscription {topic!r}: {code}")

    async def _subscribe_info(self, client: aiomqtt.Client) -> None:
        if self._info is None:
            return
        self._info.connected()
        granted = await client.subscribe([(topic, 0) for topic in SYS_TOPICS])
        if any(getattr(code, "value", code) >= 0x80 for code in granted):
            self._log.debug("inbound.sys_refused", topics=SYS_TOPICS)  # a broker without them, or an ACL

    def _show(self) -> None:
        """The connection's detail for /readyz, with what the broker said on $SYS."""
        if self._info is not None and self._rt.health.is_ready(self.name):
            extra = self._info.detail()
            self._rt.health.set(self.name, True, f"{self._connected}; {extra}" if extra else self._connected)

    async def _consume(
        self, client: aiomqtt.Client, queue: asyncio.Queue[aiomqtt.Message], idle_s: float | None = None
    ) -> int:
        """Receive until the connection drops (raises ``aiomqtt.MqttError``) or we are cancelled; with
        ``idle_s``, also return (the number of messages taken) once none came for ``idle_s`` and every one
        taken was acknowledged.

        Handlers of one connection die with it: their messages were not acknowledged, so the broker
        redelivers them on the next connection (a commit that did complete becomes a duplicate, which the
        event id deduplicates for CloudEvents). At most ``max_in_flight`` messages are being handled
        (the slots below); the rest wait in aiomqtt's queue, unbounded (a bounded one silently discards)
        because the broker sends no more than ``receive_maximum`` unacknowledged QoS 1 messages on MQTT 5.
        """
        ack = paho_client(client).ack
        slots = asyncio.Semaphore(self._cfg.max_in_flight)
        order: deque[tuple[asyncio.Task[None], list[aiomqtt.Message]]] = deque()
        ready = asyncio.Event()
        taken = 0
        main = idle_s is None  # a drained session's connection publishes no replies
        if main:
            self._client_now = client
        try:
            async with asyncio.TaskGroup() as tg:
                if main:
                    self._spawn = functools.partial(tg.create_task, name=f"{self.name}:request")
                acker = tg.create_task(self._ack_in_order(ack, slots, order, ready), name=f"{self.name}:ack")
                # Waiting goes through aiomqtt's iterator (it notices a lost connection); what is queued
                # behind the first message is taken at once into the same batch.
                messages = _idle_ending(client.messages, idle_s, lambda: not order) if idle_s else client.messages
                async for message in messages:
                    await slots.acquire()
                    batch = [message]
                    while not queue.empty() and not slots.locked():
                        await slots.acquire()  # does not suspend: a slot is free
                        batch.append(queue.get_nowait())
                    taken += len(batch)
                    order.append((tg.create_task(self._handle(batch)), batch))
                    ready.set()
                acker.cancel()  # idle: every message taken was acknowledged
        finally:
            if main:
                self._client_now = self._spawn = None
        return taken

    @staticmethod
    async def _ack_in_order(
        ack: Callable[[int, int], object],
        slots: asyncio.Semaphore,
        order: deque[tuple[asyncio.Task[None], list[aiomqtt.Message]]],
        ready: asyncio.Event,
    ) -> None:
        while True:
            while not order:
                ready.clear()
                await ready.wait()
            task, batch = order[0]
            await task  # never raises: _handle settles every message, or is cancelled with us
            order.popleft()
            for message in batch:
                slots.release()
                if message.qos > 0:
                    ack(message.mid, message.qos)

    async def _handle(self, batch: list[aiomqtt.Message]) -> None:
        """Settle a batch of messages: each accepted, or dead-lettered; retry while the sink is not ready."""
        events: list[Envelope] = []
        for message in batch:
            props = message.properties
            payload = message.payload
            if self._info is not None and self._info.take(message.topic.value, payload):
                continue  # $SYS, QoS 0: nothing to acknowledge
            wire = wire_message(message)
            try:
                decoded = to_envelope(wire, self._rules)
                if self._cfg.request:
                    response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
                    correlation = getattr(props, "CorrelationData", None) if props is not None else None
                    # Correlation Data is optional (MQTT 5 section 4.10): mosquitto_rr sends none by default.
                    if not response_topic or len(decoded) != 1:
                        raise Rejected(RejectCode.INVALID, "a request needs a Response Topic (and is one event)")
                    if self._spawn is None:  # held in a drained session: its requester stopped waiting
                        raise Rejected(RejectCode.INVALID, "a request held in a drained session (no one waits)")
                    await self._requests_in_flight.acquire()  # bounded; released when the reply is sent
                    self._spawn(
                        self._request(decoded[0], response_topic, None if correlation is None else bytes(correlation))
                    )
                    continue
            except Exception as exc:  # Rejected, or a decoder bug: either way the message must not loop
                reason = exc.reason if isinstance(exc, Rejected) else f"cannot decode: {exc!r}"
                env = undecodable(wire, self.inbound)
                self._log.error("envelope.undecodable", topic=wire.topic, size=len(wire.payload), reason=reason)
                await self._until_safe(self._rt.sink.dead_letter, env, f"{UNDECODABLE_PREFIX}{reason}")
                continue
            self._log.debug("envelope.received", event_id=decoded[0].id, topic=wire.topic, size=len(wire.payload))
            events += decoded
        if events:
            await self._until_safe(self._accept, events, messages=len(batch))

    async def _request(self, event: Envelope, topic: str, correlation: bytes | None) -> None:
        """One request: ask, then publish the reply (or why there is none) to ``topic``. Never raises."""
        try:
            status = ""
            reply: Reply | None = None
            requests = self._rt.requests
            try:
                if requests is None:
                    raise NotReady("request-reply is not available in this process")
                reply = await requests.request(event, self._origin, self._cfg.request_timeout_s)
                if reply.error:
                    status = "502"
            except Rejected as exc:
                status, reason = _REFUSED_STATUS.get(exc.code, "400"), f"{exc.code.value}: {exc.reason}"
            except RequestTimeout as exc:
                status, reason = "504", exc.reason
            except RequestUndeliverable as exc:
                status, reason = ("503" if exc.retryable else "502"), exc.reason
            except NotReady as exc:
                status, reason = "503", exc.reason
            props = properties(PacketTypes.PUBLISH)
            if correlation is not None:
                props.CorrelationData = correlation
            if reply is not None and reply.content_type:
                props.ContentType = reply.content_type
            if status:
                props.UserProperty = [("mediator-error", "true"), ("mediator-status", status)]
            payload = reply.body if reply is not None else reason.encode("utf-8")
            try:
                client = self._client_now
                if client is None:
                    raise aiomqtt.MqttError("disconnected")
                await client.publish(topic, payload, qos=self._qos, properties=props, timeout=10.0)
            except (aiomqtt.MqttError, ValueError) as exc:
                self._log.warning("reply.unsent", event_id=event.id, reason=str(exc))
        finally:
            self._requests_in_flight.release()

    async def _accept(self, events: list[Envelope]) -> None:
        if self._rt.admission is not None:
            # Shed by priority: hold them, and their PUBACKs (Receive Maximum stops the broker), until admitted.
            await self._rt.admission.admitted(self.inbound)
        try:
            await self._rt.sink.accept(events, self._origin)
        except Rejected as exc:
            if len(events) > 1:
                # One refused event must not take the rest of the batch with it: settle each on its own.
                # Settled ones leave the list, so a NotReady half-way retries (in _until_safe) only the rest.
                while events:
                    await self._accept(events[:1])
                    del events[0]
                return
            # Nobody can be answered on MQTT: the refusal becomes a dead letter, then the ack.
            self._log.error("envelope.rejected", event_id=events[0].id, reason=exc.reason)
            await self._rt.sink.dead_letter(events[0], f"{REJECTED_PREFIX}{exc}")

    async def _until_safe(self, call: Callable[..., Awaitable[None]], *args: Any, messages: int = 1) -> None:
        """Await ``call`` until it succeeds, holding the acknowledgement of ``messages`` messages meanwhile:
        ``NotReady`` means the sink cannot commit now (draining, overloaded), and they must not be lost or
        acked."""
        backoff = Backoff(_RETRY_INITIAL_S, _RETRY_MAX_S)
        attempt = 0
        while True:
            try:
                await call(*args)
                return
            except NotReady as exc:
                reason = exc.reason
                delay = max(backoff.next(), min(exc.retry_after_s, _RETRY_MAX_S))
            except Exception as exc:  # a bug in a stage or the sink: hold the message, keep the connection
                reason = repr(exc)
                delay = backoff.next()
                self._log.exception("envelope.failed", reason=reason)
            attempt += 1
            if attempt == 1:
                self._log.warning("envelope.deferred", reason=reason, retry_in_s=round(delay, 2), messages=messages)
            else:
                self._log.debug(
                    "envelope.deferred", reason=reason, retry_in_s=round(delay, 2), attempt=attempt, messages=messages
                )
            await asyncio.sleep(delay)
