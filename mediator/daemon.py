"""The daemon's lifecycle: build everything from a config, run it, drain on SIGTERM/SIGINT.

Stop order (as uvicorn and Benthos do it): refuse new intake, let in-flight commits finish, give the
dispatchers what is left of the drain budget to deliver, then cancel everything. Whatever is not
delivered stays in a durable outbox for the next start. A second signal skips the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from mediator.config import Config, load
from mediator.core.envelope import Envelope
from mediator.core.errors import ConfigError, NotReady
from mediator.core.health import Health
from mediator.core.ingress import Origin, Principal
from mediator.core.router import Router
from mediator.core.seams import Built, Outbound, Runtime, Service
from mediator.dispatch import Backlog, Dispatcher
from mediator.observability.tracing import Tracing
from mediator.outbox import DeadLetter, MemoryOutbox, Outbox, Pending, SqliteOutbox
from mediator.pipeline import Pipeline
from mediator.registry import load_specs
from mediator.stages import Stages
from mediator.stages import build as build_stages
from mediator.stages.aggregate import Aggregator
from mediator.stages.aggstore import store_path
from mediator.systemd import Notifier

log = structlog.get_logger(__name__)

RELOAD_POLL_S = 2.0
"""How often the config file's mtime is checked (SIGHUP reloads at once)."""


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def make_outbox(config: Config) -> Outbox:
    cfg = config.outbox
    if cfg.kind == "memory":
        return MemoryOutbox(dedup_window_s=cfg.dedup_window_s)
    return SqliteOutbox(
        cfg.path, synchronous=cfg.synchronous, max_batch=cfg.max_batch, dedup_window_s=cfg.dedup_window_s
    )


class _NullSink:
    async def authenticate(self, origin: Origin) -> Principal:
        raise NotReady("dry build")

    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> None:
        raise NotReady("dry build")

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


def make_stages(config: Config) -> Stages:
    """The ingress stages of ``config``; raises ConfigError when a key file or secret is missing or bad."""
    root = config.root
    return build_stages(
        config.adapters,
        root.auth,
        root.authorization,
        root.rate_limits,
        root.security,
        Path(config.file).parent,
        enrich=root.enrich,
        validation=root.validation,
        schemas=config.schemas,
    )


