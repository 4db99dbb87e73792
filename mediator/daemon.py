"""The daemon's lifecycle: build everything from a config, run it, drain on SIGTERM/SIGINT.

Stop order (as uvicorn and Benthos do it): refuse new intake, let in-flight commits finish, give the
dispatchers what is left of the drain budget to deliver, then cancel everything. Whatever is not
delivered stays in a durable outbox for the next start. A second signal skips the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from mediator.admin import DeadLetterAdmin
from mediator.config import Config, loads
from mediator.core.deadletter import REMOVED_PREFIX
from mediator.core.envelope import Envelope
from mediator.core.errors import ConfigError, MediatorError, NotReady, Rejected
from mediator.core.health import Health
from mediator.core.ingress import Origin, Principal
from mediator.core.router import Router
from mediator.core.seams import (
    Built,
    MetricsEndpoint,
    Mounts,
    OutboundConfigBase,
    Reports,
    RequestOutbound,
    Runtime,
    Service,
    Sink,
    StatusReader,
)
from mediator.correlator import CorrelatorCollector
from mediator.dispatch import Backlog, Dispatcher
from mediator.history.unit import History, HistoryCollector
from mediator.lock import DaemonLock
from mediator.observability.metrics import CONTENT_TYPE, Metrics, StateCollector
from mediator.observability.tracing import SpanTotals, Tracing
from mediator.outbox import MemoryOutbox, Outbox, Pending, SqliteOutbox, StorageError
from mediator.overload import Overload, OverloadCollector
from mediator.pipeline import Pipeline
from mediator.rates import Rates
from mediator.registry import load_specs
from mediator.reloadable import in_force, restart_required
from mediator.schemaregistry.http import RegistryServer, make_registry
from mediator.schemaregistry.http import StoreError as SchemaStoreError
from mediator.schemaregistry.service import Registry
from mediator.stages import Stages
from mediator.stages import build as build_stages
from mediator.stages.aggregate import Aggregator
from mediator.stages.aggstore import store_path
from mediator.stages.content_schema import SchemaResolver, SchemaStage
from mediator.status import LocalStatus, StatusBook, StatusOutbox
from mediator.systemd import Notifier
from mediator.units import Unit, UnitSpec, build_unit, plan, settled_text

log = structlog.get_logger(__name__)

RELOAD_POLL_S = 2.0
"""How often the config file's mtime and size are checked (SIGHUP reloads at once)."""

UNIT_START_TIMEOUT_S = 15.0
"""A reload waits this long for its new listeners to bind before it rolls back."""

UNIT_STOP_TIMEOUT_S = 15.0
"""A unit being stopped gets this long to drain (an HTTP listener waits for its handlers' commits)."""

PID_FILE = "mediator.pid"
RELOAD_STATUS_FILE = "mediator.reload.json"
"""Beside the outbox: the running daemon's pid (``mediator reload`` signals it) and the outcome of its
latest reload (``mediator reload`` waits for it to change and prints it)."""

SECURITY_SECTIONS = (
    *("security", "auth", "authorization", "rate_limits"),
    *("validation", "schemas", "enrich", "aggregate", "encryption"),
)
"""The root sections the ingress stages are built from."""


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return st.st_mtime_ns, st.st_size


STRAGGLER_RECANCEL_S = 0.5


async def cancel_until_done(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and cancel again, every ``STRAGGLER_RECANCEL_S``, those still running: a library
    that swallows a cancellation landing in its connect (aiomqtt's, aio-pika's robust connection and
    channel opening: the log names ``inbound:commands`` and ``outbound:telemetry-exchange``) must not keep
    the daemon from stopping. Seen: SIGTERM twice within 15 ms of READY=1, the brokers still connecting,
    and the process never exited (tests/firsthour's systemd test, 2 runs in 6 before, 0 in 10 after)."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=STRAGGLER_RECANCEL_S)
        for task in pending:
            log.warning("daemon.task_ignored_cancellation", task=task.get_name())
            task.cancel()


def write_reload_status(path: Path, doc: Mapping[str, object]) -> None:
    """Write a reload outcome whole (a temporary file renamed over it): ``mediator reload`` never reads half
    of one. Logged, not raised, when the directory is not writable."""
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc) + "\n")
        tmp.replace(path)
    except OSError as exc:
        log.warning("config.reload_status_unwritable", path=str(path), error=str(exc))


def state_dir(config: Config) -> Path:
    """Where the pid and reload status files live: the outbox file's directory."""
    return Path(config.outbox.path).parent


class StartupFailed(MediatorError):
    """A service failed at start-up for a reason of the machine's (a port taken, a certificate file that
    cannot be read: an ``OSError``): ``mediator run`` prints this one line and exits non-zero; the log
    says the rest (``listener.bind_failed``)."""


