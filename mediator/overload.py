"""Shedding by priority: which publishes the daemon refuses first when it is overloaded.

Modelled on Envoy's overload manager: *resource monitors* each report a pressure, *actions* fire when a
pressure crosses the action's threshold, and the actions here are two load-shed points, ``shed_low`` (refuse
low-priority publishes) and ``shed_normal`` (refuse normal ones too). Critical publishes are never shed; they
are accepted up to the outbox's hard limit (``[outbox] max_pending``), past which everything is refused as
before (``Overloaded``). The level is the highest action any monitor triggers:

============  ================================================  =========================================
monitor       pressure                                          thresholds (``[overload]``)
============  ================================================  =========================================
``outbox``    undelivered deliveries / ``max_pending``          ``outbox_low``, ``outbox_normal`` (fractions)
``loop_lag``  how late the event loop runs a periodic timer     ``loop_lag_low_s``, ``loop_lag_normal_s``
``broker``    an outbound holds deliveries and none has been    ``broker_stall_s``; sheds what
              confirmed for ``broker_stall_s`` (a broker that   ``broker_sheds`` says (default: low only)
              blocks publishers: RabbitMQ connection.blocked,
              confirms that stop; or one that is unreachable)
============  ================================================  =========================================

Why priority is an inbound's (``[inbound.NAME] priority``) and not a route's: the decision is made before
any work is spent on the event (authentication, validation, the commit), as Envoy's load-shed points are, and
a broker inbound can only be paused whole: a subscription or a queue cannot be asked for its critical
messages only. A publisher separates its classes of traffic by path, topic filter or queue.

What a shed publish gets: HTTP 503 with ``Retry-After``, gRPC ``RESOURCE_EXHAUSTED`` (``Shed`` is an
``Overloaded``); an MQTT or AMQP inbound of a shed priority is *paused*: it waits in ``admitted`` before
handing its messages over, holding them unacknowledged, so the broker (Receive Maximum, prefetch) sends no
more until the level drops. Every refusal and pause is counted by inbound, priority and monitor.

Cost on the hot path: ``refusal`` for a normal or low publish is a dict lookup, a division and two
comparisons; the other monitors are sampled by one timer every ``loop_interval_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field, model_validator

from mediator.core.errors import Overloaded
from mediator.core.seams import ConfigModel, InboundConfigBase

log = structlog.get_logger(__name__)

Priority = Literal["critical", "normal", "low"]
LEVELS = ("none", "shed_low", "shed_normal")
"""The load-shed levels: index 1 refuses low publishes, 2 low and normal ones."""
_RANK = {"low": 1, "normal": 2, "critical": 3}  # shed when the level is at least the rank
MONITORS = ("outbox", "loop_lag", "broker")


class OverloadConfig(ConfigModel):
    """``[overload]``: when publishes are shed by priority (README "Shedding by priority")."""

    enabled: bool = Field(default=True, description="false: no shedding; only max_pending refuses, every priority")
    outbox_low: float = Field(
        default=0.5, gt=0, le=1, description="outbox fill (undelivered / max_pending) from which low publishes are shed"
    )
    outbox_normal: float = Field(
        default=0.8, gt=0, le=1, description="outbox fill from which normal publishes are shed too"
    )
    loop_lag_low_s: float = Field(default=0.25, gt=0, description="event-loop lag from which low publishes are shed")
    loop_lag_normal_s: float = Field(
        default=1.0, gt=0, description="event-loop lag from which normal publishes are shed too"
    )
    loop_interval_s: float = Field(
        default=0.1, gt=0, le=5, description="period of the timer that measures the lag and samples the monitors"
    )
    broker_stall_s: float = Field(
        default=5.0,
        ge=0,
        description="an outbound holding deliveries with none confirmed for this long is back-pressure (0: off)",
    )
    broker_sheds: Literal["low", "normal"] = Field(
        default="low", description="what a broker's back-pressure sheds: low publishes, or normal ones too"
    )
    retry_after_s: float = Field(default=2.0, gt=0, description="the Retry-After a shed publish is answered with")

    @model_validator(mode="after")
    def _ordered(self) -> OverloadConfig:
        if self.outbox_low > self.outbox_normal:
            raise ValueError("outbox_low must not exceed outbox_normal (low publishes are shed first)")
        if self.loop_lag_low_s > self.loop_lag_normal_s:
            raise ValueError("loop_lag_low_s must not exceed loop_lag_normal_s (low publishes are shed first)")
        return self


class Shed(Overloaded):
    """A publish refused by priority: its inbound's priority is shed at the current level."""

    def __init__(self, reason: str, retry_after_s: float, monitor: str) -> None:
        super().__init__(reason, retry_after_s)
        self.monitor = monitor


