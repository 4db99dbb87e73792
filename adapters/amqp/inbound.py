"""Consume one queue and hand the deliveries to the sink; ``basic.ack`` only once the sink has them.

Deliveries are taken in batches: aio-pika's consumer callback only queues each one, and one task commits
what queued while the previous commit ran, as one ``sink.accept`` (one outbox operation), then settles
every message of the batch (the accepted ones with one multiple ``basic.ack``). The per-message cost
shrinks exactly when the daemon is busy, and a lone message still goes through at once. At most
``prefetch`` deliveries (and no more than ``[outbox] max_pending``) are unacknowledged, so a batch never
holds more. Outcomes:

- accepted: ack.
- ``NotReady``: pause briefly, then nack with requeue (the broker redelivers).
- ``Rejected`` (by a stage) or undecodable: ``sink.dead_letter`` then ack, so a poison message never loops.
  A batch a stage refused is retried message by message, so only the refused ones are dead-lettered.
- cancelled (shutdown, channel lost): no ack; the broker redelivers and the event id deduplicates.
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelInvalidStateError

from adapters.amqp.codec import AmqpMessage, to_envelope, undecodable
from adapters.amqp.config import AmqpBrokerConfig, AmqpInboundConfig
from adapters.amqp.connection import BrokerLink
from mediator.core.deadletter import REJECTED_PREFIX, UNDECODABLE_PREFIX
from mediator.core.envelope import Envelope
from mediator.core.errors import NotReady, Rejected
from mediator.core.ingress import Origin
from mediator.core.seams import Runtime

# A pause before handing a message back, so a sink that is not ready is not hammered by redeliveries.
NOT_READY_PAUSE_MAX_S = 1.0
ERROR_PAUSE_S = 1.0


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    """The channel a message came on; None once that channel is closed (aio-pika raises then)."""
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


def wire_message(message: AbstractIncomingMessage) -> AmqpMessage:
    """What the binding reads of one delivery (``fuzz/targets.py`` decodes fuzzed properties through this too)."""
    return AmqpMessage(
        body=message.body,
        routing_key=message.routing_key or "",
        content_type=message.content_type,
        headers=message.headers,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
    )


class AmqpInbound(BrokerLink):
    role = "inbound"

    def __init__(self, name: str, cfg: AmqpInboundConfig, broker: AmqpBrokerConfig, url: str, rt: Runtime) -> None:
        super().__init__(name, broker, url, rt.health)
        self.cfg = cfg
        self.sink = rt.sink
        self.admission = rt.admission
        self.prefetch = rt.window(cfg.prefetch)  # no more unacknowledged than the outbox takes
        # aio-pika's robust connection holds its channels weakly: without this reference the consumer's
        # channel is garbage once the connection drops, and a collection during the outage means the
        # consumer never comes back.
        self._channel: AbstractRobustChannel | None = None
        self._arrived: list[AbstractIncomingMessage] = []
        self._tainted: object = None  # a channel on which a failed batch may have left deliveries unsettled
        self._wake = asyncio.Event()
        # RabbitMQ authenticated the publishers; the user_id it validated is per message (provenance).
        self._origin = Origin(inbound=name, protocol="amqp", broker=True)

    async def _setup(self, conn: AbstractRobustConnection) -> None:
        cfg = self.cfg
        channel = await conn.channel(publisher_confirms=False)
        self._channel = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        arguments = {"x-queue-type": "quorum"} if cfg.queue_type == "quorum" else None
        queue = await channel.declare_queue(cfg.queue, durable=cfg.durable, arguments=arguments)
        for binding in cfg.bindings:
            exchange = await channel.declare_exchange(binding.exchange, binding.exchange_type, durable=True)
            await queue.bind(exchange, routing_key=binding.routing_key)
        await queue.consume(self._on_message, no_ack=False)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            committer = tg.create_task(self._commit_batches(), name=f"{self.component}:commits")
            try:
                await super().run()
            finally:
                committer.cancel()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._arrived.append(message)
        self._wake.set()

    async def _commit_batches(self) -> None:
        """Take what arrived, commit it as one batch, settle it; again. Runs as long as the inbound."""
        while True:
            if not self._arrived:
                self._wake.clear()
                await self._wake.wait()
            batch, self._arrived = self._arrived, []
            try:
                await self._commit(batch)
            except Exception as exc:
                # A bug (each step below handles what it expects): log it and go on with the next batch;
                # what this one left unsettled stays unacknowledged and the broker redelivers it. A later
                # ack on the same channel must not settle it in passing: no multiple acks there.
                self._tainted = _channel_of(batch[-1])  # None: closed, its deliveries come back anyway
                self.log.error("inbound.batch_failed", messages=len(batch), error=repr(exc), exc_info=exc)
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _commit(self, batch: list[AbstractIncomingMessage]) -> None:
        decoded: list[tuple[AbstractIncomingMessage, Envelope]] = []
        for message in batch:
            msg = wire_message(message)
            try:
                env = to_envelope(
                    msg,
                    inbound=self.admin_name,
                    type_template=self.cfg.type,
                    source_template=self.cfg.source,
                    decode=self.cfg.decode,
                )
            except Exception as exc:  # Rejected, or a decoder bug: either way the message must not loop
                reason = exc.reason if isinstance(exc, Rejected) else f"cannot decode: {exc!r}"
                await self._dead_letter(message, undecodable(msg, self.admin_name), f"{UNDECODABLE_PREFIX}{reason}")
                continue
            self.log.debug("envelope.received", event_id=env.id, size=len(msg.body), routing_key=msg.routing_key)
            decoded.append((message, env))
        await self._accept(decoded)

    async def _accept(self, decoded: list[tuple[AbstractIncomingMessage, Envelope]]) -> None:
        if not decoded:
            return
        if self.admission is not None:
            # Shed by priority: hold them unacknowledged (the prefetch stops the broker) until admitted.
            await self.admission.admitted(self.admin_name)
        try:
            await self.sink.accept([env for _, env in decoded], self._origin)
        except NotReady as exc:
            await self._requeue([message for message, _ in decoded], exc)
            return
        except Rejected as exc:
            if len(decoded) > 1:  # find the refused ones: the others are accepted one by one
                for item in decoded:
                    await self._accept([item])
                return
            message, env = decoded[0]
            await self._dead_letter(message, env, f"{REJECTED_PREFIX}{exc}")
            return
        except Exception as exc:
            # A bug in the core: keep the messages (the broker redelivers them) rather than lose them.
            self.log.error("envelope.accept_failed", messages=len(decoded), error=repr(exc), exc_info=exc)
            await asyncio.sleep(ERROR_PAUSE_S)
            for message, _ in decoded:
                await self._settle(message, ack=False)
            return
        await self._ack_batch([message for message, _ in decoded])

    async def _ack_batch(self, messages: list[AbstractIncomingMessage]) -> None:
        """Ack ``messages`` with one ``basic.ack`` (multiple) when that acks nothing else: batches are
        settled one after the other, in delivery order, so every earlier delivery of the channel is
        settled by now, unless a batch failed half-way on it (``_tainted``). One frame for the batch
        instead of one per message (each a socket write: 9% of the daemon's CPU on AMQP -> MQTT)."""
        last = messages[-1]
        channel = _channel_of(last)
        if channel is None:  # closed since (earlier messages came on it or on an older one, closed too)
            self._settle_failed(len(messages), "the channel closed before the ack")
            return
        tag = last.delivery_tag
        if tag is None or channel is self._tainted or any(_channel_of(m) is not channel for m in messages):
            for message in messages:
                await self._settle(message, ack=True)
            return
        try:
            await cast(aiormq.Channel, channel).basic_ack(tag, multiple=True, wait=False)
        except Exception as exc:
            self._settle_failed(len(messages), repr(exc))

    def _settle_failed(self, messages: int, error: str, *, ack: bool = True) -> None:
        # The channel closed under us: the broker redelivers the messages; their ids deduplicate.
        self.log.warning("delivery.settle_failed", ack=ack, messages=messages, error=error)

    async def _dead_letter(self, message: AbstractIncomingMessage, env: Envelope, reason: str) -> None:
        try:
            await self.sink.dead_letter(env, reason)
        except NotReady as exc:
            await self._requeue([message], exc)
            return
        self.log.error("envelope.dead_lettered", event_id=env.id, size=len(message.body), reason=reason)
        await self._settle(message, ack=True)

    async def _requeue(self, messages: list[AbstractIncomingMessage], exc: NotReady) -> None:
        self.log.debug("envelope.requeued", messages=len(messages), reason=exc.reason)
        await asyncio.sleep(min(max(exc.retry_after_s, 0.0), NOT_READY_PAUSE_MAX_S))
        for message in messages:
            await self._settle(message, ack=False)

    async def _settle(self, message: AbstractIncomingMessage, *, ack: bool) -> None:
        try:
            if ack and message.delivery_tag is not None:
                # Straight to aiormq with wait=False: aio-pika's ack also waits for the writer to drain the
                # socket for this one frame.
                channel = cast(aiormq.Channel, message.channel)
                await channel.basic_ack(message.delivery_tag, wait=False)
            elif ack:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except Exception as exc:
            self._settle_failed(1, repr(exc), ack=ack)
