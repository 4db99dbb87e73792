"""``[daemon] workers = N``: one supervisor process and N worker processes that share the load.

The supervisor (``mediator run`` when ``workers`` is more than 1) builds nothing itself: it starts
``python -m mediator run --config FILE --worker K`` for K = 1..N, each a whole daemon that sees the config
through ``worker_view``:

- its own outbox file: worker 1 keeps ``[outbox] path`` (so turning workers on resumes the outbox a single
  daemon left), worker K > 1 uses ``path + ".wK"``. A worker that dies is started again with the same K,
  so it resumes the same file and nothing accepted is stranded;
- the HTTP listeners with ``reuse_port`` (SO_REUSEPORT: the kernel spreads connections over the workers);
  gRPC servers bind with SO_REUSEPORT already (grpc-core's ``grpc.so_reuseport`` defaults to 1 on Linux);
- each MQTT broker's ``client_id`` with ``-wK`` appended (a client id is one session: two workers with the
  same one would take each other's connection), and each MQTT inbound's topic filters as shared
  subscriptions ``$share/<client_id>-<inbound>/<filter>``, so the broker hands each message to one worker.
  The PUBLISH still carries the real topic, which routes and provenance see;
- AMQP inbounds unchanged: N consumers on one queue are competing consumers by nature.

Changing ``workers`` between runs: the broker keeps each count's MQTT sessions, so the daemon records the
counts it ran with (``mediator.workers.json`` beside the outbox) and, at a start with another, drains the
other counts' sessions into its outbox and deletes them once its own have subscribed (``drain_view``; one
daemon, or worker 1, does it). The supervisor holds the daemon lock (``mediator.lock``), which the workers
inherit.

Readiness: each worker speaks systemd's notification protocol (``mediator.systemd``) to a socket of the
supervisor's own, so the supervisor knows when a worker has bound its listeners, and says READY=1 to the
service manager once every worker has. Signals: SIGTERM/SIGINT are forwarded to every worker (each drains;
a second signal forces, as for one daemon), SIGHUP and SIGUSR1 (reload) too; the supervisor exits 0 when
every worker exited 0. A worker that exits on its own is started again after a backoff.

Reload outcomes: each worker applies the file on its own and writes its outcome into the run directory
(``reload-wK.json``), and the supervisor, which sent the signal, gathers them into the one file beside the
outbox that ``mediator reload`` waits for (``mediator.reload.json``, see ``merge_reload``): "pending" until
every worker answered, then "applied" only when every worker applied. The supervisor does the gathering
rather than the CLI because only it knows which workers there are, their pids, and which one is restarting;
the CLI stays the same for one daemon and for N. A worker that is starting when the signal comes is sent it
once it is ready (sent earlier, SIGHUP's default action would kill it while it still imports; it reads the
file as it starts anyway), so its outcome is waited for too; one that gives none within ``RELOAD_WAIT_S``
is named in an "incomplete" outcome, and ``mediator reload`` names it at its own ``--timeout``.

The whole daemon answers on the shared ports: each worker also serves its own admin state on a Unix socket
in the supervisor's run directory (``PeerServer``), and the worker that takes an admin or metrics request
asks its siblings there and merges (``FleetAdmin``): dead letters of every outbox (ids made unique across
workers, ``local_id * 1000 + K``), /admin/status summed with each worker's own under ``workers``, and one
Prometheus exposition with a ``worker`` label on every sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mediator.config import Config
from mediator.core.errors import ConfigError
from mediator.lock import DaemonLock
from mediator.systemd import Notifier

log = structlog.get_logger(__name__)

WORKERS_ENV = "MEDIATOR_WORKERS"
RUN_DIR_ENV = "MEDIATOR_RUN_DIR"
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 10.0
"""A worker that ran this long before it exited is restarted after the initial backoff again."""
STOP_GRACE_S = 10.0
"""After the drain budget, how long the supervisor waits for a worker before it kills it."""
RELOAD_WAIT_S = 60.0
"""How long the supervisor waits for every worker's outcome of one reload signal before it says
"incomplete": more than one worker's reload takes (the file settling, then units started and stopped
within the daemon's ``UNIT_START_TIMEOUT_S`` and ``UNIT_STOP_TIMEOUT_S``) plus a restart."""
RELOAD_POLL_S = 0.1
EXIT_STARTUP = 4
"""A daemon's (a worker's) exit status when a service could not start (``mediator.daemon.StartupFailed``)."""


