"""An in-memory outbox: no fsync, no disk, and everything pending is LOST when the process dies.

For operators who trade durability for speed (``[outbox] kind = "memory"``).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from mediator.core.envelope import Envelope
from mediator.outbox.base import Accepted, AuditEntry, DeadLetter, OnCommit, OutboxStats, Pending


class MemoryOutbox:
    def __init__(self, *, dedup_window_s: float = 0.0) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._dead: dict[int, DeadLetter] = {}
        self._audit: list[AuditEntry] = []
        self._window = dedup_window_s
        self.on_commit: OnCommit | None = None
        self._seen: OrderedDict[str, float] = OrderedDict()  # oldest first; pruned past the window

    async def open(self) -> list[Pending]:
        return []

    async def commit_with(self, items: Sequence[Accepted], also: Callable[[Any], None]) -> list[Pending]:
        """``commit`` without deduplication; ``also`` is given None (nothing here is durable)."""
        also(None)
        return await self.commit([dataclasses.replace(i, dedup_key=None) for i in items])

    async def commit(self, items: Sequence[Accepted], duplicates: list[int] | None = None) -> list[Pending]:
        out: list[Pending] = []
        now = time.time()
        horizon = now - self._window
        while self._seen and next(iter(self._seen.values())) < horizon:
            self._seen.popitem(last=False)
        for i, item in enumerate(items):
            if item.dedup_key is not None and self._window > 0:
                if item.dedup_key in self._seen:
                    if duplicates is not None:
                        duplicates.append(i)
                    continue
                self._seen[item.dedup_key] = now
            if item.dead_reason is not None:
                self._bury(item.event, "", "", "", "", item.dead_reason, 0, now)
                continue
            for fail in item.failures:
                self._bury(item.event, fail.route, fail.outbound, fail.address, "", fail.reason, 0, now)
            for d in item.deliveries:
                event = item.event if d.event is None else d.event
                p = Pending(next(self._ids), event, d.route, d.outbound, d.address, d.format)
                self._pending[p.id] = p
                out.append(p)
        if self.on_commit is not None and out:
            self.on_commit(out)
        return out

    def done(self, delivery: Pending) -> None:
        self._pending.pop(delivery.id, None)

    def failed(self, delivery: Pending) -> None:
        pass

    async def dead_letter(self, delivery: Pending, reason: str) -> None:
        self._pending.pop(delivery.id, None)
        d = delivery
        self._bury(d.event, d.route, d.outbound, d.address, d.format, reason, d.attempts, time.time())

    def _bury(
        self, event: Envelope, route: str, outbound: str, address: str, fmt: str, reason: str, n: int, at: float
    ) -> None:
        i = next(self._ids)
        self._dead[i] = DeadLetter(i, event, route, outbound, address, fmt, reason, n, at)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return list(self._dead.values())[:limit]

    async def replay(self, ids: Sequence[int] | None = None) -> list[Pending]:
        chosen = list(self._dead) if ids is None else [i for i in ids if i in self._dead]
        out = []
        for i in chosen:
            dl = self._dead[i]
            if not dl.format:
                continue  # never had a rendered destination: re-publish it instead
            del self._dead[i]
            p = Pending(next(self._ids), dl.event, dl.route, dl.outbound, dl.address, dl.format)
            self._pending[p.id] = p
            out.append(p)
        return out

    async def dead_letter_by_id(self, id: int) -> DeadLetter | None:
        return self._dead.get(id)

    async def edit_dead_letter(self, id: int, event: Envelope) -> bool:
        dl = self._dead.get(id)
        if dl is None:
            return False
        self._dead[id] = dataclasses.replace(dl, event=event)
        return True

    async def delete_dead_letters(self, ids: Sequence[int]) -> int:
        return sum(self._dead.pop(i, None) is not None for i in set(ids))

    async def audit(self, who: str, action: str, detail: str) -> None:
        self._audit.append(AuditEntry(len(self._audit) + 1, time.time(), who, action, detail))

    async def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        return self._audit[::-1][:limit]

    async def stats(self) -> OutboxStats:
        dead = len(self._dead)
        oldest = next(iter(self._pending.values()), None)  # ids rise: the first inserted is the oldest
        if oldest is None:
            return OutboxStats(0, dead)
        ts = oldest.event.provenance.received
        received = ts.seconds + ts.nanos * 1e-9 if ts.seconds else None
        return OutboxStats(len(self._pending), dead, oldest.id, oldest.route, oldest.outbound, received)

    async def close(self) -> None:
        pass