def startup_failure(group: BaseExceptionGroup[BaseException]) -> StartupFailed | None:
    """The first ``StartupFailed`` of ``group`` when that is all it holds, else None (a bug keeps its
    traceback)."""
    found, rest = group.split(StartupFailed)
    if found is None or rest is not None:
        return None
    leaf: BaseException = found
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, StartupFailed) else None


class _StartFailed(Exception):
    """A unit a reload started did not come up (a port that cannot be bound)."""


class _Absent:
    """The outbound of a dispatcher parked at start for an outbound the config no longer has
    (``removed_outbound = "keep"``): never run; a reload that brings the outbound back replaces it."""

    max_in_flight = 1

    def __init__(self, name: str) -> None:
        self.name = name

    async def send(self, event: Envelope, address: str, format: str) -> None:
        raise NotReady(f"outbound {self.name!r} is not configured")


def make_outbox(config: Config) -> Outbox:
    cfg = config.outbox
    if cfg.kind == "memory":
        return MemoryOutbox(dedup_window_s=cfg.dedup_window_s)
    return SqliteOutbox(
        cfg.path, synchronous=cfg.synchronous, max_batch=cfg.max_batch, dedup_window_s=cfg.dedup_window_s
    )


class SinkSwitch:
    """The ``Sink`` every adapter is given: the pipeline, or the tracing wrapper around it, switched by a
    reload that turns ``[tracing]`` on, off or changes it (``set``). The methods are the target's own
    bound methods, stored on the instance, so a call costs what a call to the target does."""

    def __init__(self, target: Sink) -> None:
        self.set(target)

    def set(self, target: Sink) -> None:
        self.target = target
        self.authenticate = target.authenticate
        self.accept = target.accept
        self.refused = target.refused
        self.dead_letter = target.dead_letter

    def __getattr__(self, name: str) -> Any:  # anything else the pipeline offers
        return getattr(self.target, name)


class _NullSink:
    async def authenticate(self, origin: Origin) -> Principal:
        raise NotReady("dry build")

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        raise NotReady("dry build")

    def refused(self, origin: Origin, exc: Rejected) -> None:
        pass

    async def dead_letter(self, event: Envelope, reason: str) -> None:
        raise NotReady("dry build")


def build_adapters(config: Config, runtime: Runtime) -> tuple[Built, list[str], list[str]]:
    """Every adapter's services and outbounds, plus the problems only an adapter can find (a path served
    twice, a client id used twice, a gRPC listener with two inbounds) and, apart, the environment problems
    (a secret's variable not set)."""
    specs = load_specs()
    built = Built()
    problems: list[str] = []
    environment: list[str] = []
    for kind, adapter_cfg in config.adapters.items():
        try:
            part = specs[kind].build(adapter_cfg, runtime)
        except ConfigError as exc:
            (environment if exc.file == "environment" else problems).extend(exc.problems)
            continue
        built.services.extend(part.services)
        built.outbounds.update(part.outbounds)
    return built, problems, environment


def make_stages(config: Config, registry: SchemaResolver | None = None, *, environment: bool = True) -> Stages:
    """The ingress stages of ``config``; raises ConfigError when a key file or secret is missing or bad
    (with ``environment``, also when a variable an [encryption] key ring names is not set). ``registry``:
    what schemas naming a registry subject resolve it with."""
    root = config.root
    if environment and config.environment:
        raise ConfigError("environment", list(config.environment))
    stages = build_stages(
        config.adapters,
        root.auth,
        root.authorization,
        root.rate_limits,
        root.security,
        Path(config.file).parent,
        enrich=root.enrich,
        validation=root.validation,
        schemas=config.schemas,
        keyrings=config.keyrings,
    )
    for stage in stages.stages:
        if isinstance(stage, SchemaStage):
            stage.resolver = registry
    return stages


async def dry_build(config: Config) -> tuple[list[str], list[str]]:
    """Build every adapter without running anything (for ``check``): (problems, environment problems).
    Environment problems are reported apart because ``check`` may run where the secrets are not."""
    problems: list[str] = []
    environment: list[str] = list(config.environment)
    try:
        stages = make_stages(config, environment=False)
    except ConfigError as exc:
        (environment if exc.file == "environment" else problems).extend(
            exc.problems if exc.file == "environment" else [f"{exc.file}: {p}" for p in exc.problems]
        )
        headers = frozenset({"authorization"})
    else:
        headers = stages.credential_headers
    runtime = Runtime(sink=_NullSink(), health=Health(), credential_headers=headers)
    _, more, env = build_adapters(config, runtime)
    return problems + more, environment + env


