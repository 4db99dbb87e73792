"""The outbox seam and the values it stores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mediator.core.envelope import Envelope
from mediator.core.router import Delivery, Unroutable


class StorageError(Exception):
    """The outbox could not commit (disk full, I/O error): the sender must not be acknowledged."""


@dataclass(slots=True)
class Pending:
    """One delivery of one event to one destination, not yet done."""

    id: int
    event: Envelope
    route: str
    outbound: str
    address: str
    format: str
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    event: Envelope
    route: str
    outbound: str
    address: str
    format: str
    reason: str
    attempts: int
    at: float


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One operator action on the dead letters (who, when, what): kept in the outbox with them."""

    id: int
    at: float
    who: str
    action: str
    detail: str  # JSON: the ids, and for an edit what changed (attribute names, data size; never the data)


@dataclass(frozen=True, slots=True)
class Accepted:
    """One event for commit: where it goes and which of its destinations already failed."""

    event: Envelope
    deliveries: Sequence[Delivery]
    failures: Sequence[Unroutable] = ()
    dead_reason: str | None = None  # set: store the whole event as one dead letter instead
    dedup_key: str | None = None  # set: skip the event if this key was committed within the dedup window
    stored: bool = True  # kept in the event store ([store]); not a replay's copy or a forwarded dead letter


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What the outbox holds: pending deliveries (the oldest one's id, route, outbound, and when its event
    was received, Unix time) and dead letters."""

    pending: int
    dead_letters: int
    oldest_id: int | None = None
    oldest_route: str = ""
    oldest_outbound: str = ""
    oldest_received: float | None = None


OnCommit = Callable[[list[Pending]], None]


class Outbox(Protocol):
    on_commit: OnCommit | None
    """Called on the event loop with the new deliveries of every successful commit, before the committer
    resumes, and even if the committer was cancelled meanwhile: the pipeline dispatches from here, so a
    committed delivery is never left undispatched until the next start. A durable store may call it once
    the transaction is written and before it is durable (delivery then overlaps the fsync)."""

    async def open(self) -> list[Pending]:
        """Open the store and return every delivery left pending by an earlier run."""
        ...

    async def commit(self, items: Sequence[Accepted], duplicates: list[int] | None = None) -> list[Pending]:
        """Write the events and their deliveries (and dead letters) atomically; return the new deliveries.

        Returns once durable (for a durable store). Raises StorageError when nothing was committed.
        Concurrent calls are grouped into one transaction. An item whose ``dedup_key`` was committed
        within the deduplication window is skipped (it yields no deliveries), in the same transaction;
        its position in ``items`` is appended to ``duplicates`` when given (meaningful only on success)."""
        ...

    def done(self, delivery: Pending) -> None:
        """The delivery succeeded: forget it (written lazily; a crash before then means a redelivery)."""
        ...

    def failed(self, delivery: Pending) -> None:
        """Record one more failed attempt (lazily)."""
        ...

    async def dead_letter(self, delivery: Pending, reason: str) -> None:
        """Move a delivery to the dead letters; returns once durable."""
        ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    async def replay(self, ids: Sequence[int] | None = None) -> list[Pending]:
        """Turn dead letters (all when ``ids`` is None) back into pending deliveries; returns them."""
        ...

    async def dead_letter_by_id(self, id: int) -> DeadLetter | None:
        """One dead letter, whole (its envelope with data), or None."""
        ...

    async def edit_dead_letter(self, id: int, event: Envelope) -> bool:
        """Replace a dead letter's envelope (an operator's fix before a replay); False when there is none."""
        ...

    async def delete_dead_letters(self, ids: Sequence[int]) -> int:
        """Forget these dead letters; returns how many there were."""
        ...

    async def audit(self, who: str, action: str, detail: str) -> None:
        """Append to the audit log; returns once durable (for a durable store)."""
        ...

    async def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The latest ``limit`` audit entries, newest first."""
        ...

    async def stats(self) -> OutboxStats:
        """Counts for an operator (``/admin/status``); never blocks the loop. Raises StorageError."""
        ...

    async def close(self) -> None:
        """Flush lazy writes and close."""
        ...
