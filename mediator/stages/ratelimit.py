"""Rate limits: GCRA (the generic cell rate algorithm) per principal, per inbound or for everything.

A few lines of our own because no maintained library both refuses at once (for HTTP 429 / gRPC
RESOURCE_EXHAUSTED) and tells how long to wait (for a broker inbound, which slows down instead):
``limits`` and ``aiolimiter`` each do one of the two. GCRA keeps one float per caller (the theoretical
arrival time, TAT): an event costs ``1/rate`` seconds of it, and a request passes while TAT stays within
``burst/rate`` seconds of now. Callers are independent: one flooding never uses another's allowance.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Sequence
from urllib.parse import unquote

import structlog

from mediator.core.errors import RateLimitState, RejectCode, Rejected
from mediator.core.ingress import Batch, Origin, Principal
from mediator.stages.config import RateLimitConfig

log = structlog.get_logger(__name__)


class Gcra:
    """One limit's state for every key it counts."""

    def __init__(self, name: str, rate: float, burst: int, max_keys: int) -> None:
        self.name = name
        self.rate = rate
        self.burst = burst if burst > 0 else max(1, math.ceil(rate))
        self._interval = 1.0 / rate
        self._tolerance = self.burst * self._interval
        self._max_keys = max_keys
        self._tat: dict[str, float] = {}

    def check(self, key: str, cost: int, now: float) -> tuple[float, float]:
        """(the new TAT if ``cost`` events were let through now, how long they would have to wait)."""
        tat = self._tat.get(key, now)
        new_tat = max(tat, now) + cost * self._interval
        delay = new_tat - now - self._tolerance
        return new_tat, delay if delay > 1e-9 else 0.0  # a burst exactly used up is not over it

    def commit(self, key: str, new_tat: float, now: float) -> None:
        tat = self._tat
        if key not in tat and len(tat) >= self._max_keys:
            self._forget_idle(now)
        tat[key] = new_tat

    def _forget_idle(self, now: float) -> None:
        # A key whose TAT is past is indistinguishable from a new one: forget those first, then the oldest.
        idle = [k for k, t in self._tat.items() if t <= now]
        for k in idle:
            del self._tat[k]
        if len(self._tat) >= self._max_keys:
            for k in list(self._tat)[: max(1, self._max_keys // 8)]:
                del self._tat[k]

    def state(self, key: str, now: float) -> RateLimitState:
        backlog = max(0.0, self._tat.get(key, now) - now)
        remaining = max(0, math.floor((self._tolerance - backlog) / self._interval + 1e-9))
        return RateLimitState(self.name, self.burst, self._tolerance, remaining, backlog)


def _client_key(peer: str) -> str:
    """Anonymous callers are counted per address; IPv6 per /64, which one host usually holds whole.
    ``peer`` is an address, ``host:port``, or gRPC's ``ipv4:h:p`` / ``ipv6:%5B...%5D:p``."""
    host = unquote(peer)
    for prefix in ("ipv4:", "ipv6:"):
        host = host.removeprefix(prefix)
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return f"peer:{host}"
    if addr.version == 6:
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return f"ip:{mapped}"
        return f"net:{ipaddress.ip_network(f'{addr}/64', strict=False)}"
    return f"ip:{addr}"


class _Limit:
    def __init__(self, cfg: RateLimitConfig) -> None:
        self.cfg = cfg
        self.gcra = Gcra(cfg.name, cfg.rate, cfg.burst, cfg.max_keys)
        self.inbounds = frozenset(cfg.inbounds)

    def key(self, origin: Origin, principal: Principal) -> str:
        per = self.cfg.per
        if per == "global":
            return ""
        if per == "inbound":
            return origin.inbound
        if principal.id:
            return f"p:{principal.mechanism}:{principal.id}"
        return _client_key(origin.peer)


class RateLimit:
    name = "rate-limit"

    def __init__(self, limits: Sequence[RateLimitConfig]) -> None:
        self._limits = [_Limit(c) for c in limits]

    @property
    def enabled(self) -> bool:
        return bool(self._limits)

    async def run(self, batch: Batch) -> None:
        origin = batch.origin
        applying = [lim for lim in self._limits if not lim.inbounds or origin.inbound in lim.inbounds]
        if not applying or not batch.events:
            return
        # Events of one batch may come from several principals (broker inbounds): count each principal's.
        groups: dict[int, tuple[Principal, int]] = {}
        for principal in batch.principals:
            p, n = groups.get(id(principal), (principal, 0))
            groups[id(principal)] = (p, n + 1)
        now = time.monotonic()
        planned: list[tuple[_Limit, str, float]] = []
        wait = 0.0
        refusing: tuple[_Limit, str, float] | None = None
        for lim in applying:
            per_key: dict[str, int] = {}
            for principal, count in groups.values():
                k = lim.key(origin, principal)
                per_key[k] = per_key.get(k, 0) + count
            for k, count in per_key.items():
                if count > lim.gcra.burst and not origin.broker:
                    # Waiting would never help: say so instead of a 429 the client would retry forever.
                    raise Rejected(
                        RejectCode.TOO_LARGE,
                        f"{count} events at once exceed what rate limit {lim.cfg.name!r} allows (bursts of "
                        f"{lim.gcra.burst}): send smaller batches",
                        rule=lim.cfg.name,
                    )
                new_tat, delay = lim.gcra.check(k, count, now)
                if delay > 0 and (refusing is None or delay > refusing[2]):
                    refusing = (lim, k, delay)
                wait = max(wait, delay)
                planned.append((lim, k, new_tat))
        if refusing is not None and not origin.broker:
            lim, k, delay = refusing
            raise Rejected(
                RejectCode.RATE_LIMITED,
                f"rate limit {lim.cfg.name!r} exceeded ({lim.cfg.rate:g} events/s, bursts of {lim.gcra.burst})",
                rule=lim.cfg.name,
                retry_after_s=delay,
                limit=lim.gcra.state(k, now),
            )
        # Let through (a broker inbound: after the wait, its acks withheld meanwhile, so the broker's
        # prefetch / Receive Maximum bounds what waits). Nothing is counted for a refused request.
        for lim, k, new_tat in planned:
            lim.gcra.commit(k, new_tat, now)
        if wait > 0:
            log.debug("rate_limit.waiting", inbound=origin.inbound, wait_s=round(wait, 3), events=len(batch.events))
            await asyncio.sleep(wait)
