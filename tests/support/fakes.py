"""Fakes for our own seams only (never for a protocol library)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mediator.core.envelope import Envelope
from mediator.core.errors import MediatorError, RejectCode, Rejected
from mediator.core.ingress import ANONYMOUS, Origin, Principal


class ListSink:
    """A Sink that records what it accepts; ``fail_with`` makes the next calls raise instead."""

    def __init__(self) -> None:
        self.events: list[Envelope] = []
        self.dead: list[tuple[Envelope, str]] = []
        self.fail_with: MediatorError | None = None
        self.calls = 0
        self.origins: list[Origin] = []  # every Origin handed to authenticate or accept
        self.refusals: list[tuple[Origin, Rejected]] = []  # what the inbound refused before handing over
        self._changed = asyncio.Event()

    async def authenticate(self, origin: Origin) -> Principal:
        self.origins.append(origin)
        if isinstance(self.fail_with, Rejected) and self.fail_with.code is RejectCode.UNAUTHENTICATED:
            raise self.fail_with
        if origin.principal is None:
            origin.principal = Principal("", ANONYMOUS, "anonymous")
        return origin.principal

    def refused(self, origin: Origin, exc: Rejected) -> None:
        self.refusals.append((origin, exc))

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        if origin is not None:
            self.origins.append(origin)
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        self.events.extend(events)
        self._changed.set()

    async def dead_letter(self, event: Envelope, reason: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.dead.append((event, reason))
        self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 10.0, dead: int = 0) -> None:
        """Wait until at least ``count`` events (and ``dead`` dead letters) arrived."""
        async with asyncio.timeout(timeout_s):
            while len(self.events) < count or len(self.dead) < dead:
                self._changed.clear()
                await self._changed.wait()


class RejectingSink(ListSink):
    """Refuses every event, as an ingress stage would; dead letters still work."""

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        self.calls += 1
        raise Rejected(RejectCode.FORBIDDEN, "not allowed")
