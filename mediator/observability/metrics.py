"""Prometheus metrics, observed at the seams (DESIGN.md section 5), so a new protocol or stage is measured
without metrics code of its own:

- ``Sink.accept`` / ``Sink.authenticate`` (``mediator.pipeline``): events received, accepted, refused (by
  ``RejectCode``), deferred (503 / withheld acks), duplicates, routed per route, unmatched, dead-lettered at
  ingress; the commit's latency as its caller waits for it.
- the dispatcher's classification of ``Outbound.send`` (``mediator.dispatch``): sent, failed attempts,
  retries, dead letters, and the latency from the event's receipt to the peer's confirmation.
- the outbox's group transaction (``SqliteOutbox.on_transaction``): operations per transaction, write time.
- at scrape time, by ``StateCollector``: readiness of every ``Health`` component, broker connections and
  their reconnects, backlog and breaker per outbound, the config's version; plus prometheus-client's
  process, platform and GC collectors.

Labels are only names an admin chose (inbound, route, outbound, listener, broker, component) and small fixed
sets (a ``RejectCode`` value, the ``REASONS_*`` classes below): never an event id, a topic or an address, so
the number of series is bounded by the config.

Cost on the hot path (``timeit``, this machine): prometheus-client's bound counter ``inc`` costs 0.54 us
and a histogram ``observe`` 1.27 us (an observability check and a lock each time), which added up to 8-19 us
per event in ``bench.micro core``; the families here (``Counter``, ``Histogram`` below) keep plain floats
and counts that only the event loop writes, rendered at scrape time as prometheus-client's metric families
(the same exposition): 0.09 us per ``inc``, 0.20 us per ``observe``. Every child is still bound once per
inbound, outbound and route (``InboundMetrics``, ``OutboundMetrics``), so the hot path only looks it up.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from mediator import __version__
from mediator.config import Config
from mediator.core import deadletter
from mediator.core.health import Health
from mediator.core.router import Delivery, Unroutable
from mediator.core.seams import Reports
from mediator.outbox.base import Accepted

__all__ = [
    "CONTENT_TYPE",
    "GC_COLLECTOR",
    "PLATFORM_COLLECTOR",
    "PROCESS_COLLECTOR",
    "Metrics",
    "StateCollector",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
NAMESPACE = "mediator"

# Why a sender's events were not taken now but may be later (the sender retries): NotReady's two kinds.
DEFERRED_OVERLOADED = "overloaded"  # the outbox holds max_pending undelivered deliveries
DEFERRED_UNAVAILABLE = "unavailable"  # draining, or the outbox cannot commit
# A failed delivery attempt, by how the dispatcher classified it.
FAILED_RETRYABLE = "retryable"  # RetryableDeliveryError: not connected, broker nack, 5xx
FAILED_TIMEOUT = "timeout"  # no confirmation within send_timeout_s
FAILED_TERMINAL = "terminal"  # TerminalDeliveryError: unroutable, 4xx, too large
FAILED_ERROR = "error"  # the adapter raised something else (a bug): retried
# Why an event or a delivery became a dead letter: the classes of mediator.core.deadletter (one table,
# one classifier, also behind the dead-letter listing's "class").
REASONS_FAILED = (FAILED_RETRYABLE, FAILED_TIMEOUT, FAILED_TERMINAL, FAILED_ERROR)
REASONS_DEAD = tuple(c.name for c in deadletter.CLASSES)

# From a millisecond (a send to a broker on loopback) to five minutes (retries with backoff).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A group commit: tens of microseconds written into the page cache, an fsync of 1-2 ms, queueing behind one.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)


class _Count:
    """One counter series: a float the event loop adds to (no lock: the loop is its only writer, and a
    scrape on another thread reads a whole float)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Buckets:
    """One histogram series: a count per bucket (``le`` bounds, then +Inf), and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class Counter(Collector):
    """A counter family on plain floats, exposed at scrape time as prometheus-client's own
    ``CounterMetricFamily`` (the same exposition as its ``Counter``, without ``_created``).

    Why not prometheus-client's ``Counter``: each ``inc`` checks observability and takes a lock (0.46 us
    measured), and a few of them per event made the metrics cost 8-19 us per event in ``bench.micro core``
    against the 3% the observability issue allows; a float addition is some 40 ns."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        namespace: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], _Count] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> _Count:
        child = self._series.get(values)
        if child is None:
            child = self._series[values] = _Count()
        return child

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._series.items()):
            family.add_metric(values, child.value)
        return [family]