class Stalling(Protocol):
    """What the broker monitor reads of a dispatcher (``mediator.dispatch.Dispatcher``)."""

    @property
    def stalled_s(self) -> float:
        """How long it has held deliveries without a confirmed one (0 when it holds none)."""
        ...

    @property
    def backlog(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Trigger:
    """A monitor past a threshold: the level it asks for and why."""

    monitor: str
    level: int
    reason: str


class Overload:
    """The overload state of one daemon: monitors, level, counts. Loop thread only."""

    def __init__(
        self,
        cfg: OverloadConfig,
        max_pending: int,
        backlog: Callable[[], int],
        dispatchers: Mapping[str, Stalling],
    ) -> None:
        self.cfg = cfg
        self.max_pending = max_pending
        self._backlog = backlog
        self._dispatchers = dispatchers
        self.priorities: dict[str, str] = {}  # inbound name -> priority (absent: normal)
        self.lag_s = 0.0  # the latest measured event-loop lag
        self.max_lag_s = 0.0  # the worst seen since the start
        self._sampled: tuple[Trigger, ...] = ()  # loop_lag and broker, as of the latest tick
        self._level = 0  # as of the latest tick, to log changes and wake paused inbounds
        self._changed = asyncio.Event()
        self.shed: dict[tuple[str, str, str], int] = {}  # (inbound, priority, monitor) -> publishes refused
        self.paused: dict[str, str] = {}  # broker inbound -> why it is paused now
        self.pauses: dict[tuple[str, str], int] = {}  # (inbound, priority) -> times paused
        self.level_changes = 0

    def configure(self, cfg: OverloadConfig, inbounds: Mapping[str, InboundConfigBase]) -> None:
        """Take a (re)loaded config's thresholds and the inbounds' priorities."""
        self.cfg = cfg
        self.priorities = {n: str(getattr(c, "priority", "normal")) for n, c in inbounds.items()}

    # ---------------------------------------------------------------- monitors
    def _outbox(self) -> Trigger | None:
        cfg = self.cfg
        fill = self._backlog() / self.max_pending
        if fill >= cfg.outbox_normal:
            level = 2
        elif fill >= cfg.outbox_low:
            level = 1
        else:
            return None
        limit = cfg.outbox_normal if level == 2 else cfg.outbox_low
        return Trigger("outbox", level, f"outbox {fill:.0%} full (threshold {limit:.0%} of max_pending)")

    def _sample(self) -> tuple[Trigger, ...]:
        cfg = self.cfg
        out: list[Trigger] = []
        lag = self.lag_s
        if lag >= cfg.loop_lag_low_s:
            level = 2 if lag >= cfg.loop_lag_normal_s else 1
            limit = cfg.loop_lag_normal_s if level == 2 else cfg.loop_lag_low_s
            out.append(Trigger("loop_lag", level, f"event loop {lag * 1000:.0f} ms late (threshold {limit:g} s)"))
        if cfg.broker_stall_s > 0:
            stalled = [
                (name, d.stalled_s, d.backlog)
                for name, d in self._dispatchers.items()
                if d.stalled_s >= cfg.broker_stall_s
            ]
            if stalled:
                name, secs, held = max(stalled, key=lambda s: s[1])
                out.append(
                    Trigger(
                        "broker",
                        _RANK[cfg.broker_sheds],
                        f"outbound {name!r}: nothing confirmed for {secs:.1f} s with {held} deliveries held"
                        + (f" (and {len(stalled) - 1} more outbounds)" if len(stalled) > 1 else ""),
                    )
                )
        return tuple(out)

    def triggers(self) -> list[Trigger]:
        """Every monitor past a threshold now (the outbox read live, the others as last sampled)."""
        outbox = self._outbox()
        return ([outbox] if outbox is not None else []) + list(self._sampled)

    @property
    def level(self) -> int:
        if not self.cfg.enabled:
            return 0
        return max((t.level for t in self.triggers()), default=0)

    # ---------------------------------------------------------------- admission
    def refusal(self, inbound: str) -> Shed | None:
        """Why a publish from ``inbound`` is shed now (counted), or None when it is admitted."""
        priority = self.priorities.get(inbound, "normal")
        if priority == "critical" or not self.cfg.enabled:
            return None
        rank = _RANK[priority]
        outbox = self._outbox()
        firing = [t for t in (outbox, *self._sampled) if t is not None and t.level >= rank]
        if not firing:
            return None
        trigger = max(firing, key=lambda t: t.level)
        key = (inbound, priority, trigger.monitor)
        self.shed[key] = self.shed.get(key, 0) + 1
        return Shed(f"overloaded, {priority} publishes shed: {trigger.reason}", self.cfg.retry_after_s, trigger.monitor)

    async def admitted(self, inbound: str) -> None:
        """Return once ``inbound``'s priority is admitted (at once when it is): a broker inbound calls it
        before handing messages over, and holds them unacknowledged meanwhile. Cancellation stops the wait."""
        priority = self.priorities.get(inbound, "normal")
        if priority == "critical" or not self.cfg.enabled:
            return
        rank = _RANK[priority]
        if self.level < rank:
            return
        reason = max(self.triggers(), key=lambda t: t.level).reason
        self.paused[inbound] = reason
        key = (inbound, priority)
        self.pauses[key] = self.pauses.get(key, 0) + 1
        log.warning("inbound.paused", inbound=inbound, priority=priority, reason=reason)
        started = time.monotonic()
        try:
            while self.level >= rank:
                changed = self._changed
                # The tick sets it whenever it runs a level change; the timeout covers the live outbox part.
                try:
                    async with asyncio.timeout(self.cfg.loop_interval_s * 5):
                        await changed.wait()
                except TimeoutError:
                    pass
        finally:
            self.paused.pop(inbound, None)
        log.info("inbound.resumed", inbound=inbound, priority=priority, paused_s=round(time.monotonic() - started, 3))

    # ---------------------------------------------------------------- the timer
    async def run(self) -> None:
        """Measure the event loop's lag and sample the monitors every ``loop_interval_s``, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            interval = self.cfg.loop_interval_s
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.lag_s = max(0.0, loop.time() - due)
            self.max_lag_s = max(self.max_lag_s, self.lag_s)
            self.tick()

    def tick(self) -> None:
        self._sampled = self._sample()
        level = self.level
        if level != self._level:
            self.level_changes += 1
            log.warning(
                "overload.level_changed",
                level=LEVELS[level],
                was=LEVELS[self._level],
                reasons=[t.reason for t in self.triggers()] or None,
            )
            self._level = level
            self._changed.set()
            self._changed = asyncio.Event()

    # ---------------------------------------------------------------- reading
    def status(self) -> dict[str, object]:
        """For ``/admin/status``: the level, every monitor's value and threshold, what was shed and why."""
        cfg = self.cfg
        backlog = self._backlog()
        triggers = self.triggers()
        stalled = {n: round(d.stalled_s, 3) for n, d in self._dispatchers.items() if d.stalled_s > 0}
        return {
            "enabled": cfg.enabled,
            "level": LEVELS[self.level] if cfg.enabled else "none",
            "shedding": [p for p in ("low", "normal") if cfg.enabled and self.level >= _RANK[p]],
            "reasons": [{"monitor": t.monitor, "level": LEVELS[t.level], "reason": t.reason} for t in triggers],
            "monitors": {
                "outbox": {
                    "pending": backlog,
                    "max_pending": self.max_pending,
                    "fill": round(backlog / self.max_pending, 4),
                    "low": cfg.outbox_low,
                    "normal": cfg.outbox_normal,
                },
                "loop_lag": {
                    "lag_s": round(self.lag_s, 4),
                    "max_lag_s": round(self.max_lag_s, 4),
                    "low_s": cfg.loop_lag_low_s,
                    "normal_s": cfg.loop_lag_normal_s,
                },
                "broker": {"stalled_s": stalled, "stall_s": cfg.broker_stall_s, "sheds": cfg.broker_sheds},
            },
            "priorities": dict(sorted(self.priorities.items())),
            "paused": dict(sorted(self.paused.items())),
            "shed": [
                {"inbound": i, "priority": p, "monitor": m, "refused": n} for (i, p, m), n in sorted(self.shed.items())
            ],
            "pauses": [{"inbound": i, "priority": p, "times": n} for (i, p), n in sorted(self.pauses.items())],
        }


class OverloadCollector(Collector):
    """``mediator_overload_*`` and ``mediator_events_shed_total``, read at scrape time."""

    def __init__(self, overload: Overload) -> None:
        self._o = overload

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        o = self._o
        level = o.level
        yield GaugeMetricFamily(
            "mediator_overload_level",
            "The load-shed level: 0 none, 1 low publishes shed, 2 low and normal ones shed.",
            value=float(level),
        )
        active = GaugeMetricFamily(
            "mediator_overload_triggered",
            "The level each overload monitor asks for now (0: below its thresholds).",
            labels=["monitor"],
        )
        by_monitor = {t.monitor: t.level for t in o.triggers()}
        for monitor in MONITORS:
            active.add_metric([monitor], float(by_monitor.get(monitor, 0)))
        yield active
        yield GaugeMetricFamily(
            "mediator_event_loop_lag_seconds", "How late the event loop ran its latest periodic timer.", value=o.lag_s
        )
        shed = CounterMetricFamily(
            "mediator_events_shed",
            "Publishes refused by priority under overload (503, RESOURCE_EXHAUSTED), by the monitor that shed them.",
            labels=["inbound", "priority", "monitor"],
        )
        for (inbound, priority, monitor), n in sorted(o.shed.items()):
            shed.add_metric([inbound, priority, monitor], float(n))
        yield shed
        paused = GaugeMetricFamily(
            "mediator_inbound_paused", "1 while a broker inbound is paused by priority.", labels=["inbound"]
        )
        for inbound in sorted(o.paused):
            paused.add_metric([inbound], 1.0)
        yield paused
        pauses = CounterMetricFamily(
            "mediator_inbound_pauses", "Times a broker inbound was paused by priority.", labels=["inbound", "priority"]
        )
        for (inbound, priority), n in sorted(o.pauses.items()):
            pauses.add_metric([inbound, priority], float(n))
        yield pauses
