"""Delivery status: what became of each event, read from the outbox's own facts.

Where the record lives, and why: in memory, in a ``StatusBook`` the outbox feeds (``StatusOutbox`` wraps
whichever outbox is configured). Every fact it holds is a transition the outbox itself records: a
delivery row committed (``pending``), the row done (``delivered``: the dispatcher calls ``done`` where it
counts ``mediator_delivered_total``), the row moved to the dead letters (``dead``: where it counts
``mediator_dead_letters_total``), a destination dead-lettered at ingress (an address that did not render),
an event no route matched. So the status document and the metrics come from the same calls and cannot
disagree. Reads and ``Prefer: wait`` never touch SQLite: a lookup is a dict read on the loop.

The SQLite outbox also keeps a durable row per completed delivery (``delivered`` table, written in the
same lazy group-commit transaction that deletes the delivery row: no extra fsync, no extra transaction),
so a restart within the window still answers ``delivered``; ``open`` rebuilds the book from it, from the
pending rows and from the dead letters of the window.

Bounds: a settled record (no destination pending) is kept ``window_s`` after it settled, and at most
``max_events`` of them (the oldest go first); pending ones are bounded by the outbox's ``max_pending``.
An id that expired is remembered as a tombstone (at most ``max_events`` ids, oldest dropped), so a read
tells "expired" from "never known" for as long as the tombstone lasts.

Waiting (``Prefer: wait=N``): a waiter is one future in ``_waiters``, resolved by the same transition
that settles the record (or dead-letters one destination), removed when it resolves, times out or is
cancelled (client gone). No lock, no task, no worker is held; at most ``max_waiters`` wait at once, and a
request beyond that is answered at once as without the header.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from sys import intern
from typing import Any

from mediator.core.envelope import Envelope
from mediator.core.seams import StatusLookup, WaitOutcome
from mediator.outbox.base import Accepted, AuditEntry, DeadLetter, OnCommit, Outbox, OutboxStats, Pending

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
PARTIALLY_DEAD = "partially-dead"

DEFAULT_WINDOW_S = 3600.0
DEFAULT_MAX_EVENTS = 50_000  # see [outbox] status_max_events
DEFAULT_MAX_WAITERS = 10_000
PRUNE_BATCH = 256
"""Settled records expired per transition at most: expiry is spread over the traffic, never a long stall."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Destination:
    delivery: int  # the outbox's delivery id; 0 for a destination dead-lettered at ingress
    route: str
    outbound: str
    address: str
    state: str = PENDING
    attempts: int = 0
    at: float | None = None  # when it was confirmed or dead-lettered (Unix time)
    reason: str | None = None  # why it was dead-lettered

    def document(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "route": self.route,
            "outbound": self.outbound,
            "address": self.address,
            "state": self.state,
            "attempts": self.attempts,
        }
        if self.at is not None:
            doc["delivered_at" if self.state == DELIVERED else "dead_at"] = iso(self.at)
        if self.reason is not None:
            doc["reason"] = self.reason
        return doc


@dataclass(slots=True)
class Record:
    """One event's status. ``principal`` is the verified publisher (``provenance.principal``, "" for an
    anonymous one); ``inbound`` the inbound that took it (whose authenticators guard the read)."""

    event_id: str
    source: str
    inbound: str
    principal: str
    received: float | None
    destinations: list[Destination]
    open: int = 0  # destinations still pending
    reason: str | None = None  # the event as a whole was dead-lettered (no route matched it)
    settled_at: float | None = None  # when the last pending destination settled

    @property
    def state(self) -> str:
        dead = sum(1 for d in self.destinations if d.state == DEAD)
        if not self.destinations:
            return DEAD if self.reason is not None else PENDING
        if dead == len(self.destinations):
            return DEAD
        if dead:
            return PARTIALLY_DEAD
        return PENDING if self.open else DELIVERED

    @property
    def final(self) -> bool:
        """What a waiter waits for: nothing pending, or one destination dead (it cannot all be delivered)."""
        return not self.open or any(d.state == DEAD for d in self.destinations)

    def document(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "id": self.event_id,
            "source": self.source,
            "inbound": self.inbound,
            "state": self.state,
            "settled": not self.open,
        }
        if self.received is not None:
            doc["received_at"] = iso(self.received)
        if self.settled_at is not None and not self.open:
            doc["settled_at"] = iso(self.settled_at)
        if self.reason is not None:
            doc["reason"] = self.reason
        doc["destinations"] = [d.document() for d in self.destinations]
        return doc


