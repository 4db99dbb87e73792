"""Consume one queue and hand each delivery to the sink; ``basic.ack`` only once the sink has it.

aiormq runs every delivery in its own task, so up to ``prefetch`` deliveries are in the sink at once and
the sink can group their commits. Outcomes:

- accepted: ack.
- ``NotReady``: pause briefly, then nack with requeue (the broker redelivers).
- ``Rejected`` (by a stage) or undecodable: ``sink.dead_letter`` then ack, so a poison message never loops.
- cancelled (shutdown, channel lost): no ack; the broker redelivers and the event id deduplicates.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from adapters.amqp.codec import AmqpMessage, to_envelope, undecodable
from adapters.amqp.config import AmqpBrokerConfig, AmqpInboundConfig
from adapters.amqp.connection import BrokerLink
from mediator.core.envelope import Envelope
from mediator.core.errors import NotReady, Rejected
from mediator.core.seams import Runtime

# A pause before handing a message back, so a sink that is not ready is not hammered by redeliveries.
NOT_READY_PAUSE_MAX_S = 1.0
ERROR_PAUSE_S = 1.0


class AmqpInbound(BrokerLink):
    role = "inbound"

    def __init__(self, name: str, cfg: AmqpInboundConfig, broker: AmqpBrokerConfig, url: str, rt: Runtime) -> None:
        super().__init__(name, broker, url, rt.health)
        self.cfg = cfg
        self.sink = rt.sink
        # aio-pika's robust connection holds its channels weakly: without this reference the consumer's
        # channel is garbage once the connection drops, and a collection during the outage means the
        # consumer never comes back.
        self._channel: AbstractRobustChannel | None = None

    async def _setup(self, conn: AbstractRobustConnection) -> None:
        cfg = self.cfg
        channel = await conn.channel(publisher_confirms=False)
        self._channel = channel
        await channel.set_qos(prefetch_count=cfg.prefetch)
        arguments = {"x-queue-type": "quorum"} if cfg.queue_type == "quorum" else None
        queue = await channel.declare_queue(cfg.queue, durable=cfg.durable, arguments=arguments)
        for binding in cfg.bindings:
            exchange = await channel.declare_exchange(binding.exchange, binding.exchange_type, durable=True)
            await queue.bind(exchange, routing_key=binding.routing_key)
        await queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        msg = AmqpMessage(
            body=message.body,
            routing_key=message.routing_key or "",
            content_type=message.content_type,
            headers=message.headers,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
        )
        try:
            env = to_envelope(
                msg,
                inbound=self.admin_name,
                type_template=self.cfg.type,
                source_template=self.cfg.source,
                decode=self.cfg.decode,
            )
        except Rejected as exc:
            await self._dead_letter(message, undecodable(msg, self.admin_name), f"undecodable: {exc.reason}")
            return
        self.log.debug("envelope.received", event_id=env.id, size=len(msg.body), routing_key=msg.routing_key)
        try:
            await self.sink.accept([env])
        except NotReady as exc:
            await self._requeue(message, exc)
            return
        except Rejected as exc:
            await self._dead_letter(message, env, f"rejected: {exc}")
            return
        except Exception as exc:
            # A bug in the core: keep the message (the broker redelivers it) rather than lose it.
            self.log.error("envelope.accept_failed", event_id=env.id, error=repr(exc), exc_info=exc)
            await asyncio.sleep(ERROR_PAUSE_S)
            await self._settle(message, ack=False)
            return
        await self._settle(message, ack=True)

    async def _dead_letter(self, message: AbstractIncomingMessage, env: Envelope, reason: str) -> None:
        try:
            await self.sink.dead_letter(env, reason)
        except NotReady as exc:
            await self._requeue(message, exc)
            return
        self.log.error("envelope.dead_lettered", event_id=env.id, size=len(message.body), reason=reason)
        await self._settle(message, ack=True)

    async def _requeue(self, message: AbstractIncomingMessage, exc: NotReady) -> None:
        self.log.debug("envelope.requeued", reason=exc.reason)
        await asyncio.sleep(min(max(exc.retry_after_s, 0.0), NOT_READY_PAUSE_MAX_S))
        await self._settle(message, ack=False)

    async def _settle(self, message: AbstractIncomingMessage, *, ack: bool) -> None:
        try:
            if ack:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except Exception as exc:
            # The channel closed under us: the broker redelivers the message; its id deduplicates.
            self.log.warning("delivery.settle_failed", ack=ack, error=repr(exc))