class Histogram(Collector):
    """A histogram family on plain counts (see ``Counter``), exposed as ``HistogramMetricFamily``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        namespace: str = "",
        registry: CollectorRegistry | None = None,
        buckets: tuple[float, ...],
    ) -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], _Buckets] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> _Buckets:
        child = self._series.get(values)
        if child is None:
            child = self._series[values] = _Buckets(self._bounds)
        return child

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._series.items()):
            cumulative, total = [], 0
            for bound, count in zip((*self._bounds, float("inf")), child.counts, strict=True):
                total += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
            family.add_metric(list(values), cumulative, child.sum)
        return [family]


class _Children(dict[str, _Count]):
    """Children of ``family`` for the last label's values, bound when first asked for (``labels`` costs
    as much as the increment, so it runs once per value, not per event); ``prefix`` fixes the others."""

    __slots__ = ("_family", "_prefix")

    def __init__(self, family: Counter, prefix: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._family = family
        self._prefix = prefix

    def __missing__(self, value: str) -> _Count:
        child = self[value] = self._family.labels(*self._prefix, value)
        return child


class InboundMetrics:
    """The children of one inbound."""

    __slots__ = ("accepted", "deferred", "duplicates", "received", "refused", "refused_batches", "unmatched")

    def __init__(self, m: Metrics, name: str) -> None:
        self.received = m.received.labels(name)
        self.accepted = m.accepted.labels(name)
        self.duplicates = m.duplicates.labels(name)
        self.unmatched = m.unmatched.labels(name)
        self.refused = _Children(m.refused, (name,))  # by RejectCode value
        self.refused_batches = _Children(m.refused_batches, (name,))
        self.deferred = _Children(m.deferred, (name,))


class OutboundMetrics:
    """The children of one outbound, bound once."""

    __slots__ = ("dead", "failed", "latency", "retried", "sent")

    def __init__(self, m: Metrics, name: str) -> None:
        self.sent = m.sent.labels(name)
        self.latency = m.latency.labels(name)
        self.failed = {r: m.failed.labels(name, r) for r in REASONS_FAILED}
        self.retried = {r: m.retried.labels(name, r) for r in REASONS_FAILED if r != FAILED_TERMINAL}
        self.dead = {r: m.dead_lettered.labels(name, r) for r in deadletter.DELIVERY_CLASSES}

    def delivered(self, received_s: float) -> None:
        """One delivery the peer confirmed, of an event received at ``received_s`` (Unix time; 0: unknown)."""
        self.sent.inc()
        if received_s:
            self.latency.observe(max(0.0, time.time() - received_s))


class _Off:
    """A metric family, and its children, that count nothing: ``[metrics] enabled = false``."""

    __slots__ = ()

    def labels(self, *values: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def collect(self) -> list[Metric]:
        return []


_OFF: Any = _Off()  # stands for a Counter or a Histogram: the same calls, no effect


class Metrics:
    """Every metric of one daemon, on a registry of its own (so tests can run several daemons in a process).

    Must be written from the event loop thread (the hot path does not look anything up twice). With
    ``counting`` off every family is ``_Off``: the seams' calls stay, and cost a no-op method call each.
    """

    def __init__(self, *, process: bool = False, counting: bool = True) -> None:
        self.counting = counting
        self.registry = r = CollectorRegistry(auto_describe=True)
        families = r if counting else None  # off: built (the names are checked), never registered
        ns = NAMESPACE
        self.received = Counter(
            "events_received",
            "Events an inbound handed over that reached an outcome: accepted, duplicate or refused.",
            ["inbound"],
            namespace=ns,
            registry=families,
        )
        self.accepted = Counter(
            "events_accepted",
            "Events committed to the outbox (the sender was acknowledged), duplicates excluded.",
            ["inbound"],
            namespace=ns,
            registry=families,
        )
        self.refused = Counter(
            "events_refused",
            "Events refused by an ingress stage or authentication, by RejectCode (a sender's fault, not retried).",
            ["inbound", "reason"],
            namespace=ns,
            registry=families,
        )
        self.refused_batches = Counter(
            "batches_refused",
            "Batches of more than one event refused whole (broker and gRPC stream inbounds then settle each "
            "event on its own, which the event counters count).",
            ["inbound", "reason"],
            namespace=ns,
            registry=families,
        )
        self.deferred = Counter(
            "events_deferred",
            "Events not taken now (503, UNAVAILABLE or RESOURCE_EXHAUSTED, a withheld ack): the sender retries.",
            ["inbound", "reason"],
            namespace=ns,
            registry=families,
        )
        self.duplicates = Counter(
            "events_duplicate",
            "Events whose source and id were committed within the dedup window: acknowledged, not delivered again.",
            ["inbound"],
            namespace=ns,
            registry=families,
        )
        self.routed = Counter(
            "events_routed",
            "Events a route matched (an event matched by two routes counts once for each).",
            ["route"],
            namespace=ns,
            registry=families,
        )
        self.unmatched = Counter(
            "events_unmatched",
            "Events no route matched (each is dead-lettered with reason unmatched).",
            ["inbound"],
            namespace=ns,
            registry=families,
        )
        self.sent = Counter(
            "deliveries_sent",
            "Deliveries the peer confirmed (PUBACK, publisher confirm, 2xx, stream write).",
            ["outbound"],
            namespace=ns,
            registry=families,
        )
        self.failed = Counter(
            "delivery_attempts_failed",
            "Delivery attempts that failed, by class: retryable, timeout, terminal, error.",
            ["outbound", "reason"],
            namespace=ns,
            registry=families,
        )
        self.retried = Counter(
            "deliveries_retried",
            "Retries scheduled after a failed attempt, by the failure's class.",
            ["outbound", "reason"],
            namespace=ns,
            registry=families,
        )
        self.dead_lettered = Counter(
            "dead_letters",
            "Dead letters stored, by outbound ('' for a whole event dead-lettered at ingress) and reason class.",
            ["outbound", "reason"],
            namespace=ns,
            registry=families,
        )
        self.latency = Histogram(
            "delivery_latency_seconds",
            "From the event's receipt by the inbound to the peer's confirmation of this delivery, retries included.",
            ["outbound"],
            namespace=ns,
            registry=families,
            buckets=LATENCY_BUCKETS,
        )
        self.commit = Histogram(
            "outbox_commit_seconds",
            "A commit as its caller waits for it: queued into a group transaction, written, made durable.",
            namespace=ns,
            registry=families,
            buckets=COMMIT_BUCKETS,
        )
        self.transaction_ops = Histogram(
            "outbox_transaction_operations",
            "Operations grouped into one outbox transaction (commits, dead letters, lazy writes).",
            namespace=ns,
            registry=families,
            buckets=BATCH_BUCKETS,
        )
        self.transaction_s = Histogram(
            "outbox_transaction_seconds",
            "Time to write one outbox transaction on the event loop (BEGIN to COMMIT, without the fsync).",
            namespace=ns,
            registry=families,
            buckets=COMMIT_BUCKETS,
        )
        if not counting:
            for name, value in list(vars(self).items()):
                if isinstance(value, Counter | Histogram):
                    setattr(self, name, _OFF)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self._inbounds: dict[str, InboundMetrics] = {}
        self._outbounds: dict[str, OutboundMetrics] = {}
        self._routes = _Children(self.routed)
        self._ingress_dead = {r: self.dead_lettered.labels("", r) for r in deadletter.EVENT_CLASSES}
        self._observe_commit = self.commit.observe

    # ---------------------------------------------------------------- children, bound once
    def inbound(self, name: str) -> InboundMetrics:
        m = self._inbounds.get(name)
        if m is None:
            m = self._inbounds[name] = InboundMetrics(self, name)
        return m

    def outbound(self, name: str) -> OutboundMetrics:
        m = self._outbounds.get(name)
        if m is None:
            m = self._outbounds[name] = OutboundMetrics(self, name)
        return m

    # ---------------------------------------------------------------- observations
    def committed(self, items: Sequence[Accepted], duplicates: Sequence[int], inbound: InboundMetrics) -> None:
        """One ``Sink.accept`` committed ``items``: count routes, unmatched events and the dead letters made
        at ingress, leaving out the duplicates (routed, then skipped by the commit)."""
        skip = set(duplicates) if duplicates else ()
        for i, item in enumerate(items):
            if i in skip:
                continue
            reason = item.dead_reason
            if reason is None:
                self.routed_event(item.deliveries, item.failures)
                for fail in item.failures:
                    self.dead_letter(fail.outbound, fail.reason)
            else:
                kind = deadletter.classify(reason, "")
                if kind == deadletter.UNMATCHED:
                    inbound.unmatched.inc()
                self._ingress_dead[kind].inc()

    def routed_event(self, deliveries: Sequence[Delivery], failures: Sequence[Unroutable]) -> None:
        """One event routed: each route that gave it a delivery or a failure counts once (the router lists
        a route's destinations together)."""
        routes = self._routes
        last = None
        for d in deliveries:
            if d.route != last:
                last = d.route
                routes[last].inc()
        for f in failures:
            if f.route != last:
                last = f.route
                routes[last].inc()

    def dead_letter(self, outbound: str, reason: str) -> None:
        """One dead letter stored, of a delivery to ``outbound`` ("" for a whole event), counted by the class
        of its reason (``deadletter.classify``). The dispatcher counts its own through its bound children."""
        if outbound:
            self.outbound(outbound).dead[deadletter.classify(reason, outbound)].inc()
        else:
            self._ingress_dead[deadletter.classify(reason, "")].inc()

    def commit_took(self, seconds: float) -> None:
        self._observe_commit(seconds)

    def transaction(self, operations: int, seconds: float) -> None:
        """``SqliteOutbox.on_transaction``: one group transaction written."""
        self.transaction_ops.observe(operations)
        self.transaction_s.observe(seconds)

    # ---------------------------------------------------------------- reading
    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def totals(self) -> dict[str, dict[tuple[str, ...], float]]:
        """The counters' values by metric name (without ``_total``) and label values, for ``/admin/status``."""
        out: dict[str, dict[tuple[str, ...], float]] = {}
        for family in (
            self.received,
            self.accepted,
            self.refused,
            self.refused_batches,
            self.deferred,
            self.duplicates,
            self.routed,
            self.unmatched,
            self.sent,
            self.failed,
            self.retried,
            self.dead_lettered,
        ):
            for metric in family.collect():
                values = out.setdefault(metric.name.removeprefix(NAMESPACE + "_"), {})
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        values[tuple(sample.labels.values())] = sample.value
        return out


class DispatcherState(Protocol):
    """What the collector reads of a dispatcher (``mediator.dispatch.Dispatcher``)."""

    @property
    def backlog(self) -> int: ...

    @property
    def breaker_open(self) -> bool: ...

    @property
    def consecutive_failures(self) -> int: ...


class SpanCounts(Protocol):
    """What the collector reads of the span recorder (``mediator.observability.spans.Recorder``)."""

    @property
    def exported(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    @property
    def failed(self) -> int: ...


class Observed(Protocol):
    """What the collector reads of a running daemon (``mediator.daemon.Daemon``), each time it is scraped."""

    @property
    def spans(self) -> SpanCounts | None: ...

    @property
    def health(self) -> Health: ...

    @property
    def config(self) -> Config: ...

    @property
    def config_version(self) -> str: ...

    @property
    def config_loaded_at(self) -> float: ...

    @property
    def dispatchers(self) -> Mapping[str, DispatcherState]: ...

    @property
    def reports(self) -> Reports: ...


def adapter_families(reports: Reports) -> Iterator[Metric]:
    """The counts adapters keep of their own (``Reporter.samples``: a push outbound's subscribers), one
    family per name; a family's help and kind are its first sample's."""
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for reporter in list(reports.by_component.values()):
        for sample in reporter.samples():
            family = families.get(sample.name)
            labels = [k for k, _ in sample.labels]
            if family is None:
                make = GaugeMetricFamily if sample.kind == "gauge" else CounterMetricFamily
                family = families[sample.name] = make(f"{NAMESPACE}_{sample.name}", sample.help, labels=labels)
            family.add_metric([v for _, v in sample.labels], float(sample.value))
    yield from families.values()


def broker_of(config: Config) -> dict[str, str]:
    """Health component (``inbound:NAME``, ``outbound:NAME``) -> the broker it connects to."""
    brokers = set(config.root.brokers)
    out: dict[str, str] = {}
    for adapter in config.adapters.values():
        for role, sections in (("inbound", adapter.inbounds), ("outbound", adapter.outbounds)):
            for name, cfg in sections.items():
                ref = cfg.connection()
                if ref is not None and ref in brokers:
                    out[f"{role}:{name}"] = ref
    return out


class StateCollector(Collector):
    """Gauges read at scrape time from what the daemon already knows, so no adapter writes metrics."""

    def __init__(self, daemon: Observed) -> None:
        self._daemon = daemon

    def describe(self) -> Iterable[Metric]:
        return ()  # collected at scrape time only: the set of components changes with a reload

    def collect(self) -> Iterator[Metric]:
        d = self._daemon
        health = d.health
        states = health.snapshot()
        ready = GaugeMetricFamily(
            f"{NAMESPACE}_component_ready",
            "1 when a component (listener:, inbound:, outbound:NAME) reports ready, else 0.",
            labels=["component"],
        )
        for component, state in states.items():
            ready.add_metric([component], 1.0 if state["ready"] else 0.0)
        yield ready
        connected = GaugeMetricFamily(
            f"{NAMESPACE}_broker_connected",
            "1 while the component's connection to the broker is up, else 0.",
            labels=["broker", "component"],
        )
        reconnects = CounterMetricFamily(
            f"{NAMESPACE}_broker_reconnects",
            "Times the component's broker connection came back after it had been up.",
            labels=["broker", "component"],
        )
        for component, broker in sorted(broker_of(d.config).items()):
            conn = states.get(component)
            if conn is None:
                continue
            connected.add_metric([broker, component], 1.0 if conn["ready"] else 0.0)
            reconnects.add_metric([broker, component], float(max(0, health.connects(component) - 1)))
        yield connected
        yield reconnects
        backlog = GaugeMetricFamily(
            f"{NAMESPACE}_backlog_deliveries",
            "Deliveries committed and not yet done or dead-lettered (queued, sending, or waiting to retry).",
            labels=["outbound"],
        )
        breaker = GaugeMetricFamily(
            f"{NAMESPACE}_breaker_open", "1 while the outbound's circuit breaker holds sends back.", labels=["outbound"]
        )
        failures = GaugeMetricFamily(
            f"{NAMESPACE}_outbound_consecutive_failures",
            "Failed attempts in a row (the breaker opens at 5).",
            labels=["outbound"],
        )
        for name, dispatcher in sorted(d.dispatchers.items()):
            backlog.add_metric([name], float(dispatcher.backlog))
            breaker.add_metric([name], 1.0 if dispatcher.breaker_open else 0.0)
            failures.add_metric([name], float(dispatcher.consecutive_failures))
        yield backlog
        yield breaker
        yield failures
        yield GaugeMetricFamily(
            f"{NAMESPACE}_draining", "1 once the daemon is draining for a stop.", value=1.0 if health.draining else 0.0
        )
        info = InfoMetricFamily(f"{NAMESPACE}_config", "The config in force: its version (SHA-256, 12 hex digits).")
        info.add_metric([], {"version": d.config_version})
        yield info
        yield GaugeMetricFamily(
            f"{NAMESPACE}_config_loaded_timestamp_seconds",
            "When the config in force was loaded (Unix time).",
            value=d.config_loaded_at,
        )
        spans = d.spans
        if spans is not None:
            outcomes = CounterMetricFamily(
                f"{NAMESPACE}_spans",
                "Sampled spans by outcome: exported (the collector took them), failed (an export the collector "
                "refused or that timed out), dropped (the export queue was full).",
                labels=["outcome"],
            )
            for outcome, count in (("exported", spans.exported), ("failed", spans.failed), ("dropped", spans.dropped)):
                outcomes.add_metric([outcome], float(count))
            yield outcomes
        book = getattr(d, "status", None)  # the delivery status (mediator/status.py), when the daemon keeps one
        if book is not None:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_status_events",
                "Events whose delivery status is held (pending, or settled within the status window).",
                value=float(len(book)),
            )
            yield GaugeMetricFamily(
                f"{NAMESPACE}_status_waiting_requests",
                "Publishes waiting for delivery (Prefer: wait, gRPC prefer metadata) now.",
                value=float(book.waiting),
            )
            yield CounterMetricFamily(
                f"{NAMESPACE}_status_expired",
                "Delivery statuses dropped past the status window or count.",
                value=float(book.expired),
            )
        yield from adapter_families(d.reports)
        build = InfoMetricFamily(f"{NAMESPACE}_build", "The running mediator's version.")
        build.add_metric([], {"version": __version__})
        yield build