def lookup_to_json(found: StatusLookup) -> dict[str, object]:
    return {"found": found.found, "document": found.document, "inbound": found.inbound, "principal": found.principal}


def lookup_from_json(value: object) -> StatusLookup:
    if not isinstance(value, dict):
        return StatusLookup("unknown")
    found = value.get("found")
    doc = value.get("document")
    if found == "known" and isinstance(doc, dict):
        return StatusLookup("known", doc, str(value.get("inbound", "")), str(value.get("principal", "")))
    return StatusLookup("expired" if found == "expired" else "unknown")


def _received(event: Envelope) -> float | None:
    ts = event.provenance.received
    return ts.seconds + ts.nanos * 1e-9 if ts.seconds else None


class _Gone(Exception):
    """The waiting caller disconnected."""


class StatusBook:
    """Every event's status while it is pending and ``window_s`` after it settled (see the module docstring).
    All methods run on the event loop."""

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_waiters: int = DEFAULT_MAX_WAITERS,
    ) -> None:
        self.window_s = window_s
        self.max_events = max_events
        self.max_waiters = max_waiters
        self._records: dict[str, Record] = {}
        self._by_delivery: dict[int, tuple[Record, Destination]] = {}
        self._settled: OrderedDict[str, float] = OrderedDict()  # event id -> settled_at, oldest first
        self._tombstones: OrderedDict[str, None] = OrderedDict()  # expired ids, oldest first
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.waiting = 0  # waiters now (a gauge in /metrics)
        self.expired = 0  # records expired since start (a counter)

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------------ outbox facts
    def _record(self, event: Envelope) -> Record:
        rec = self._records.get(event.id)
        if rec is None:
            prov = event.provenance
            # Source, inbound and principal are few distinct strings: interned, each held once for all records.
            rec = Record(
                event.id, intern(event.source), intern(prov.inbound), intern(prov.principal), _received(event), []
            )
            self._records[event.id] = rec
            self._tombstones.pop(event.id, None)
        return rec

    def _reopen(self, rec: Record) -> None:
        if rec.settled_at is not None:
            self._settled.pop(rec.event_id, None)
            rec.settled_at = None

    def pending(self, rows: Sequence[Pending]) -> None:
        """Deliveries committed (or replayed, or resumed at start): each a destination, pending."""
        records = self._records
        by_delivery = self._by_delivery
        for p in rows:
            event = p.event
            rec = records.get(event.id)
            dest = None
            if rec is None:
                rec = self._record(event)
            else:
                for d in rec.destinations:  # a replayed dead letter takes its destination back
                    if d.state == DEAD and d.delivery and d.outbound == p.outbound and d.address == p.address:
                        dest = d
                        dest.delivery, dest.state, dest.attempts = p.id, PENDING, p.attempts
                        dest.at = dest.reason = None
                        break
                self._reopen(rec)
            if dest is None:
                # Interned: the rendered address is usually one of a few strings, held once for all records.
                dest = Destination(p.id, p.route, p.outbound, intern(p.address), PENDING, p.attempts)
                rec.destinations.append(dest)
            rec.open += 1
            by_delivery[p.id] = (rec, dest)

    def refused(self, items: Sequence[Accepted], duplicates: Sequence[int]) -> None:
        """What a commit dead-lettered at ingress: destinations whose address did not render, events no
        route matched. Duplicates are not new events: their first commit's record stands."""
        if all(item.dead_reason is None and not item.failures for item in items):
            return  # the usual commit: nothing dead at ingress
        skip = set(duplicates)
        now = time.time()
        for i, item in enumerate(items):
            if i in skip or (item.dead_reason is None and not item.failures):
                continue
            rec = self._record(item.event)
            if item.dead_reason is not None:
                rec.reason = item.dead_reason
            for fail in item.failures:
                rec.destinations.append(Destination(0, fail.route, fail.outbound, "", DEAD, 0, now, fail.reason))
            self._changed(rec, now)

    def done(self, delivery: Pending) -> None:
        self._settle(delivery, DELIVERED, None)

    def failed(self, delivery: Pending) -> None:
        entry = self._by_delivery.get(delivery.id)
        if entry is not None:
            entry[1].attempts = delivery.attempts

    def dead(self, delivery: Pending, reason: str) -> None:
        self._settle(delivery, DEAD, reason)

    def _settle(self, delivery: Pending, state: str, reason: str | None, at: float | None = None) -> None:
        entry = self._by_delivery.pop(delivery.id, None)
        if entry is None:
            return
        rec, dest = entry
        now = time.time() if at is None else at
        dest.state, dest.attempts, dest.at, dest.reason = state, delivery.attempts, now, reason
        rec.open -= 1
        self._changed(rec, now)

    def _changed(self, rec: Record, now: float) -> None:
        if not rec.open:
            settled = self._settled
            if rec.settled_at is not None:
                settled.pop(rec.event_id, None)
            settled[rec.event_id] = rec.settled_at = now
            if len(settled) > self.max_events or next(iter(settled.values())) < now - self.window_s:
                self._prune(now)
        if rec.event_id in self._waiters and rec.final:
            self._wake(rec.event_id)

    # ------------------------------------------------------------------ rebuilt at start
    def restore_delivered(self, rows: Sequence[tuple[str, str, str, str, str, str, str, int, float]]) -> None:
        """Completed deliveries the outbox kept (its ``delivered`` table): (event id, source, inbound,
        principal, route, outbound, address, attempts, at)."""
        for event_id, source, inbound, principal, route, outbound, address, attempts, at in rows:
            rec = self._records.get(event_id)
            if rec is None:
                rec = self._records[event_id] = Record(event_id, source, inbound, principal, None, [])
            rec.destinations.append(Destination(-1, route, outbound, intern(address), DELIVERED, attempts, at))
            self._changed(rec, at)

    def restore_dead(self, letters: Sequence[DeadLetter]) -> None:
        for dl in letters:
            rec = self._record(dl.event)
            if not dl.outbound:
                rec.reason = dl.reason
            else:
                rec.destinations.append(
                    Destination(-1, dl.route, dl.outbound, dl.address, DEAD, dl.attempts, dl.at, dl.reason)
                )
            self._changed(rec, dl.at)

    # ------------------------------------------------------------------ expiry
    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        settled = self._settled
        n = 0
        while settled and n < PRUNE_BATCH:
            event_id, at = next(iter(settled.items()))
            if at >= horizon and len(settled) <= self.max_events:
                break
            settled.popitem(last=False)
            self._expire(event_id)
            n += 1

    def _expire(self, event_id: str) -> None:
        rec = self._records.pop(event_id, None)
        if rec is None:
            return
        self.expired += 1
        self._tombstones[event_id] = None
        if len(self._tombstones) > self.max_events:
            self._tombstones.popitem(last=False)

    # ------------------------------------------------------------------ reads
    def lookup(self, event_id: str) -> StatusLookup:
        now = time.time()
        self._prune(now)
        rec = self._records.get(event_id)
        if rec is not None and rec.settled_at is not None and not rec.open and rec.settled_at < now - self.window_s:
            self._settled.pop(event_id, None)
            self._expire(event_id)
            rec = None
        if rec is None:
            return StatusLookup("expired" if event_id in self._tombstones else "unknown")
        return StatusLookup("known", rec.document(), rec.inbound, rec.principal)

    async def wait(self, event_id: str, timeout_s: float, gone: asyncio.Future[None] | None = None) -> WaitOutcome:
        """Wait until the event is final (every destination settled, or one dead-lettered), at most
        ``timeout_s``, or until ``gone`` resolves (see ``StatusReader.wait``); "busy" when ``max_waiters``
        wait already."""
        rec = self._records.get(event_id)
        if rec is None:
            return "unknown"
        if rec.final:
            return "final"
        if timeout_s <= 0:
            return "timeout"
        if self.waiting >= self.max_waiters:
            return "busy"
        if gone is not None and gone.done():
            return "gone"
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(event_id, [])
        waiters.append(fut)
        self.waiting += 1

        def left(_: asyncio.Future[None]) -> None:
            if not fut.done():
                fut.set_exception(_Gone())

        if gone is not None:
            gone.add_done_callback(left)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
            return "final"
        except TimeoutError:
            return "timeout"
        except _Gone:
            return "gone"
        finally:
            if gone is not None:
                gone.remove_done_callback(left)
            self.waiting -= 1
            if not fut.done():
                fut.cancel()
            listed = self._waiters.get(event_id)
            if listed is not None:
                if fut in listed:
                    listed.remove(fut)
                if not listed:
                    del self._waiters[event_id]

    def _wake(self, event_id: str) -> None:
        waiters = self._waiters.pop(event_id, None)
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    @property
    def waiter_entries(self) -> int:
        """Events with at least one waiter (0 when nothing waits: nothing left behind)."""
        return len(self._waiters)