def worker_count(config: Config) -> int:
    workers = config.daemon.workers
    return (os.cpu_count() or 1) if workers == "auto" else workers


def problems(config: Config, workers: int) -> list[str]:
    """What a config cannot do with ``workers`` processes."""
    out: list[str] = []
    if workers <= 1:
        return out
    for name, body in config.root.listeners.items():
        if body.get("port") == 0:
            out.append(f"listeners.{name}.port: 0 would be a different port in each of the {workers} workers")
    if config.root.aggregate:
        out.append(
            f"aggregate: with workers = {workers} the events of one group would be split over workers that "
            "each aggregate apart; run one worker"
        )
    return out


def merge_reload(
    *,
    pid: int,
    seq: int,
    at: float,
    signal_name: str,
    outcomes: Mapping[int, Mapping[str, Any]],
    waiting: Mapping[int, str],
    final: bool,
) -> dict[str, Any]:
    """The whole daemon's outcome of one reload signal, from each worker's (``Daemon._report``) and what
    the workers that have not answered are doing (``waiting``: worker -> state).

    ``outcome``: "pending" while some worker has not answered and the wait is not over; "incomplete"
    once it is (``final``); else the workers' outcome when they all agree ("applied" only when every
    worker applied), "mixed" when not. ``problems`` prefixes each worker's with ``worker K:``; ``workers``
    holds each worker's own outcome by index (a waiting one: ``{"outcome": "waiting", "state": ...}``)."""
    kinds = {str(d.get("outcome")) for d in outcomes.values()}
    agreed = kinds.pop() if len(kinds) == 1 else "mixed"
    outcome = ("incomplete" if final else "pending") if waiting else agreed
    problems = [f"worker {k}: {p}" for k, d in sorted(outcomes.items()) for p in d.get("problems") or []]
    problems += [f"worker {k}: no outcome yet ({state})" for k, state in sorted(waiting.items())]
    versions = {d.get("version") for d in outcomes.values()}
    workers: dict[str, Any] = {str(k): dict(d) for k, d in outcomes.items()}
    workers |= {str(k): {"outcome": "waiting", "state": state} for k, state in waiting.items()}
    return {
        "pid": pid,
        "seq": seq,
        "at": at,
        "signal": signal_name,
        "outcome": outcome,
        "problems": problems,
        "version": versions.pop() if len(versions) == 1 and not waiting else None,
        # What any worker did not apply (mediator/reloadable.py): each worker compares with its own start.
        "restart_required": sorted({k for d in outcomes.values() for k in d.get("restart_required") or []}),
        "workers": dict(sorted(workers.items(), key=lambda item: int(item[0]))),
        "waiting_for": sorted(waiting),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def outbox_path(path: str, k: int) -> str:
    return path if k == 1 else f"{path}.w{k}"


def worker_view(raw: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The config ``raw`` (a parsed TOML document) as worker ``k`` runs it (see the module docstring)."""
    out = copy.deepcopy(dict(raw))
    outbox = out.setdefault("outbox", {})
    if isinstance(outbox, dict):
        outbox["path"] = outbox_path(str(outbox.get("path", "var/outbox.sqlite")), k)
    for body in _sections(out, "listeners"):
        if body.get("kind") == "http":
            body["reuse_port"] = True
    client_ids: dict[str, str] = {}
    for name, body in _named(out, "brokers"):
        if body.get("kind") == "mqtt":
            client_ids[name] = str(body.get("client_id", "mediator"))
            body["client_id"] = f"{client_ids[name]}-w{k}"
    for name, body in _named(out, "inbound"):
        if body.get("kind") != "mqtt" or not isinstance(body.get("topics"), list):
            continue
        group = f"{client_ids.get(str(body.get('broker')), 'mediator')}-{name}".replace("/", "_")
        group = group.replace("+", "_").replace("#", "_")
        body["topics"] = [
            t if not isinstance(t, str) or t.startswith("$share/") else f"$share/{group}/{t}" for t in body["topics"]
        ]
    return out


# ------------------------------------------------------------------ MQTT sessions across worker counts

WORKERS_FILE = "mediator.workers.json"
"""Beside the outbox: every ``workers`` count the daemon ran with (``{"seen": [1, 2]}``), so that a start
with another count knows whose MQTT sessions may still be on the broker (``drain_view``)."""


def state_of(raw: Mapping[str, Any]) -> Path:
    """The state directory (the outbox file's) a parsed config names."""
    outbox = raw.get("outbox")
    path = outbox.get("path", "var/outbox.sqlite") if isinstance(outbox, Mapping) else "var/outbox.sqlite"
    return Path(str(path)).parent


def seen_workers(state: Path) -> list[int]:
    doc = _read_json(state / WORKERS_FILE)
    seen = doc.get("seen") if doc is not None else None
    return sorted({n for n in seen if isinstance(n, int) and n >= 1}) if isinstance(seen, list) else []


def record_workers(state: Path, count: int) -> None:
    """Add ``count`` to the counts seen (called by the lock holder, before any MQTT session is made)."""
    seen = seen_workers(state)
    if count in seen:
        return
    path = state / WORKERS_FILE
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seen": sorted([*seen, count])}) + "\n")
        tmp.replace(path)  # whole or not at all
    except OSError as exc:
        log.warning("daemon.workers_file_unwritable", path=str(path), error=str(exc))


def mqtt_sessions(raw: Mapping[str, Any], count: int) -> dict[str, list[dict[str, Any]]]:
    """Inbound name -> the MQTT sessions (client id, topics) its ``count`` workers use: for one, the
    config's own; for more, each worker's (``worker_view``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for k in range(1, count + 1):
        view = worker_view(raw, k) if count > 1 else copy.deepcopy(dict(raw))
        brokers = dict(_named(view, "brokers"))
        for name, body in _named(view, "inbound"):
            broker = brokers.get(str(body.get("broker")))
            topics = body.get("topics")
            if body.get("kind") != "mqtt" or broker is None or not isinstance(topics, list):
                continue
            client_id = f"{broker.get('client_id', 'mediator')}-{name}"  # MqttInbound.client_id
            out.setdefault(name, []).append({"client_id": client_id, "topics": list(topics)})
    return out


def drain_view(raw: Mapping[str, Any], count: int, seen: list[int], out: dict[str, Any]) -> dict[str, Any]:
    """``out`` (the config as this process runs it, from ``raw``) with, on each MQTT inbound, the sessions
    that the other counts in ``seen`` used and ``count`` does not (``drain_sessions``): this inbound
    empties them into its outbox and deletes them once subscribed itself (``MqttInbound._drain_session``).

    Why: the broker keeps every session's subscriptions. After 2 workers, their sessions stay members of
    the shared subscription, and Mosquitto keeps handing them every other message while they are offline;
    after one daemon, its session keeps a copy of everything. Left there, a switch of ``workers`` loses
    what the offline sessions were handed (at their expiry) or delivers again what they copied when that
    count comes back. Drained once the new sessions have subscribed, nothing is lost; what the broker
    hands both old and new in the moment between the new subscription and the old one's unsubscribe is
    delivered twice (at-least-once; the event id deduplicates CloudEvents). Only one process of a daemon
    drains: the daemon itself, or worker 1."""
    current = {s["client_id"] for sessions in mqtt_sessions(raw, count).values() for s in sessions}
    drains: dict[str, list[dict[str, Any]]] = {}
    for other in seen:
        if other == count:
            continue
        for name, sessions in mqtt_sessions(raw, other).items():
            for session in sessions:
                known = {d["client_id"] for d in drains.get(name, [])}
                if session["client_id"] not in current and session["client_id"] not in known:
                    drains.setdefault(name, []).append(session)
    for name, body in _named(out, "inbound"):
        if name in drains:
            extra = body.get("drain_sessions")
            body["drain_sessions"] = [*(extra if isinstance(extra, list) else []), *drains[name]]
    return out


def enter_daemon() -> None:
    """Called by ``mediator run`` (one daemon, not a worker) before it loads the config: with one worker,
    its MQTT inbounds drain the sessions of the other counts it ran with (``drain_view``)."""
    import mediator.config

    seen: dict[Path, list[int]] = {}  # read once: a reload must see the config as the start did

    def view(raw: Mapping[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(dict(raw))
        count = _count_of(raw)
        if count != 1:
            return out  # a supervisor: worker 1 drains
        state = state_of(raw)
        if state not in seen:
            seen[state] = seen_workers(state)
        return drain_view(raw, 1, seen[state], out)

    mediator.config.raw_view = view


def _count_of(raw: Mapping[str, Any]) -> int | None:
    daemon = raw.get("daemon")
    workers = daemon.get("workers", 1) if isinstance(daemon, Mapping) else 1
    if workers == "auto":
        return os.cpu_count() or 1
    return workers if isinstance(workers, int) and not isinstance(workers, bool) else None


def _named(raw: dict[str, Any], section: str) -> list[tuple[str, dict[str, Any]]]:
    value = raw.get(section)
    if not isinstance(value, dict):
        return []
    return [(n, b) for n, b in value.items() if isinstance(b, dict)]


def _sections(raw: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [b for _, b in _named(raw, section)]


@dataclass(frozen=True, slots=True)
class Slot:
    """Who this worker is: its index (1..count) and where its siblings' sockets are."""

    index: int
    count: int
    run_dir: Path

    def socket(self, k: int) -> Path:
        return self.run_dir / f"w{k}.sock"

    def reload_status(self, k: int) -> Path:
        """Where worker ``k`` writes the outcome of each of its reloads (``Daemon._report``)."""
        return reload_status_path(self.run_dir, k)


def reload_status_path(run_dir: Path, k: int) -> Path:
    return run_dir / f"reload-w{k}.json"


def enter_worker(index: int) -> Slot:
    """Called by ``mediator run --worker K`` before it loads the config: every load goes through the view."""
    import mediator.config

    count = int(os.environ.get(WORKERS_ENV, "0"))
    run_dir = os.environ.get(RUN_DIR_ENV, "")
    if not run_dir or not 1 <= index <= count:
        raise SystemExit("mediator run --worker is started by the supervisor (`workers = N` in [daemon])")
    seen: dict[Path, list[int]] = {}  # read once: a reload must see the config as the start did

    def view(raw: Mapping[str, Any]) -> dict[str, Any]:
        out = worker_view(raw, index)
        if index != 1:
            return out
        state = state_of(raw)
        if state not in seen:
            seen[state] = seen_workers(state)
        return drain_view(raw, count, seen[state], out)

    mediator.config.raw_view = view
    return Slot(index, count, Path(run_dir))


# ---------------------------------------------------------------------------------------- the supervisor


class _Worker:
    def __init__(self, k: int) -> None:
        self.k = k
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.started_at = 0.0
        self.restarts = 0
        self.code: int | None = None  # its last exit status (negative: killed by that signal)


class Supervisor:
    """Runs ``count`` workers of the config file ``config.file`` until SIGTERM or SIGINT; see the module."""

    def __init__(self, config: Config, count: int, lock: DaemonLock | None = None) -> None:
        self.config = config
        self.lock = lock
        self.count = count
        self.workers = {k: _Worker(k) for k in range(1, count + 1)}
        self.notifier = Notifier()
        self._stopping = False
        self._stop = asyncio.Event()
        self._ready_sent = False
        self._run_dir = Path(tempfile.mkdtemp(prefix="mediator-"))
        self._sockets: dict[int, socket.socket] = {}
        self._signals = 0
        self._tg: asyncio.TaskGroup | None = None
        self._gathering: asyncio.Task[None] | None = None
        self._reloads = 0
        self.failed = 0  # EXIT_STARTUP when a worker could not start at all

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            loop.add_signal_handler(sig, self._on_reload_signal, sig)
        try:
            for k in self.workers:
                self._sockets[k] = self._notify_socket(loop, k)
            self._write_pid()
            log.info("supervisor.started", workers=self.count, pid=os.getpid(), config=self.config.file)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                keepers = [tg.create_task(self._keep(w), name=f"worker:{w.k}") for w in self.workers.values()]
                if self.notifier.watchdog_s is not None:
                    watchdog = tg.create_task(self._watchdog(self.notifier.watchdog_s), name="systemd:watchdog")
                else:
                    watchdog = None
                await asyncio.wait(keepers)
                if watchdog is not None:
                    watchdog.cancel()
                if self._gathering is not None:
                    self._gathering.cancel()
        finally:
            self._tg = None
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            for sock in self._sockets.values():
                loop.remove_reader(sock.fileno())
                sock.close()
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._remove_pid()
            self.notifier.close()
        codes = {w.k: w.code for w in self.workers.values()}
        ok = all(code == 0 for code in codes.values())
        log.info("supervisor.stopped", exit_codes=codes)
        return self.failed or (0 if ok else 1)

    def _write_pid(self) -> None:
        """The daemon's pid file names the supervisor: ``mediator reload`` signals it, and it forwards. It
        is the file ``mediator run`` locked (``mediator.lock``), which the workers inherit."""
        if self.lock is not None:
            try:
                self.lock.write_pid()
            except OSError as exc:
                log.warning("daemon.pid_file_unwritable", path=str(self.lock.path), error=str(exc))

    def _remove_pid(self) -> None:
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.lock.fd, 0)

    # ------------------------------------------------------------------ workers

    def _command(self, k: int) -> list[str]:
        return [sys.executable, "-m", "mediator", "run", "--config", self.config.file, "--worker", str(k)]

    def _env(self, k: int) -> dict[str, str]:
        env = {k2: v for k2, v in os.environ.items() if k2 not in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")}
        env[WORKERS_ENV] = str(self.count)
        env[RUN_DIR_ENV] = str(self._run_dir)
        env["NOTIFY_SOCKET"] = str(self._notify_path(k))
        return env

    async def _spawn(self, w: _Worker) -> asyncio.subprocess.Process:
        w.ready = False
        with contextlib.suppress(FileNotFoundError):
            (self._run_dir / f"w{w.k}.sock").unlink()  # a killed worker's socket: its successor binds anew
        proc = await asyncio.create_subprocess_exec(
            *self._command(w.k),
            env=self._env(w.k),
            # Its own session: a terminal's Ctrl-C reaches the supervisor only, which forwards it once (a
            # worker seeing it twice would skip its drain). The parent-death signal stops an orphan.
            start_new_session=True,
            preexec_fn=_die_with_parent,
            # The daemon lock, inherited on purpose: held while any worker still has its outbox open.
            pass_fds=(self.lock.fd,) if self.lock is not None else (),
        )
        w.proc = proc
        w.started_at = time.monotonic()
        log.info("worker.started", worker=w.k, pid=proc.pid, restarts=w.restarts)
        return proc

    async def _keep(self, w: _Worker) -> None:
        """Run worker ``w`` and start it again whenever it exits, until the supervisor stops."""
        delay = RESTART_INITIAL_S
        while True:
            proc = await self._spawn(w)
            if self._stopping:  # a stop came while it was being started
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            w.code = await self._wait(proc)
            w.ready = False
            if self._stopping:
                log.info("worker.stopped", worker=w.k, pid=proc.pid, code=w.code)
                return
            if w.code == EXIT_STARTUP and not self._ready_sent:
                # It could not start (a port taken: it printed why) before the daemon was ever ready:
                # starting it again would fail the same way, so the whole daemon stops, as one daemon does.
                log.error("worker.start_failed", worker=w.k, pid=proc.pid, code=w.code)
                self.failed = EXIT_STARTUP
                self._stopping = True
                self._stop.set()
                self._forward(signal.SIGTERM)
                return
            ran_s = time.monotonic() - w.started_at
            delay = RESTART_INITIAL_S if ran_s >= STABLE_S else delay
            log.error("worker.exited", worker=w.k, pid=proc.pid, code=w.code, ran_s=round(ran_s, 2), restart_in_s=delay)
            self._status()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stopping:
                return
            delay = min(delay * 2, RESTART_MAX_S)
            w.restarts += 1

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        """The worker's exit status; once stopping, bounded by the drain budget plus a grace, then SIGKILL."""
        wait = asyncio.ensure_future(proc.wait())
        while True:
            if self._stopping:
                budget = self.config.daemon.drain_timeout_s + STOP_GRACE_S
                done, _ = await asyncio.wait({wait}, timeout=budget)
                if not done:
                    log.error("worker.kill", pid=proc.pid, after_s=budget)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                return await wait
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({wait, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if wait.done():
                return wait.result()

    def _on_stop_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("supervisor.draining", signal=signal.Signals(sig).name, workers=self.count)
            self.notifier.notify("STOPPING=1", f"STATUS=draining {self.count} workers")
        else:
            log.warning("supervisor.forced_stop")
        self._stopping = True
        self._stop.set()
        self._forward(signal.SIGTERM)
        if self._gathering is not None:
            self._gathering.cancel()

    def _forward(self, sig: int) -> None:
        for w in self.workers.values():
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    # ------------------------------------------------------------------ reload

    def _on_reload_signal(self, sig: int) -> None:
        if self._stopping or self._tg is None:
            return  # a draining worker does not reload
        if self._gathering is not None:
            self._gathering.cancel()  # superseded: the outcome of this newer signal is the one to wait for
        self._reloads += 1
        self._gathering = self._tg.create_task(self.reload(sig, self._reloads), name=f"reload:{self._reloads}")

    async def reload(self, sig: int, seq: int) -> None:
        """Send ``sig`` to every worker (one that is starting: once it is ready) and gather their outcomes
        into the file ``mediator reload`` reads (``merge_reload``), rewritten as each worker answers, until
        all have or ``RELOAD_WAIT_S`` has passed. A worker's outcome is the first it writes after the signal
        under the pid that was sent it; a worker that dies before it answers is sent the signal again once
        its replacement is ready. Cancelled by a newer reload signal (which writes its own outcome) or by a
        stop (then "incomplete", naming the workers not heard from)."""
        name = signal.Signals(sig).name
        at = time.time()
        paths = {k: reload_status_path(self._run_dir, k) for k in self.workers}
        before = {k: _read_json(path) for k, path in paths.items()}
        signalled: dict[int, int] = {}  # worker -> the pid that was sent the signal
        outcomes: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + RELOAD_WAIT_S
        log.info("supervisor.reload_signalled", signal=name, seq=seq, workers=self.count)
        written: dict[str, Any] | None = None
        waiting: dict[int, str] = {}

        def merged(final: bool) -> dict[str, Any]:
            return merge_reload(
                pid=os.getpid(), seq=seq, at=at, signal_name=name, outcomes=outcomes, waiting=waiting, final=final
            )

        try:
            while True:
                waiting = {}
                for w in self.workers.values():
                    if w.k in outcomes:
                        continue
                    proc = w.proc
                    alive = proc is not None and proc.returncode is None
                    if proc is not None and alive and w.ready and signalled.get(w.k) != proc.pid:
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(sig)
                        signalled[w.k] = proc.pid
                    doc = _read_json(paths[w.k])
                    if doc is not None and doc != before[w.k] and w.k in signalled and doc.get("pid") == signalled[w.k]:
                        outcomes[w.k] = doc
                        log.info("supervisor.reload_outcome", worker=w.k, seq=seq, outcome=doc.get("outcome"))
                        continue
                    if proc is None or not alive:
                        waiting[w.k] = "not running: it exited and is being restarted"
                    elif signalled.get(w.k) == proc.pid:
                        waiting[w.k] = f"sent {name} to pid {proc.pid}, no outcome yet"
                    else:
                        waiting[w.k] = f"restarting: pid {proc.pid} is not ready yet, and is sent {name} once it is"
                final = not waiting or time.monotonic() >= deadline
                doc = merged(final)
                if doc != written:
                    self._write_reload_status(doc)
                    written = doc
                if final:
                    (log.info if doc["outcome"] == "applied" else log.error)(
                        "supervisor.reloaded", seq=seq, outcome=doc["outcome"], waiting_for=doc["waiting_for"]
                    )
                    return
                await asyncio.sleep(RELOAD_POLL_S)
        except asyncio.CancelledError:
            if self._stopping:
                waiting = {k: f"the daemon stopped first ({v})" for k, v in waiting.items()}
                self._write_reload_status(merged(True))
            raise

    def _write_reload_status(self, doc: Mapping[str, Any]) -> None:
        from mediator.daemon import RELOAD_STATUS_FILE, state_dir, write_reload_status

        write_reload_status(state_dir(self.config) / RELOAD_STATUS_FILE, doc)

    # ------------------------------------------------------------------ readiness

    def _notify_path(self, k: int) -> Path:
        return self._run_dir / f"notify-w{k}"

    def _notify_socket(self, loop: asyncio.AbstractEventLoop, k: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(self._notify_path(k)))
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_notify, k, sock)
        return sock

    def _on_notify(self, k: int, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            states = dict(line.split("=", 1) for line in data.decode("utf-8", "replace").splitlines() if "=" in line)
            w = self.workers[k]
            if states.get("READY") == "1" and not self._stopping:
                w.ready = True
                log.info("worker.ready", worker=k, pid=states.get("MAINPID"))
                self._status()

    def _status(self) -> None:
        ready = sum(w.ready for w in self.workers.values())
        if ready == self.count and not self._ready_sent:
            self._ready_sent = True
            self.notifier.notify("READY=1", f"STATUS={ready} of {self.count} workers ready", f"MAINPID={os.getpid()}")
            log.info("supervisor.ready", workers=self.count)
        elif self._ready_sent:
            self.notifier.notify(f"STATUS={ready} of {self.count} workers ready")

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux prctl PR_SET_PDEATHSIG), so a
    supervisor killed with SIGKILL does not leave its workers running; they drain as on a stop."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def run_supervisor(config: Config, count: int, lock: DaemonLock | None = None) -> int:
    found = problems(config, count)
    if found:
        raise ConfigError(config.file, found)
    return asyncio.run(Supervisor(config, count, lock).run())
