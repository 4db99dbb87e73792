"""Publish and PublishStream: gRPC calls in, envelopes to the sink, answers only after the commit."""

from __future__ import annotations

import asyncio
import time
from typing import Any, NoReturn

import grpc
import structlog

from adapters.grpc.codec import code_number, status_for, to_envelope
from mediator.core.envelope import Envelope
from mediator.core.errors import NotReady, Overloaded, Rejected
from mediator.core.seams import Sink
from mediator.v1.service_pb2 import PublishAck, PublishReply


def not_ready_status(exc: NotReady) -> grpc.StatusCode:
    """Back-pressure is RESOURCE_EXHAUSTED; draining or a failed commit is UNAVAILABLE."""
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, Overloaded) else grpc.StatusCode.UNAVAILABLE


# grpc-core reads this trailer as the server's retry pushback when a client has a retry policy.
_PUSHBACK = "grpc-retry-pushback-ms"


async def abort(context: Any, code: grpc.StatusCode, details: str, trailers: tuple[Any, ...] = ()) -> NoReturn:
    """``context.abort`` (which raises) typed as never returning."""
    await context.abort(code, details, trailers)
    raise AssertionError("grpc context.abort returned")  # pragma: no cover


class GrpcInbound:
    """The inbound half of a gRPC listener. One per listener at most; the listener's servicer calls it."""

    def __init__(self, name: str, sink: Sink, *, stream_max_in_flight: int) -> None:
        self.name = name
        self._sink = sink
        self._max_in_flight = stream_max_in_flight
        self._log = structlog.get_logger(__name__).bind(inbound=name, protocol="grpc")

    async def publish(self, request: Envelope, context: Any) -> PublishReply:
        """Unary Publish: returns the reply once the event is committed, or aborts with the mapped status."""
        try:
            env = to_envelope(request, inbound=self.name, method="Publish", received_ns=time.time_ns())
            await self._sink.accept([env])
        except Rejected as exc:
            self._log.debug("envelope.rejected", event_id=request.id, code=exc.code.value)
            await abort(context, status_for(exc.code), exc.reason)
        except NotReady as exc:
            pushback = str(max(0, int(exc.retry_after_s * 1000)))
            await abort(context, not_ready_status(exc), exc.reason, ((_PUSHBACK, pushback),))
        self._log.debug("envelope.accepted", event_id=env.id, size=env.ByteSize())
        return PublishReply(id=env.id)

    async def publish_stream(self, context: Any) -> None:
        """Bidirectional PublishStream: one PublishAck per event, in the order the events came.

        Events are accepted concurrently, at most ``stream_max_in_flight`` awaiting their ack; when that
        many are pending the reader stops reading, so HTTP/2 flow control pushes back on the client. A
        refused event gets a non-zero ack and the stream goes on. Cancellation (the client went away)
        abandons the pending accepts without acknowledging them.
        """
        slots = asyncio.Semaphore(self._max_in_flight)
        # Unbounded on purpose: every item holds a slot of ``slots``, so it never exceeds max_in_flight + 1.
        pending: asyncio.Queue[PublishAck | asyncio.Task[PublishAck] | None] = asyncio.Queue()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._read(context, slots, pending, tg), name=f"inbound:{self.name}:stream-reader")
            while (item := await pending.get()) is not None:
                ack = item if isinstance(item, PublishAck) else await item
                await context.write(ack)
                slots.release()

    async def _read(
        self,
        context: Any,
        slots: asyncio.Semaphore,
        pending: asyncio.Queue[PublishAck | asyncio.Task[PublishAck] | None],
        tg: asyncio.TaskGroup,
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
                code = code_number(status_for(exc.code))
                pending.put_nowait(PublishAck(id=request.id, code=code, reason=exc.reason, sequence=sequence))
            else:
                pending.put_nowait(tg.create_task(self._accept(env, sequence)))
            sequence += 1
        pending.put_nowait(None)
        self._log.debug("stream.closed", events=sequence)

    async def _accept(self, env: Envelope, sequence: int) -> PublishAck:
        try:
            await self._sink.accept([env])
        except Rejected as exc:
            code = code_number(status_for(exc.code))
            return PublishAck(id=env.id, code=code, reason=exc.reason, sequence=sequence)
        except NotReady as exc:
            return PublishAck(id=env.id, code=code_number(not_ready_status(exc)), reason=exc.reason, sequence=sequence)
        return PublishAck(id=env.id, sequence=sequence)
