"""Who is subscribed to a push outbound, the fan-out to them, and who may subscribe.

Every subscriber has a bounded buffer of live entries (``subscriber_buffer``). The ring hands each
committed entry to ``Hub.publish``, which appends it to the buffer of every matching subscriber and never
waits: a subscriber whose buffer is full is disconnected (``slow_consumer``) instead, so one slow reader
never holds the dispatcher or the other subscribers, and memory stays bounded. It can resume from the
last cursor it received; the ring still has what it missed.

An SSE stream whose writer has caught up is written by the fan-out itself (``Subscriber.direct``): the
entries of one ``coalesce_ms`` window go to its transport in one write, the same bytes for every stream on
the address, with no task woken per subscriber per event. Only while nothing is queued for it (in its buffer
or in the transport): a socket that is behind gets its entries through the buffer and the writer task, so
the order, the bound and the ``slow_consumer`` cut-off are the same as before.

No gap, no duplicate at the seam between backlog and live: ``attach`` registers the subscriber (live
entries queue up for it from then on) and takes the backlog from the ring in the same synchronous step,
so an entry is either in the backlog or in the buffer, never both and never neither; the writer skips any
cursor not newer than the last it sent all the same.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog

from adapters.push.config import SubscribeRuleConfig
from adapters.push.ring import Entry, Ring
from mediator.core.ingress import Principal, Who
from mediator.core.patterns import TopicPattern
from mediator.core.seams import Sample

DEFAULT_DENY = "default-deny"

COALESCE_FACTOR = 3.0
"""After a fan-out write that took t, the next one waits up to ``COALESCE_FACTOR * t`` (at most
``coalesce_ms``) for more events: writing a fan-out takes at most about a quarter of the loop while events
come faster than it can write them one by one, and a cheap fan-out (few subscribers) is never held."""


def covers(rule: str, pattern: str) -> bool:
    """True when every address ``pattern`` matches is matched by ``rule`` (both address patterns)."""
    r = rule.split(".")
    p = pattern.split(".")
    for i, seg in enumerate(r):
        if seg == "#":
            return True
        if i >= len(p) or p[i] == "#":
            return False
        if seg != "*" and p[i] != seg:
            return False
    return len(p) == len(r)


@dataclass(frozen=True, slots=True)
class SubscribeRule:
    name: str
    allow: bool
    who: Who
    addresses: tuple[str, ...]

    @classmethod
    def compile(cls, cfg: SubscribeRuleConfig) -> SubscribeRule:
        return cls(
            cfg.name, cfg.effect == "allow", Who.compile(cfg.principals, cfg.roles, cfg.anonymous), tuple(cfg.addresses)
        )

    def matches(self, principal: Principal, pattern: str) -> bool:
        if self.allow and not any(covers(a, pattern) for a in self.addresses):
            return False
        # A deny rule refuses a subscription that reaches into any address it names.
        if not self.allow and not any(covers(a, pattern) or covers(pattern, a) for a in self.addresses):
            return False
        return self.who.admits(principal)


def refusing_rule(rules: Sequence[SubscribeRule], principal: Principal, pattern: str, auth: bool) -> str | None:
    """The name of the rule that refuses ``principal`` a subscription to ``pattern``, or None when allowed.
    Default deny once the listener authenticates or any rule exists."""
    for rule in rules:
        if not rule.allow and rule.matches(principal, pattern):
            return rule.name
    if not rules and not auth:
        return None
    if any(rule.allow and rule.matches(principal, pattern) for rule in rules):
        return None
    return DEFAULT_DENY


class Subscriber:
    """One live SSE stream or WebSocket. ``cursor`` is the newest cursor written to it."""

    __slots__ = (
        *("address", "beat", "buffer", "chunked", "cursor", "direct", "key", "kicked", "limit"),
        *("matches", "peer", "task", "transport", "wake", "written"),
    )

    def __init__(self, address: str, key: str, peer: str, transport: str, limit: int, cursor: int) -> None:
        self.address = address
        self.key = key  # who, for the per-principal limit: the principal id, or the client address
        self.peer = peer
        self.transport = transport  # "sse" or "websocket"
        self.limit = limit
        self.cursor = cursor
        self.buffer: deque[Entry] = deque()
        self.wake = asyncio.Event()
        self.kicked: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.written = time.monotonic()  # when it was last written to (events or a heartbeat)
        self.beat = False  # the hub's ticker says: write a heartbeat
        # An SSE stream whose writer has caught up: ``publish`` writes live entries straight to this
        # transport (as HTTP/1.1 chunks when ``chunked``) while nothing waits in ``buffer`` or in it.
        self.direct: asyncio.Transport | None = None
        self.chunked = False
        pattern = TopicPattern(address)
        self.matches: Callable[[str], bool] | None = (
            None if "*" not in address and "#" not in address else (lambda a: pattern.matches(a, "."))
        )


@dataclass(frozen=True, slots=True)
class Attached:
    backlog: list[Entry]
    missed: tuple[int, int] | None  # (after, oldest retained - 1): events after the cursor that are gone
    ahead: bool  # the cursor is newer than anything this ring has assigned


DISCONNECT_REASONS = ("client_closed", "slow_consumer", "shutdown", "error")


class Hub:
    """The subscribers of one push outbound (loop thread only)."""

    def __init__(
        self, outbound: str, ring: Ring, max_subscribers: int, max_per_principal: int, coalesce_s: float = 0.0
    ) -> None:
        self.outbound = outbound
        self.ring = ring
        self.max_subscribers = max_subscribers
        self.max_per_principal = max_per_principal
        self.coalesce_s = coalesce_s
        self._pending: list[Entry] = []  # published, for the caught-up SSE streams at the next ``_flush``
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushed = 0.0  # when the last flush ended (time.monotonic)
        self._flush_cost = 0.0  # how long it took
        self._exact: dict[str, list[Subscriber]] = {}
        self._wild: list[Subscriber] = []
        self._count = 0
        self._per_key: Counter[str] = Counter()
        self._by_address: Counter[str] = Counter()
        self.pushed: Counter[str] = Counter()  # by transport
        self.disconnects: Counter[str] = Counter()  # by reason
        self.resumes = 0
        self.gaps = 0
        self.connects = 0
        self.empty = asyncio.Event()  # set while nobody is subscribed (a stop waits for it, bounded)
        self.empty.set()
        self._log = structlog.get_logger(__name__).bind(outbound=outbound, protocol="push")

    @property
    def count(self) -> int:
        return self._count

    def full(self, key: str) -> str | None:
        """Why one more subscriber for ``key`` is refused, or None."""
        if self._count >= self.max_subscribers:
            return f"outbound {self.outbound!r} has its {self.max_subscribers} subscribers"
        if self._per_key[key] >= self.max_per_principal:
            return f"{self.max_per_principal} subscriptions at once per caller"
        return None

    def attach(self, sub: Subscriber, after: int | None) -> Attached:
        """Register ``sub`` and take its backlog (see the module docstring); ``after`` None: live only."""
        if sub.matches is None:
            self._exact.setdefault(sub.address, []).append(sub)
        else:
            self._wild.append(sub)
        self._count += 1
        self.empty.clear()
        self._per_key[sub.key] += 1
        self._by_address[sub.address] += 1
        self.connects += 1
        ring = self.ring
        if after is None:
            sub.cursor = ring.last
            return Attached([], None, False)
        self.resumes += 1
        sub.cursor = after
        ahead = after > ring.last
        missed = None
        if after < ring.floor:
            oldest = ring.oldest()
            missed = (after, (oldest - 1) if oldest is not None else ring.floor)
            self.gaps += 1
        if ahead:
            sub.cursor = ring.last
            return Attached([], missed, True)
        match = sub.matches
        address = sub.address
        backlog = [e for e in ring.after(after) if (e.address == address if match is None else match(e.address))]
        return Attached(backlog, missed, False)

    def detach(self, sub: Subscriber, reason: str) -> None:
        if sub.matches is None:
            subs = self._exact.get(sub.address)
            if subs is None or sub not in subs:
                return
            subs.remove(sub)
            if not subs:
                del self._exact[sub.address]
        else:
            if sub not in self._wild:
                return
            self._wild.remove(sub)
        self._count -= 1
        if not self._count:
            self.empty.set()
        self._per_key[sub.key] -= 1
        if not self._per_key[sub.key]:
            del self._per_key[sub.key]
        self._by_address[sub.address] -= 1
        if not self._by_address[sub.address]:
            del self._by_address[sub.address]
        self.disconnects[sub.kicked or reason] += 1

    def publish(self, entry: Entry) -> None:
        """Hand ``entry`` to every matching subscriber; never waits (see the module docstring).

        A subscriber whose writer is busy (``direct`` None: its backlog, a socket that was behind, a
        WebSocket) has it in its buffer at once. The caught-up SSE streams get it from ``_flush``: at once
        when the last flush ended long enough ago (``COALESCE_FACTOR`` times what it took, at most
        ``coalesce_s``), else with what else arrives until then, all in one write per subscriber (the
        bytes shared by every stream on the address). So a large fan-out costs at most one write per
        subscriber per ``coalesce_s`` however fast events come, for at most that much latency, and a small
        one is written at once."""
        deferred = False
        exact = self._exact.get(entry.address)
        if exact:
            for sub in tuple(exact):
                if sub.direct is None:
                    self._offer(sub, entry)
                else:
                    deferred = True
        if self._wild:
            address = entry.address
            for sub in tuple(self._wild):
                assert sub.matches is not None
                if sub.matches(address):
                    if sub.direct is None:
                        self._offer(sub, entry)
                    else:
                        deferred = True
        if not deferred:
            return
        self._pending.append(entry)
        if self._flush_handle is None:
            wait = self._flushed + min(self.coalesce_s, COALESCE_FACTOR * self._flush_cost) - time.monotonic()
            if wait <= 0:
                self._flush()
            else:
                self._flush_handle = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        """Write the pending entries to the caught-up SSE streams (see ``publish``)."""
        self._flush_handle = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        start = time.monotonic()
        try:
            self._fan_out(batch)
        finally:
            self._flushed = time.monotonic()
            self._flush_cost = self._flushed - start

    def _fan_out(self, batch: list[Entry]) -> None:
        by_address: dict[str, list[Entry]] = {}
        for entry in batch:
            by_address.setdefault(entry.address, []).append(entry)
        for address, entries in by_address.items():
            subs = self._exact.get(address)
            if subs:
                self._deliver(tuple(subs), entries)
        if self._wild:
            patterns: dict[str, list[Subscriber]] = {}
            for sub in self._wild:
                patterns.setdefault(sub.address, []).append(sub)
            for subs_ in patterns.values():
                match = subs_[0].matches
                assert match is not None
                entries = [e for e in batch if match(e.address)]
                if entries:
                    self._deliver(subs_, entries)

    def _deliver(self, subs: Sequence[Subscriber], entries: list[Entry]) -> None:
        plain: bytes | None = None
        chunk: bytes | None = None
        first, last = entries[0].cursor, entries[-1].cursor
        now = time.monotonic()
        written = 0
        for sub in subs:
            direct = sub.direct
            if direct is None or sub.kicked is not None:
                continue  # it had them from ``publish`` (or joined since, after them)
            if sub.cursor < first and not sub.buffer and not direct.get_write_buffer_size() and not direct.is_closing():
                # Nothing queued before them, in the buffer or the transport: straight to the socket, no
                # task woken, the order kept.
                if sub.chunked:
                    if chunk is None:
                        if len(entries) == 1:
                            chunk = entries[0].sse_chunk()
                        else:
                            body = plain if plain is not None else b"".join([e.sse() for e in entries])
                            chunk = b"".join((b"%x\r\n" % len(body), body, b"\r\n"))
                    direct.write(chunk)
                else:
                    if plain is None:
                        plain = b"".join([e.sse() for e in entries])
                    direct.write(plain)
                sub.cursor = last
                sub.written = now
                written += len(entries)
                continue
            for entry in entries:  # the socket is behind: its writer takes them from the buffer
                if entry.cursor > sub.cursor and sub.kicked is None:
                    self._offer(sub, entry)
        self.pushed["sse"] += written

    def _offer(self, sub: Subscriber, entry: Entry) -> None:
        if sub.kicked is not None:
            return
        if len(sub.buffer) >= sub.limit:
            self.kick(sub, "slow_consumer")
            return
        sub.buffer.append(entry)
        sub.wake.set()

    def kick(self, sub: Subscriber, reason: str) -> None:
        """Disconnect ``sub``: its writer is cancelled and its stream ends with ``reason``."""
        if sub.kicked is not None:
            return
        sub.kicked = reason
        sub.direct = None
        sub.buffer.clear()
        log = self._log.warning if reason == "slow_consumer" else self._log.info
        log("subscriber.dropped", peer=sub.peer, address=sub.address, reason=reason, cursor=sub.cursor)
        if sub.task is not None:
            sub.task.cancel()
        sub.wake.set()

    def heartbeat(self, interval_s: float) -> None:
        """Wake every SSE subscriber nothing was written to for ``interval_s``, to write a heartbeat comment.
        One ticker for all of them, rather than a timer per subscriber per wait (1,000 subscribers at 100
        events/s would arm and cancel 100,000 timers a second)."""
        due = time.monotonic() - interval_s
        for sub in [*self._wild, *(s for subs in self._exact.values() for s in subs)]:
            if sub.transport == "sse" and sub.written <= due and not sub.beat:
                sub.beat = True
                sub.wake.set()

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for sub in [*self._wild, *(s for subs in self._exact.values() for s in subs)]:
            self.kick(sub, "shutdown")

    # ---------------------------------------------------------------- Reporter

    def samples(self) -> Iterable[Sample]:
        o = ("outbound", self.outbound)
        yield Sample(
            "push_ring_events", "Events the push outbound's ring retains.", "gauge", (o,), len(self.ring.entries)
        )
        yield Sample(
            "push_ring_cursor", "The newest cursor the push outbound's ring assigned.", "gauge", (o,), self.ring.last
        )
        for address, n in sorted(self._by_address.items()):
            yield Sample(
                "push_subscribers", "Live SSE and WebSocket subscribers.", "gauge", (o, ("address", address)), n
            )
        for transport in ("sse", "websocket"):
            yield Sample(
                "push_events_pushed",
                "Events written to push subscribers.",
                "counter",
                (o, ("transport", transport)),
                self.pushed[transport],
            )
        for reason in DISCONNECT_REASONS:
            yield Sample(
                "push_disconnects",
                "Push subscribers that went away, by reason (slow_consumer: its buffer filled).",
                "counter",
                (o, ("reason", reason)),
                self.disconnects[reason],
            )
        yield Sample("push_resumes", "Subscriptions that resumed from a cursor.", "counter", (o,), self.resumes)
        yield Sample(
            "push_resume_gaps",
            "Resumes from a cursor older than the ring retains (the subscriber was told it missed events).",
            "counter",
            (o,),
            self.gaps,
        )

    def status(self) -> dict[str, object]:
        ring = self.ring
        return {
            "subscribers": self._count,
            "by_address": dict(sorted(self._by_address.items())),
            "ring": {"events": len(ring.entries), "oldest": ring.oldest(), "newest": ring.newest, "floor": ring.floor},
            "pushed": dict(self.pushed),
            "disconnects": dict(self.disconnects),
            "resumes": self.resumes,
            "gaps": self.gaps,
        }
