"""Subscribe streams and the gRPC outbound that feeds them.

Every listener has one ``SubscriberHub``; its gRPC outbounds put events into the queues of the matching
subscribers. A queue is bounded (``subscriber_queue``): a subscriber that lets it fill up is disconnected
with RESOURCE_EXHAUSTED, so a slow reader never blocks the others nor silently loses events in the middle
of its stream (it sees a clean prefix, then the error, and can resubscribe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from adapters.grpc.codec import from_envelope
from adapters.grpc.config import GrpcOutboundConfig
from adapters.grpc.inbound import abort
from mediator.core.envelope import Envelope
from mediator.core.errors import TerminalDeliveryError
from mediator.core.formats import FORMATS
from mediator.core.patterns import compile_glob
from mediator.v1.service_pb2 import SubscribeRequest

Matcher = Callable[[str], bool]


def _glob(pattern: str) -> Matcher | None:
    return compile_glob(pattern) if pattern else None


SUBSCRIBED_KEY = "mediator-subscribed"
"""Initial metadata key a Subscribe call receives once its subscription is registered."""


@dataclass(eq=False, slots=True)
class Subscriber:
    """One live Subscribe call: its filters (None = any) and its bounded queue."""

    outbound: str | None
    type: Matcher | None
    source: Matcher | None
    address: Matcher | None
    queue: asyncio.Queue[Envelope]
    peer: str = ""
    pump: asyncio.Task[None] | None = None
    kicked: tuple[grpc.StatusCode, str] | None = None

    def matches(self, outbound: str, event: Envelope, address: str) -> bool:
        return (
            (self.outbound is None or self.outbound == outbound)
            and (self.type is None or self.type(event.type))
            and (self.source is None or self.source(event.source))
            and (self.address is None or self.address(address))
        )


class SubscriberHub:
    """The Subscribe side of one listener: who is subscribed, and fan-out to them."""

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self._queue_sizes: dict[str, int] = {}
        # A tuple, rebuilt on (rare) subscribe/unsubscribe, so fan-out iterates a stable snapshot.
        self._subscribers: tuple[Subscriber, ...] = ()
        self._log = structlog.get_logger(__name__).bind(listener=listener, protocol="grpc")

    def add_outbound(self, name: str, subscriber_queue: int) -> None:
        self._queue_sizes[name] = subscriber_queue

    @property
    def outbounds(self) -> tuple[str, ...]:
        return tuple(self._queue_sizes)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, outbound: str, event: Envelope, address: str) -> int:
        """Enqueue ``event`` for every subscriber that matches, without waiting; returns how many.

        A subscriber whose queue is full is disconnected instead of waited for.
        """
        out: Envelope | None = None
        count = 0
        for sub in self._subscribers:
            if not sub.matches(outbound, event, address):
                continue
            if out is None:
                out = from_envelope(event)  # one copy without provenance, shared by every subscriber
            try:
                sub.queue.put_nowait(out)
            except asyncio.QueueFull:
                self._kick(sub, grpc.StatusCode.RESOURCE_EXHAUSTED, "subscriber too slow")
                continue
            count += 1
        return count

    def close(self, reason: str) -> None:
        """Disconnect every subscriber (UNAVAILABLE ``reason``): their streams would otherwise hold the
        server's shutdown grace period to its end."""
        for sub in self._subscribers:
            self._kick(sub, grpc.StatusCode.UNAVAILABLE, reason)

    async def subscribe(self, request: SubscribeRequest, context: Any) -> None:
        """Serve one Subscribe call until the client goes away or the subscriber is disconnected."""
        if request.outbound and request.outbound not in self._queue_sizes:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no gRPC outbound named {request.outbound!r} on listener {self.listener!r}",
            )
        # A subscriber to every outbound gets the largest queue among them.
        sizes = self._queue_sizes
        size = sizes[request.outbound] if request.outbound else max(sizes.values(), default=1)
        sub = Subscriber(
            outbound=request.outbound or None,
            type=_glob(request.type),
            source=_glob(request.source),
            address=_glob(request.address),
            queue=asyncio.Queue(size),
            peer=context.peer(),
        )
        self._subscribers = (*self._subscribers, sub)  # events queue up for it from here on
        self._log.info("subscriber.connected", peer=sub.peer, outbound=request.outbound, type=request.type)
        try:
            # Initial metadata tells the client the subscription is live. It is sent before the pump starts:
            # gRPC allows one send operation at a time on a call (a concurrent write fails the call with
            # GRPC_CALL_ERROR_TOO_MANY_OPERATIONS).
            await context.send_initial_metadata(((SUBSCRIBED_KEY, "1"),))
            if sub.kicked is None:
                # Writes run in their own task so that a disconnect can interrupt a write flow control blocks.
                sub.pump = asyncio.create_task(self._pump(sub, context), name=f"listener:{self.listener}:subscriber")
                try:
                    await sub.pump
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if sub.kicked is None or (task is not None and task.cancelling()):
                        raise
            if sub.kicked is not None:
                await abort(context, *sub.kicked)
        finally:
            self._remove(sub)
            if sub.pump is not None:
                sub.pump.cancel()
            self._log.info("subscriber.disconnected", peer=sub.peer)

    @staticmethod
    async def _pump(sub: Subscriber, context: Any) -> None:
        queue = sub.queue
        while True:
            await context.write(await queue.get())

    def _kick(self, sub: Subscriber, code: grpc.StatusCode, reason: str) -> None:
        if sub.kicked is not None:
            return
        sub.kicked = (code, reason)
        self._remove(sub)
        if sub.pump is not None:
            sub.pump.cancel()
        log = self._log.warning if code is grpc.StatusCode.RESOURCE_EXHAUSTED else self._log.info
        log("subscriber.dropped", peer=sub.peer, reason=reason, queued=sub.queue.qsize())

    def _remove(self, sub: Subscriber) -> None:
        if sub in self._subscribers:
            self._subscribers = tuple(s for s in self._subscribers if s is not sub)


class GrpcOutbound:
    """Delivers to the live Subscribe streams of its listener that follow it (or every outbound)."""

    def __init__(self, name: str, cfg: GrpcOutboundConfig, hub: SubscriberHub) -> None:
        self.name = name
        self.max_in_flight = cfg.max_in_flight
        self._hub = hub

    async def send(self, event: Envelope, address: str, format: str) -> None:
        """Put ``event`` into the queue of every matching subscriber and return; never waits.

        The gRPC binding is the envelope itself (CloudEvents Protobuf field numbers), so every format
        delivers the same message, without provenance. A live stream has no backlog: with no matching
        subscriber the event is delivered to nobody and ``send`` still succeeds; a subscriber too slow
        to take it is disconnected (RESOURCE_EXHAUSTED) rather than waited for. Raises
        ``TerminalDeliveryError`` only for an unknown format.
        """
        if format not in FORMATS:
            raise TerminalDeliveryError(f"unknown format {format!r}")
        self._hub.publish(self.name, event, address)
