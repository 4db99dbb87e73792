"""AMQP request-reply responders for tests: consume a request queue, answer to each request's reply_to with
its correlation_id (what a service behind the daemon's request-reply does)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

Handler = Callable[[AbstractChannel, AbstractIncomingMessage], Awaitable[None]]


async def reply(channel: AbstractChannel, msg: AbstractIncomingMessage, body: bytes, **kw: object) -> None:
    """What a responder does: publish to reply_to with the request's correlation_id."""
    assert msg.reply_to is not None
    message = aio_pika.Message(body, correlation_id=msg.correlation_id, **kw)  # type: ignore[arg-type]
    await channel.default_exchange.publish(message, routing_key=msg.reply_to)


async def echo(channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
    await reply(channel, msg, msg.body, content_type=msg.content_type)


async def responder(conn: aio_pika.abc.AbstractRobustConnection, queue_name: str, handler: Handler) -> AbstractChannel:
    """Consume ``queue_name`` (declared by the daemon, durable: a durable declare of it passes) with
    ``handler``; close the returned channel to stop."""
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=500)
    queue = await channel.declare_queue(queue_name, durable=True, passive=True)

    async def on(msg: AbstractIncomingMessage) -> None:
        await msg.ack()
        await handler(channel, msg)

    await queue.consume(on)
    return channel