class LocalStatus:
    """The ``StatusReader`` of one daemon (a worker of ``workers = N`` has a fleet-wide one: mediator/worker.py)."""

    def __init__(self, book: StatusBook) -> None:
        self.book = book

    @property
    def window_s(self) -> float:
        return self.book.window_s

    async def lookup(self, event_id: str) -> StatusLookup:
        return self.book.lookup(event_id)

    async def wait(self, event_id: str, timeout_s: float, gone: asyncio.Future[None] | None = None) -> WaitOutcome:
        return await self.book.wait(event_id, timeout_s, gone)


class StatusOutbox:
    """An ``Outbox`` that tells a ``StatusBook`` every transition of the outbox it wraps."""

    def __init__(self, inner: Outbox, book: StatusBook) -> None:
        self.inner = inner
        self.book = book
        self.on_commit: OnCommit | None = None
        inner.on_commit = self._committed

    def _committed(self, rows: list[Pending]) -> None:
        self.book.pending(rows)  # before anything is dispatched: a done can never precede its pending
        if self.on_commit is not None:
            self.on_commit(rows)

    async def open(self) -> list[Pending]:
        rows = await self.inner.open()
        restore = getattr(self.inner, "recent", None)
        if restore is not None:
            delivered, dead = await restore(self.book.window_s, self.book.max_events)
            self.book.restore_delivered(delivered)
            self.book.restore_dead(dead)
        self.book.pending(rows)
        return rows

    async def commit(self, items: Sequence[Accepted], duplicates: list[int] | None = None) -> list[Pending]:
        dups: list[int] = duplicates if duplicates is not None else []
        rows = await self.inner.commit(items, dups)
        self.book.refused(items, dups)
        return rows

    async def commit_with(self, items: Sequence[Accepted], also: Callable[[Any], None]) -> list[Pending]:
        """The inner outbox's ``commit_with`` (a replay's deliveries with its cursor, in one transaction)."""
        commit_with = self.inner.commit_with  # type: ignore[attr-defined]
        rows: list[Pending] = await commit_with(items, also)
        return rows

    def done(self, delivery: Pending) -> None:
        self.inner.done(delivery)
        self.book.done(delivery)

    def failed(self, delivery: Pending) -> None:
        self.inner.failed(delivery)
        self.book.failed(delivery)

    async def dead_letter(self, delivery: Pending, reason: str) -> None:
        await self.inner.dead_letter(delivery, reason)
        self.book.dead(delivery, reason)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self.inner.dead_letters(limit)

    async def replay(self, ids: Sequence[int] | None = None) -> list[Pending]:
        rows = await self.inner.replay(ids)
        self.book.pending(rows)
        return rows

    async def dead_letter_by_id(self, id: int) -> DeadLetter | None:
        return await self.inner.dead_letter_by_id(id)

    async def edit_dead_letter(self, id: int, event: Envelope) -> bool:
        return await self.inner.edit_dead_letter(id, event)

    async def delete_dead_letters(self, ids: Sequence[int]) -> int:
        return await self.inner.delete_dead_letters(ids)

    async def audit(self, who: str, action: str, detail: str) -> None:
        await self.inner.audit(who, action, detail)

    async def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        return await self.inner.audit_log(limit)

    async def stats(self) -> OutboxStats:
        return await self.inner.stats()

    async def close(self) -> None:
        await self.inner.close()