async def dry_build(config: Config) -> tuple[list[str], list[str]]:
    """Build every adapter without running anything (for ``check``): (problems, environment problems).
    Environment problems are reported apart because ``check`` may run where the secrets are not."""
    problems: list[str] = []
    environment: list[str] = []
    try:
        stages = make_stages(config)
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


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.health = Health()
        self.backlog = Backlog()
        self.outbox = make_outbox(config)
        self.dispatchers: dict[str, Dispatcher] = {}
        self.stages = make_stages(config)
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
        )
        self.aggregator.sink = self.pipeline
        # [tracing]: spans observed at the seams (mediator/observability/tracing.py); off: None, nothing wrapped.
        self.tracing = Tracing(config.root.tracing) if config.root.tracing.enabled else None
        self.sink = self.pipeline if self.tracing is None else self.tracing.sink(self.pipeline)
        self._on_dead = self._forward_dead if self.tracing is None else self.tracing.dead_lettered(self._forward_dead)
        runtime = Runtime(
            sink=self.sink,
            health=self.health,
            admin=DeadLetterAdmin(self),
            credential_headers=self.stages.credential_headers,
            admin_roles=self.stages.admin_roles,
        )
        self._reload_hooks = runtime.reload_hooks
        self._specs = load_specs()
        built, problems, environment = build_adapters(config, runtime)
        if problems or environment:
            raise ConfigError(config.file if problems else "environment", problems + environment)
        self.services: list[Service] = built.services
        outbounds: dict[str, Outbound] = built.outbounds
        outbound_cfgs = config.outbound_configs()
        self.pipeline.dead_letter_destination = config.dead_letter_forward
        for name, outbound in outbounds.items():
            if self.tracing is not None:
                outbound = self.tracing.outbound(outbound, outbound_cfgs[name].kind)
            self.dispatchers[name] = Dispatcher(
                name, outbound, outbound_cfgs[name], self.outbox, self.health, self.backlog, self._on_dead
            )
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload = asyncio.Event()
        self.notifier = Notifier()

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
        try:
            await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def request_reload(self) -> None:
        self._reload.set()
        # SIGHUP also re-reads what adapters and stages hold from files: TLS certificates, API keys.
        self._hup()

    def _hup(self) -> None:
        for hook in self._reload_hooks:
            try:
                hook()
            except Exception as exc:  # a hook must not stop the others or the daemon
                log.error("reload.hook_failed", hook=getattr(hook, "__qualname__", repr(hook)), error=repr(exc))
        self.stages.reload()

    async def _reload_loop(self) -> None:
        """On SIGHUP or a change of the file's mtime: validate the file again and swap the routes in.

        A bad edit is refused with a logged error and the running config keeps serving. The routing table
        is swapped atomically (events in flight keep the table they started with); changes to listeners,
        brokers, inbound or outbound sections are reported as needing a restart and are not applied.
        """
        path = Path(self.config.file)
        mtime = _mtime(path)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELOAD_POLL_S):
                    await self._reload.wait()
            current = _mtime(path)
            if not self._reload.is_set() and current == mtime:
                continue
            self._reload.clear()
            mtime = current
            try:
                new = await asyncio.to_thread(load, path, self._specs)
            except ConfigError as exc:
                log.error("config.reload_refused", file=exc.file, problems=exc.problems)
                continue
            old = self.config.root
            static = ("listeners", "brokers", "inbound", "outbound", "outbox")
            changed = [k for k in static if getattr(old, k) != getattr(new.root, k)]
            if changed:
                log.warning("config.restart_required", sections=changed, applied="routes only")
            if [s.digest for s in new.schemas] != [s.digest for s in self.config.schemas]:
                old = old.model_copy(update={"schemas": None})  # a schema file changed: rebuild the stages
            security = (
                *("security", "auth", "authorization", "rate_limits"),
                *("validation", "schemas", "enrich", "aggregate"),
            )
            update: dict[str, object] = {"routes": new.root.routes}
            if any(getattr(old, k) != getattr(new.root, k) for k in security) and not changed:
                try:
                    stages = make_stages(new)
                except ConfigError as exc:
                    log.error("config.reload_refused", file=exc.file, problems=exc.problems)
                    continue
                old_stages, self.stages = self.stages, stages
                await self.aggregator.configure(new.root.aggregate)
                self.pipeline.stages = stages.stages + self.aggregator.stages()
                self.pipeline.authenticator = stages.authenticate
                stages.start()
                await old_stages.close()
                update.update({k: getattr(new.root, k) for k in security})
                log.info("config.stages_reloaded", stages=[s.name for s in stages.stages])
            elif any(getattr(old, k) != getattr(new.root, k) for k in security):
                log.warning("config.stages_not_reloaded", reason="listener or inbound sections changed too")
            self.pipeline.router = Router(new.routes)
            self.pipeline.dead_letter_destination = new.dead_letter_forward
            self.config = Config(
                self.config.file,
                self.config.root.model_copy(update=update),
                self.config.adapters,
                new.routes,
                schemas=new.schemas if "schemas" in update else self.config.schemas,
            )
            log.info("config.reloaded", routes=len(new.routes))

    async def _run(self) -> None:
        pending = await self.outbox.open()
        await self.aggregator.open()
        self.stages.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.aggregator.run(), name="aggregate")]
                tasks += [tg.create_task(s.run(), name=s.name) for s in self.services]
                tasks += [tg.create_task(d.run(), name=f"dispatcher:{n}") for n, d in self.dispatchers.items()]
                tasks.append(tg.create_task(self._reload_loop(), name="config-reload"))
                if self.notifier.enabled:
                    tasks.append(tg.create_task(self._notify_ready(), name="systemd:ready"))
                if self.notifier.watchdog_s is not None:
                    tasks.append(tg.create_task(self._watchdog(self.notifier.watchdog_s), name="systemd:watchdog"))
                orphans = 0
                for p in pending:
                    dispatcher = self.dispatchers.get(p.outbound)
                    if dispatcher is None:
                        orphans += 1
                        await self.outbox.dead_letter(p, f"outbound {p.outbound!r} is no longer configured")
                        continue
                    self.backlog.add(1)
                    dispatcher.submit(p)
                log.info(
                    "daemon.started",
                    services=len(self.services),
                    outbounds=len(self.dispatchers),
                    resumed=len(pending) - orphans,
                )
                await self._stop.wait()
                await self._drain()
                for task in tasks:
                    task.cancel()
        finally:
            await self.stages.close()
            await self.aggregator.close()
            await self.outbox.close()
            if self.tracing is not None:  # the last spans, exported within the drain's budget
                await self.tracing.close(self.config.daemon.drain_timeout_s)
            self.notifier.close()
        log.info("daemon.stopped", undelivered=self.backlog.value)

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


class DeadLetterAdmin:
    """The operator's view of the dead letters of a running daemon (see ``mediator.core.seams.Admin``)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def dead_letters(self, limit: int) -> list[dict[str, object]]:
        return [describe(dl) for dl in await self._daemon.outbox.dead_letters(limit)]

    async def replay(self, ids: Sequence[int] | None) -> int:
        daemon = self._daemon
        rows = await daemon.outbox.replay(ids)
        for p in rows:
            dispatcher = daemon.dispatchers.get(p.outbound)
            if dispatcher is None:
                await daemon.outbox.dead_letter(p, f"outbound {p.outbound!r} is no longer configured")
                continue
            daemon.backlog.add(1)
            dispatcher.submit(p)
        log.info("dead_letters.replayed", count=len(rows))
        return len(rows)


def describe(dl: DeadLetter) -> dict[str, object]:
    return {
        "id": dl.id,
        "event_id": dl.event.id,
        "type": dl.event.type,
        "source": dl.event.source,
        "inbound": dl.event.provenance.inbound,
        "route": dl.route,
        "outbound": dl.outbound,
        "address": dl.address,
        "reason": dl.reason,
        "attempts": dl.attempts,
        "at": datetime.fromtimestamp(dl.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "replayable": bool(dl.format),
    }