def _rings(config: Config) -> dict[str, str]:
    return {name: ring.fingerprint for name, ring in config.keyrings.items()}


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.health = Health()
        self.backlog = Backlog()
        # Delivery status (mediator/status.py): the book is told every transition of the outbox it wraps.
        self.status = StatusBook(
            config.outbox.status_window_s, config.outbox.status_max_events, config.outbox.status_max_waiters
        )
        self.status_reader: StatusReader = LocalStatus(self.status)
        inner = make_outbox(config)
        self.outbox: Outbox = StatusOutbox(inner, self.status)
        self.dispatchers: dict[str, Dispatcher] = {}
        # Observed at the seams (pipeline, dispatchers, outbox transactions) and, at scrape time, from
        # Health and the dispatchers (StateCollector): mediator/observability/metrics.py.
        self.metrics = Metrics(process=True, counting=config.root.metrics.enabled)
        if isinstance(inner, SqliteOutbox):
            inner.status_window_s = config.outbox.status_window_s
            inner.status_max_events = config.outbox.status_max_events
            if self.metrics.counting:
                inner.on_transaction = self.metrics.transaction
        # [registry]: the schema registry (mediator/schemaregistry/), a unit started and stopped with the daemon.
        self.registry = self._make_registry(config)
        self.stages = make_stages(config, self.registry)
        # Aggregation is the last stage; its store lives beside the outbox (in memory with a memory outbox).
        outbox_cfg = config.outbox
        self.aggregator = Aggregator(
            ":memory:" if outbox_cfg.kind == "memory" else store_path(outbox_cfg.path), config.root.aggregate
        )
        self.pipeline = Pipeline(
            Router(config.routes),
            self.outbox,
            self.dispatchers,
            self.backlog,
            max_pending=config.outbox.max_pending,
            dedup=config.outbox.dedup_window_s > 0,
            stages=self.stages.stages + self.aggregator.stages(),
            authenticate=self.stages.authenticate,
            metrics=self.metrics,
        )
        self.aggregator.sink = self.pipeline
        # [store]: every accepted event kept (in the outbox's transaction), queried and replayed.
        self.history = History(
            config.root.store,
            self.outbox,
            inner,
            self.health,
            router=lambda: self.pipeline.router,
            outbounds=lambda: self.config.outbound_configs(),
            routes=lambda: [r.name for r in self.config.root.routes],
            room=lambda: self.backlog.value < self.config.outbox.max_pending // 2,
        )
        # Shedding by priority: the pipeline asks it about HTTP and gRPC publishes, broker inbounds wait on it.
        self.overload = Overload(
            config.root.overload, config.outbox.max_pending, lambda: self.backlog.value, self.dispatchers
        )
        self.pipeline.overload = self.overload
        # [tracing]: spans observed at the seams (mediator/observability/tracing.py); off: None, nothing wrapped.
        # A reload replaces it (``_set_tracing``): the sink is switched and every outbound rewrapped.
        self._span_totals = SpanTotals()
        self._units: dict[str, Unit] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.tracing: Tracing | None = None
        self.sink = SinkSwitch(self.pipeline)
        self._retiring: set[asyncio.Task[None]] = set()
        self._set_tracing(Tracing(config.root.tracing) if config.root.tracing.enabled else None)
        self._admin = DeadLetterAdmin(self)
        self.rates = Rates(self.metrics.totals)  # the dashboard's chart (GET /admin/rates)
        self.last_reload: dict[str, object] | None = None  # the latest reload's outcome, for /admin/status
        self.metrics.register(StateCollector(self))
        self.metrics.register(HistoryCollector(self.history))
        if self.metrics.counting:
            self.metrics.register(OverloadCollector(self.overload))
        if self.metrics.counting:
            self.metrics.register(CorrelatorCollector(self.pipeline.correlator))
        metrics_cfg = config.root.metrics  # read at start: a change of [metrics] takes a restart
        self.metrics_endpoint = (
            MetricsEndpoint(
                self.metrics.render, CONTENT_TYPE, metrics_cfg.path, metrics_cfg.listener, metrics_cfg.public
            )
            if metrics_cfg.enabled
            else None
        )
        self._specs = load_specs()
        # Shared by every unit: paths adapters serve on HTTP listeners (a push outbound's /subscribe) and
        # the counts adapters keep of their own (its subscribers), for /metrics and /admin/status.
        self.mounts = Mounts()
        self.reports = Reports()
        self.registry_server = (
            RegistryServer(config.root.registry, self.registry, self.mounts, self.sink, self.health)
            if self.registry is not None
            else None
        )
        problems, environment = self._adapter_problems(config, self.stages)
        if problems or environment:
            raise ConfigError(config.file if problems else "environment", problems + environment)
        self.pipeline.dead_letter_destination = config.dead_letter_forward
        # The adapters run as units (mediator/units.py) so that a reload can start, stop and restart them
        # one by one; their service tasks and the dispatchers' tasks join the daemon's task group.
        self._dispatch_tasks: dict[str, asyncio.Task[None]] = {}
        self._graves: dict[str, asyncio.Task[None]] = {}  # removed outbounds awaiting their grace
        for spec in plan(config, self.stages.credential_headers, self.stages.admin_roles).values():
            self._add_unit(self._build_unit(spec))
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload = asyncio.Event()
        self._force_reload = False
        self._reloads = 0
        self.notifier = Notifier()
        self.lock: DaemonLock | None = None  # held by `mediator run`, which sets it (mediator/lock.py)
        self._started_root = config.root  # what the restart-only keys stay at (mediator/reloadable.py)
        self._loaded(config)

    def _bind_conversions(self, config: Config) -> list[tuple[str, int | str]]:
        """Give the conversions that name a registry subject the registry's cache; returns what they name."""
        keys: list[tuple[str, int | str]] = []
        for route in config.routes:
            for dest in route.destinations:
                convert = dest.egress.convert if dest.egress is not None else None
                if convert is not None and convert.config.subject is not None:
                    convert.source = self.registry
                    keys.append((convert.config.subject, convert.config.version))
        return keys

    @staticmethod
    def _make_registry(config: Config) -> Registry | None:
        cfg = config.root.registry
        if not cfg.enabled:
            return None
        listener = config.adapters["http"].listeners[cfg.listener]  # the config checked it is an HTTP one
        outbox_path = config.outbox.path if config.outbox.kind == "sqlite" else None
        try:
            return make_registry(cfg, listener, outbox_path)
        except ValueError as exc:
            raise ConfigError("environment", [str(exc)]) from None

    @property
    def spans(self) -> SpanTotals | None:
        """The span counts of every recorder this process ran, for the metrics; None while tracing never ran."""
        return self._span_totals if self._span_totals.recorders else None

    def _set_tracing(self, tracing: Tracing | None) -> None:
        """Make ``tracing`` (None: off) the one in force: the sink the adapters hold is switched to its
        wrapper (or the bare pipeline), and every dispatcher's outbound rewrapped; the next event and the next
        send attempt see it. The previous one is the caller's to close."""
        self.tracing = tracing
        self.sink.set(self.pipeline if tracing is None else tracing.sink(self.pipeline))
        if tracing is not None and tracing.recorder not in self._span_totals.recorders:
            self._span_totals.recorders.append(tracing.recorder)
        for unit in self._units.values():
            for name, outbound in unit.outbounds.items():
                cfg = unit.spec.section.outbounds[name]
                dispatcher = self.dispatchers.get(name)
                if dispatcher is not None:
                    dispatcher.replace(outbound if tracing is None else tracing.outbound(outbound, cfg.kind), cfg)

    def _retire(self, tracing: Tracing | None) -> None:
        """Close a tracing a reload replaced (its queued spans exported within the drain's budget) in the
        background: a collector that is down must not hold the reload's outcome."""
        if tracing is None or self._tg is None:
            return
        task = self._tg.create_task(tracing.close(self.config.daemon.drain_timeout_s), name="tracing:retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _on_dead(self, delivery: Pending, reason: str) -> None:
        """A dispatcher's dead letter: its span when tracing is on, then the forward."""
        if self.tracing is not None:
            self.tracing.dead_letter_span(delivery, reason)
        await self._forward_dead(delivery, reason)

    def _loaded(self, config: Config) -> None:
        """The one place a config becomes the running one (at start and on every applied reload)."""
        self.config = config
        self.config_version = config.sha256[:12]  # what the metrics and /admin/status report
        self.config_loaded_at = time.time()
        self.overload.configure(
            config.root.overload, {n: c for a in config.adapters.values() for n, c in a.inbounds.items()}
        )

    @property
    def services(self) -> list[Service]:
        return [s for unit in self._units.values() for s in unit.services]

    def _adapter_problems(self, config: Config, stages: Stages) -> tuple[list[str], list[str]]:
        """Build every adapter of ``config`` against a scratch runtime (nothing runs, nothing registers):
        the problems only an adapter finds across units (a client id used twice), and the environment's."""
        scratch = Runtime(
            sink=_NullSink(),
            health=Health(),
            credential_headers=stages.credential_headers,
            admin_roles=stages.admin_roles,
        )
        _, problems, environment = build_adapters(config, scratch)
        return problems, environment

    def _build_unit(self, spec: UnitSpec) -> Unit:
        correlator = self.pipeline.correlator
        return build_unit(
            spec,
            self._specs,
            self.sink,
            self.health,
            self._admin,
            self.metrics_endpoint,
            self.status_reader,
            mounts=self.mounts,
            reports=self.reports,
            replies=correlator,
            requests=self.pipeline,
            admission=self.overload,
        )

    def _add_unit(self, unit: Unit) -> None:
        """Take ``unit`` in and give each of its outbounds its dispatcher (the one the name had, parked
        with its deliveries, when there is one). Its tasks are started by ``_run_unit``."""
        self._units[unit.spec.key] = unit
        for name, outbound in unit.outbounds.items():
            cfg = unit.spec.section.outbounds[name]
            if isinstance(outbound, RequestOutbound):  # before tracing wraps it: requests are not traced
                self.pipeline.requesters[name] = outbound
            else:
                self.pipeline.requesters.pop(name, None)
            if self.tracing is not None:
                outbound = self.tracing.outbound(outbound, cfg.kind)
            dispatcher = self.dispatchers.get(name)
            if dispatcher is None:
                self.dispatchers[name] = Dispatcher(
                    name, outbound, cfg, self.outbox, self.health, self.backlog, self._on_dead, metrics=self.metrics
                )
            else:
                dispatcher.replace(outbound, cfg)
            grave = self._graves.pop(name, None)
            if grave is not None:
                grave.cancel()
                log.info("outbound.returned", outbound=name)

    def _run_unit(self, unit: Unit, guard: bool) -> None:
        """Start the unit's services and dispatchers in the daemon's task group. With ``guard`` (a
        reload), a service that raises is recorded on the unit instead of stopping the daemon."""
        tg = self._tg
        assert tg is not None
        for service in unit.services:
            coro = self._guarded(unit, service) if guard else self._fatal(service)
            unit.tasks.append(tg.create_task(coro, name=service.name))
        for name in unit.outbounds:
            task = self._dispatch_tasks.get(name)
            if task is None or task.done():
                self._dispatch_tasks[name] = tg.create_task(self.dispatchers[name].run(), name=f"dispatcher:{name}")

    @staticmethod
    async def _fatal(service: Service) -> None:
        """A service of the start-up: an ``OSError`` stops the daemon as ``StartupFailed``, one line."""
        try:
            await service.run()
        except OSError as exc:
            raise StartupFailed(f"{service.name} cannot start: {exc}") from exc

    async def _guarded(self, unit: Unit, service: Service) -> None:
        try:
            await service.run()
        except Exception as exc:  # a bind failure: the reload sees it and rolls back
            if unit.failure is None:
                unit.failure = exc
            log.error("unit.failed", unit=unit.spec.key, service=service.name, error=str(exc) or repr(exc))

    async def _stop_unit(self, unit: Unit) -> None:
        """Stop the unit's dispatchers (their deliveries stay queued: see ``Dispatcher.run``) and
        services (a listener drains its requests), then forget its health components."""
        tasks = list(unit.tasks)
        for name in unit.outbounds:
            task = self._dispatch_tasks.pop(name, None)
            if task is not None:
                tasks.append(task)
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=UNIT_STOP_TIMEOUT_S)
            if late:
                log.warning("unit.stop_timed_out", unit=unit.spec.key, tasks=sorted(t.get_name() for t in late))
        for component in unit.spec.components:
            self.health.unregister(component)

    async def _apply_units(self, target: dict[str, UnitSpec], swap: Callable[[], None]) -> tuple[list[str], ...]:
        """Make the running units ``target``: stop what is gone and the old version of what changed, build
        the new versions and what is new (attaching their dispatchers), call ``swap`` (the routes and
        stages that go with ``target``), run them, and wait for their listeners to be bound. Units equal in
        both are not touched. Raises ``_StartFailed`` (the state is then part old, part new: the caller
        applies the previous specs again). Returns (added, changed, removed) keys."""
        current = self._units
        removed = [k for k in current if k not in target]
        changed = [k for k in current if k in target and current[k].spec != target[k]]
        added = [k for k in target if k not in current]
        for key in removed + changed:
            await self._stop_unit(self._units.pop(key))
        fresh: list[Unit] = []
        try:
            for key in changed + added:
                unit = self._build_unit(target[key])
                self._add_unit(unit)
                fresh.append(unit)
        except ConfigError as exc:
            raise _StartFailed("; ".join(exc.problems)) from exc
        swap()
        for unit in fresh:
            self._run_unit(unit, guard=True)
        await self._wait_started(fresh)
        return added, changed, removed

    async def _wait_started(self, units: list[Unit]) -> None:
        """Return once every service of ``units`` that has a ``started`` event (the listeners) has set it;
        raise ``_StartFailed`` if one raised (a bind failure) or is not up in time. Broker connections are
        not waited for: they connect with backoff, and the daemon serves while a broker is down."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNIT_START_TIMEOUT_S
        while True:
            await asyncio.sleep(0.05)
            failed = [u for u in units if u.failure is not None]
            if failed:
                raise _StartFailed("; ".join(f"{u.spec.key}: {u.failure}" for u in failed))
            waiting = [
                s.name
                for u in units
                for s in u.services
                if isinstance(started := getattr(s, "started", None), asyncio.Event) and not started.is_set()
            ]
            if not waiting:
                return
            if loop.time() >= deadline:
                raise _StartFailed(f"{', '.join(waiting)} not started within {UNIT_START_TIMEOUT_S:.0f} s")

    async def _forward_dead(self, delivery: Pending, reason: str) -> None:
        await self.pipeline.forward_dead(delivery.event, reason, delivery.route, delivery.outbound, delivery.attempts)

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("daemon.forced_stop")
            self._force.set()
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        loop.add_signal_handler(signal.SIGUSR1, self.request_reload, True)
        try:
            await self._run()
        except BaseExceptionGroup as group:  # the task group's: a service that could not start
            failure = startup_failure(group)
            if failure is None:
                raise
            raise failure from None
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)

    def request_reload(self, force: bool = False) -> None:
        """SIGHUP; SIGUSR1 (``mediator reload --force``) also applies a config that leaves no route, no
        inbound or no listener."""
        self._force_reload = self._force_reload or force
        self._reload.set()
        # SIGHUP also re-reads what adapters and stages hold from files: TLS certificates, API keys.
        self._hup()

    def _hup(self) -> None:
        for hook in [h for unit in self._units.values() for h in unit.hooks]:
            try:
                hook()
            except Exception as exc:  # a hook must not stop the others or the daemon
                log.error("reload.hook_failed", hook=getattr(hook, "__qualname__", repr(hook)), error=repr(exc))
        self.stages.reload()

    async def _reload_loop(self) -> None:
        """On SIGHUP, SIGUSR1 or a change of the file's mtime or size: load the file once it has stopped
        changing (``settled_text``) and apply it (``_apply``). A file that cannot be read, does not
        validate or is still being written is refused with a logged error and the running config keeps
        serving; a touched file whose content is the same is not applied again."""
        path = Path(self.config.file)
        seen = _stamp(path)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELOAD_POLL_S):
                    await self._reload.wait()
            requested = self._reload.is_set()
            if not requested and _stamp(path) == seen:
                continue
            self._reload.clear()
            force, self._force_reload = self._force_reload, False
            if self.pipeline.draining:
                continue
            try:
                text = await settled_text(path)
                seen = _stamp(path)
                new = await asyncio.to_thread(loads, text, self._specs, str(path))
            except ConfigError as exc:
                seen = _stamp(path)
                self._refused(exc.file, exc.problems)
                continue
            if not requested and new.sha256 == self.config.sha256:
                continue
            await self._apply(new, force)

    def _refused(self, file: str, problems: list[str]) -> None:
        log.error("config.reload_refused", file=file, problems=problems)
        self._report("refused", problems)

    def _report(self, outcome: str, problems: list[str] | None = None, **details: object) -> None:
        """Write the outcome of this reload beside the outbox, for ``mediator reload`` to print."""
        self._reloads += 1
        status = {
            "pid": os.getpid(),
            "seq": self._reloads,
            "at": time.time(),
            "outcome": outcome,
            "problems": problems or [],
            "version": self.config_version,
            **details,
        }
        self.last_reload = status
        write_reload_status(self._reload_status_path(), status)

    def _reload_status_path(self) -> Path:
        """Where ``_report`` writes: beside the outbox (a worker of ``workers = N`` writes to the supervisor,
        which gathers every worker's outcome into this file: ``mediator.supervisor``)."""
        return state_dir(self.config) / RELOAD_STATUS_FILE

    def _guard_problems(self, new: Config) -> list[str]:
        """What makes a valid config unlikely to be meant (a file cut short): no route, no inbound, or
        no listener where there were some. Refused unless forced."""
        problems = []
        if not new.routes:
            problems.append("it has no routes: every event would be dead-lettered")
        if not new.root.inbound:
            problems.append("it has no inbound: nothing could send an event")
        if self.config.root.listeners and not new.root.listeners:
            problems.append("it has no listener: /healthz, /readyz and the admin endpoints would go")
        return problems

    async def _apply(self, new: Config, force: bool) -> None:
        """Apply a validated config whole: stages, adapter units (see mediator/units.py), routes, tracing.
        A unit that cannot start rolls everything back to the running config, which keeps serving. What
        waits for a restart (mediator/reloadable.py: [outbox], [metrics], log_level, ...) is named in the
        outcome's ``restart_required`` on every reload until the process restarts."""
        old = self.config
        guard = self._guard_problems(new)
        if guard and not force:
            self._refused(new.file, [*guard, "`mediator reload --force` applies it anyway"])
            return
        restart = restart_required(self._started_root, new.root)
        if restart:
            log.warning("config.restart_required", sections=restart, applied="everything else")
        stages_changed = (
            any(getattr(old.root, k) != getattr(new.root, k) for k in SECURITY_SECTIONS)
            or [s.digest for s in new.schemas] != [s.digest for s in old.schemas]
            or _rings(new) != _rings(old)
            or bool(new.environment)
        )
        stages: Stages | None = None
        if stages_changed:
            try:
                stages = make_stages(new, self.registry)
            except ConfigError as exc:
                self._refused(exc.file, exc.problems)
                return
        running = stages or self.stages
        if self.registry is not None:  # the new routes' conversions find their subjects in the cache
            await self.registry.warm(self._bind_conversions(new))
        problems, environment = self._adapter_problems(new, running)
        if problems or environment:
            if stages is not None:
                await stages.close()
            self._refused(new.file if problems else "environment", problems + environment)
            return
        old_tracing = self.tracing
        tracing_changed = old.root.tracing != new.root.tracing
        new_tracing: Tracing | None = None
        if tracing_changed and new.root.tracing.enabled:
            try:
                new_tracing = Tracing(new.root.tracing)
            except ConfigError as exc:  # a collector header's variable not set
                if stages is not None:
                    await stages.close()
                self._refused(exc.file, exc.problems)
                return
        target = plan(new, running.credential_headers, running.admin_roles)
        previous = {k: u.spec for k, u in self._units.items()}
        pipeline = self.pipeline
        before = (pipeline.stages, pipeline.authenticator, pipeline.router, pipeline.dead_letter_destination)

        def swap() -> None:
            if stages is not None:
                stages.start()
                pipeline.stages = stages.stages + self.aggregator.stages()
                pipeline.authenticator = stages.authenticate
            pipeline.router = Router(new.routes)
            pipeline.dead_letter_destination = new.dead_letter_forward
            if tracing_changed:
                self._set_tracing(new_tracing)

        def restore() -> None:
            pipeline.stages, pipeline.authenticator, pipeline.router, pipeline.dead_letter_destination = before
            if tracing_changed:
                self._set_tracing(old_tracing)

        try:
            added, changed, removed = await self._apply_units(target, swap)
        except _StartFailed as exc:
            rolled_back = True
            try:
                await self._apply_units(previous, restore)
            except _StartFailed as again:
                rolled_back = False
                log.critical("config.rollback_failed", reason=str(again))
            if stages is not None:
                await stages.close()
            # The tracing not in force now is closed (the new one, unless the rollback itself failed early).
            self._retire(new_tracing if self.tracing is not new_tracing else old_tracing)
            self._settle_removed()
            log.error("config.reload_failed", reason=str(exc), rolled_back=rolled_back)
            self._report("failed", [str(exc)], rolled_back=rolled_back)
            return
        if stages is not None:
            old_stages, self.stages = self.stages, stages
            await self.aggregator.configure(new.root.aggregate)
            pipeline.stages = stages.stages + self.aggregator.stages()
            await old_stages.close()
            log.info("config.stages_reloaded", stages=[s.name for s in stages.stages])
        if tracing_changed:
            self._retire(old_tracing)
            log.info("tracing.reloaded", enabled=new_tracing is not None)
        self._loaded(dataclasses.replace(new, root=in_force(self._started_root, new.root)))
        self._settle_removed()
        unchanged = len(target) - len(added) - len(changed)
        details = {"started": added, "restarted": changed, "stopped": removed, "unchanged": unchanged}
        log.info(
            "config.reloaded",
            routes=len(new.routes),
            version=self.config_version,
            forced=guard or None,
            restart_required=restart or None,
            **details,
        )
        self._report("applied", guard, **details, restart_required=restart)

    def _settle_removed(self) -> None:
        """Dispatchers whose outbound the config no longer has keep their deliveries (parked, not running):
        until the outbound returns (``removed_outbound = "keep"``) or for a grace, then dead-lettered."""
        live = {name for unit in self._units.values() for name in unit.outbounds}
        daemon_cfg = self.config.daemon
        for name in [n for n in self.dispatchers if n not in live]:
            if daemon_cfg.removed_outbound == "keep":
                grave = self._graves.pop(name, None)
                if grave is not None:
                    grave.cancel()
                log.warning("outbound.parked", outbound=name, until="it returns")
            elif name not in self._graves and self._tg is not None:
                grace = daemon_cfg.removed_outbound_grace_s
                self._graves[name] = self._tg.create_task(self._bury(name, grace), name=f"removed-outbound:{name}")
                log.warning("outbound.parked", outbound=name, grace_s=grace)

    async def _bury(self, name: str, grace_s: float) -> None:
        # At least a second: a commit routed by the previous table may still hand this dispatcher a delivery.
        await asyncio.sleep(max(grace_s, 1.0))
        self._graves.pop(name, None)
        dispatcher = self.dispatchers.pop(name, None)
        if dispatcher is None:
            return
        reason = f"{REMOVED_PREFIX}outbound {name!r} was removed from the config"
        rows = dispatcher.take_all()
        for i, delivery in enumerate(rows):
            try:
                await self.outbox.dead_letter(delivery, reason)
            except StorageError as exc:
                log.error("outbound.removed_dead_letter_failed", outbound=name, error=str(exc))
                self.dispatchers[name] = dispatcher
                for rest in rows[i:]:
                    dispatcher.submit(rest)
                self._settle_removed()
                return
            self.backlog.settle()
            self.metrics.dead_letter(name, reason)
            await self._forward_dead(delivery, reason)
        log.warning("outbound.removed_dead_lettered", outbound=name, count=len(rows), reason=reason)

    async def _run(self) -> None:
        pending = await self.outbox.open()
        try:
            await self.history.open()
        except BaseException:
            await self.outbox.close()
            raise
        await self.aggregator.open()
        self.stages.start()
        try:
            if self.registry_server is not None:
                try:
                    await self.registry_server.open()
                except SchemaStoreError as exc:
                    log.error("registry.open_failed", error=str(exc))
                    raise
                await self.registry_server.registry.warm(self._bind_conversions(self.config))
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tasks = [
                    tg.create_task(self.aggregator.run(), name="aggregate"),
                    tg.create_task(self.history.run(), name="history"),
                    tg.create_task(self.overload.run(), name="overload"),
                ]
                if self.registry_server is not None:
                    tasks.append(tg.create_task(self.registry_server.run(), name="registry"))
                tasks.append(tg.create_task(self.rates.run(), name="admin:rates"))
                for unit in self._units.values():
                    self._run_unit(unit, guard=False)  # a bind failure at start-up stops the daemon
                reload_task = tg.create_task(self._reload_loop(), name="config-reload")
                if self.notifier.enabled:
                    tasks.append(tg.create_task(self._notify_ready(), name="systemd:ready"))
                if self.notifier.watchdog_s is not None:
                    tasks.append(tg.create_task(self._watchdog(self.notifier.watchdog_s), name="systemd:watchdog"))
                orphans = 0
                keep = self.config.daemon.removed_outbound == "keep"
                for p in pending:
                    dispatcher = self.dispatchers.get(p.outbound)
                    if dispatcher is None and keep:  # parked until a reload brings the outbound back
                        dispatcher = self.dispatchers[p.outbound] = Dispatcher(
                            p.outbound,
                            _Absent(p.outbound),
                            OutboundConfigBase(kind="absent"),
                            *(self.outbox, self.health, self.backlog, self._on_dead),
                            metrics=self.metrics,
                        )
                    if dispatcher is None:
                        orphans += 1
                        reason = f"{REMOVED_PREFIX}outbound {p.outbound!r} is no longer configured"
                        await self.outbox.dead_letter(p, reason)
                        self.metrics.dead_letter(p.outbound, reason)
                        continue
                    self.backlog.add(1)
                    dispatcher.submit(p)
                self._write_pid()
                log.info(
                    "daemon.started",
                    services=len(self.services),
                    outbounds=len(self.dispatchers),
                    resumed=len(pending) - orphans,
                )
                await self._stop.wait()
                reload_task.cancel()
                await self._drain()
                await cancel_until_done(
                    [
                        *tasks,
                        *self._dispatch_tasks.values(),
                        *self._graves.values(),
                        *(task for unit in self._units.values() for task in unit.tasks),
                    ]
                )
        finally:
            self._tg = None
            self._remove_pid()
            await self.stages.close()
            await self.aggregator.close()
            if self.registry_server is not None:
                await self.registry_server.close()
            await self.history.close()
            await self.outbox.close()
            if self.tracing is not None:  # the last spans, exported within the drain's budget
                await self.tracing.close(self.config.daemon.drain_timeout_s)
            self.notifier.close()
        log.info("daemon.stopped", undelivered=self.backlog.value)

    def _write_pid(self) -> None:
        """Name this process in the pid file it holds the lock on (``mediator.lock``; ``mediator run``
        took it before building anything), now that SIGHUP reloads instead of killing."""
        if self.lock is not None:
            try:
                self.lock.write_pid()
            except OSError as exc:
                log.warning("daemon.pid_file_unwritable", path=str(self.lock.path), error=str(exc))

    def _remove_pid(self) -> None:
        """Empty the pid file: the daemon has stopped (the lock is let go by whoever took it)."""
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.lock.fd, 0)

    async def _notify_ready(self) -> None:
        """READY=1 once every listener is bound (``Type=notify``: ``systemctl start`` returns then).

        Listeners only, not brokers: the daemon serves (and its outbox accepts) while a broker is down and
        connects when it appears, so waiting for brokers would fail the unit's start for an outage that
        /readyz reports anyway. STATUS= then says what is still connecting."""
        listeners = [f"listener:{name}" for name in self.config.root.listeners]
        for component in listeners:
            await self.health.wait_ready(component)
        waiting = [name for name, s in self.health.snapshot().items() if not s["ready"]]
        status = f"listening ({len(listeners)} listeners)" + (f"; connecting: {', '.join(waiting)}" if waiting else "")
        self.notifier.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        log.info("systemd.ready", listeners=len(listeners), connecting=waiting or None)

    async def _watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 every ``interval_s`` (half of systemd's WatchdogSec) from the event loop itself, so a
        loop that stops turning stops the pings and systemd restarts the daemon. Runs through the drain."""
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _drain(self) -> None:
        budget = self.config.daemon.drain_timeout_s
        deadline = time.monotonic() + budget
        log.info("daemon.draining", timeout_s=budget, undelivered=self.backlog.value)
        self.notifier.notify("STOPPING=1", f"STATUS=draining ({self.backlog.value} undelivered)")
        self.pipeline.draining = True
        self.health.draining = True
        for phase in (self.pipeline.wait_idle, self.backlog.wait_empty):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            force = asyncio.ensure_future(self._force.wait())
            work = asyncio.ensure_future(phase())
            try:
                await asyncio.wait({force, work}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (force, work):
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fut
            if self._force.is_set():
                break
