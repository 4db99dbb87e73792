"""``mediator run --config FILE`` and ``mediator check --config FILE`` (also ``python -m mediator``), and the
operator's tools: ``dead-letters``, ``publish``, ``tail``, ``hash-key``, ``reload``. ``$MEDIATOR_CONFIG`` names
the config file when ``--config`` does not (a systemd unit's ``Environment=``)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mediator import __version__
from mediator.core.errors import ConfigError
from mediator.lock import AlreadyRunning, DaemonLock

# Imported where used: `mediator run` takes the daemon lock before anything heavy is imported (asyncio,
# structlog, the config models and their stages: ~1 s of CPU), so that a second `run` is refused at once
# even on a busy machine (measured: 5.9 s at a load average of 7.5 on 2 cores when it came after them).
if TYPE_CHECKING:
    from mediator.config import Config
    from mediator.supervisor import Slot

EXIT_CONFIG = 2
EXIT_RUNNING = 3
"""Another daemon holds the outbox's lock (mediator/lock.py)."""
EXIT_STARTUP = 4
"""A service could not start (a port that cannot be bound): one line on stderr, the details in the log; a
supervisor whose worker exits so before the daemon was ready stops with it (``mediator.supervisor``)."""
CONFIG_ENV = "MEDIATOR_CONFIG"


def _load(path: str) -> Config:
    from mediator.config import load
    from mediator.registry import load_specs

    return load(path, load_specs())


def _print_config_error(exc: ConfigError) -> None:
    print(f"{exc.file}: invalid configuration ({len(exc.problems)} error(s)):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {exc.file}: {problem}", file=sys.stderr)


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    import asyncio

    from mediator import supervisor
    from mediator.daemon import dry_build
    from mediator.schemaregistry.check import subject_problems
    from mediator.stages import broad_rules

    problems, environment = asyncio.run(dry_build(config))
    problems += supervisor.problems(config, supervisor.worker_count(config))  # what `run` refuses with workers
    missing, unverified = asyncio.run(subject_problems(config))  # registry subjects, when the registry answers
    problems += missing
    for warning in unverified:
        print(f"  warning: {warning}", file=sys.stderr)
    for problem in environment:
        print(f"  warning: {problem} (needed by `mediator run`)", file=sys.stderr)
    for warning in broad_rules(config.adapters, config.root.authorization):  # valid, but likely not meant
        print(f"  warning: {warning}", file=sys.stderr)
    if problems:
        raise ConfigError(args.config, problems)
    print(
        f"{args.config}: ok ({len(config.root.inbound)} inbound, {len(config.root.outbound)} outbound, "
        f"{len(config.routes)} routes)"
    )
    return 0


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from mediator import supervisor
    from mediator.logs import configure

    configure(config.daemon.log_level, config.daemon.log_format)
    slot: supervisor.Slot | None = getattr(args, "slot", None)
    lock: DaemonLock | None = getattr(args, "lock", None)  # taken by main() before the imports, as a rule
    if slot is None and lock is None:  # a worker runs under its supervisor's lock, inherited (mediator/lock.py)
        try:
            lock = _lock(config)
        except AlreadyRunning as exc:
            print(f"mediator: {exc}", file=sys.stderr)
            return EXIT_RUNNING
        except OSError as exc:
            print(f"mediator: cannot lock the outbox's directory: {exc}", file=sys.stderr)
            return 1
    if lock is not None:  # the counts seen, for the next start with another one (supervisor.drain_view)
        supervisor.record_workers(lock.path.parent, supervisor.worker_count(config))
    try:
        if slot is None and supervisor.worker_count(config) > 1:
            # `workers = N`: this process only supervises; each worker is `run --worker K` (mediator/supervisor.py).
            return supervisor.run_supervisor(config, supervisor.worker_count(config), lock)
        return _run_daemon(config, slot, lock)
    finally:
        if lock is not None:
            lock.release()


def _lock(config: Config) -> DaemonLock | None:
    """The daemon lock on the pid file beside the outbox (``mediator.lock``); None for an in-memory outbox
    whose directory cannot be written (it keeps nothing there but the pid file, as before the lock)."""
    import structlog

    try:
        return DaemonLock.acquire(_pid_file(config.outbox.path))
    except OSError as exc:
        if config.outbox.kind != "memory":
            raise
        structlog.get_logger(__name__).warning("daemon.pid_file_unwritable", error=str(exc))
        return None


def _pid_file(outbox_path: str) -> Path:
    """The pid file, and daemon lock, beside the outbox (``mediator.daemon.PID_FILE``)."""
    return Path(outbox_path).parent / "mediator.pid"


def _early_lock(config_path: str) -> DaemonLock | None:
    """``mediator run``'s lock, taken from the file as it is before anything is imported or validated:
    raises ``AlreadyRunning``; None when the file cannot be read or the lock file cannot be made (then
    ``cmd_run`` tries again once the config is loaded, and says what is wrong)."""
    import tomllib

    try:
        raw = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        outbox = raw.get("outbox", {})
        path = str(outbox.get("path", "var/outbox.sqlite")) if isinstance(outbox, dict) else "var/outbox.sqlite"
        return DaemonLock.acquire(_pid_file(path))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _run_daemon(config: Config, slot: Slot | None, lock: DaemonLock | None) -> int:
    import asyncio

    import structlog

    # imports the adapters' libraries; not needed by `check`
    from mediator.daemon import Daemon, StartupFailed, startup_failure

    async def main() -> None:
        if slot is None:
            daemon = Daemon(config)
            daemon.lock = lock
            await daemon.run()
        else:
            from mediator.worker import WorkerDaemon

            structlog.contextvars.bind_contextvars(worker=slot.index)
            await WorkerDaemon(config, slot).run()

    _install_uvloop()
    _freeze_startup_heap()
    try:
        asyncio.run(main())  # may raise ConfigError while building adapters (a secret's variable is not set)
    except (StartupFailed, BaseExceptionGroup) as exc:  # a worker's comes in its own task group
        failure = startup_failure(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if failure is None:
            raise
        print(f"mediator: {failure}", file=sys.stderr)  # the log has the details (listener.bind_failed)
        return EXIT_STARTUP
    return 0


# The youngest generation is collected every 10,000 net allocations instead of 700. A message allocates a
# few hundred objects, almost all freed by reference counting (which takes them off the count), yet at 700
# the collector still ran every ~60 messages for about a millisecond each. HTTP -> AMQP (5 s at saturation,
# 3 s at 1,000 msgs/s, gc.callbacks timing, runs interleaved): time in the collector 242-319 -> 1.4-2.0 ms
# per run, daemon CPU 335-367 -> 313-321 us per message. The older generations keep their default ratios.
GC_THRESHOLDS = (10_000, 10, 10)


def _freeze_startup_heap() -> None:
    """Move what the imports and the config built into the collector's permanent generation.

    That is ~63,000 objects (modules, classes, the protocol libraries) against ~1,300 that the running daemon
    holds, and every full collection scanned them all: the longest stall of the event loop. Measured on
    MQTT -> AMQP (3 s at saturation, then 5 s at 1,000 msgs/s): longest full collection 62 -> 5.7 ms.
    Frozen before any connection, task or message exists, so that everything the running daemon creates
    stays collectable. (Freezing after startup with rarer collections, c2c8bf0, once stopped aio-pika's
    robust reconnection from resuming a consumer: that was the inbound not holding its channel, fixed in
    acf23a4, which tests/faults test_rabbitmq_outage_under_load catches.) Then ``GC_THRESHOLDS``.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def _admin_url(config: Config, args: argparse.Namespace) -> tuple[str, dict[str, str], str] | None:
    """The running daemon's admin endpoint (the first HTTP listener that serves it), the headers carrying
    the credential the flags name (``mediator.client.credential_of``; the listener's ``admin_token_env``
    variable when none is named and it is set), and where that credential came from (for errors)."""
    from mediator.client import api_key_header, credential_of

    for name, body in config.root.listeners.items():
        if body.get("kind") == "http" and body.get("admin", True):
            host = body.get("host", "127.0.0.1")
            host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
            host = f"[{host}]" if ":" in host else host
            credential = credential_of(args, body.get("admin_token_env"))
            headers = {}
            if credential.token:
                headers["Authorization"] = f"Bearer {credential.token}"
            if credential.api_key:
                headers[api_key_header(config, name)] = credential.api_key
            return f"http://{host}:{body.get('port', 8080)}/admin/dead-letters", headers, credential.origin
    return None


def _print_letters(letters: list[dict[str, object]], as_json: bool | None) -> None:
    """A table on a terminal (or with ``--table``), JSON with ``--json`` or into a pipe."""
    from mediator.client import describe_rows, table

    if as_json is None:
        as_json = not sys.stdout.isatty()
    if as_json:
        print(json.dumps({"dead_letters": letters}, indent=2))
    elif letters:
        print(table(describe_rows(letters), fold=True))
    else:
        print("no dead letters")


async def _dead_letters(config: Config, args: argparse.Namespace) -> int:
    import aiohttp

    from mediator.admin import describe

    action: str = args.action
    ids: list[int] | None = args.id or None
    limit: int = args.limit
    as_json: bool | None = args.json
    target = _admin_url(config, args)
    if target is not None:
        url, headers, origin = target
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                if action == "list":
                    async with http.get(url, params={"limit": str(limit)}, headers=headers) as resp:
                        if resp.status != 200:
                            return await _admin_failed(resp, origin)
                        _print_letters((await resp.json())["dead_letters"], as_json)
                elif action in ("show", "delete", "audit"):
                    return await _dead_letter_action(http, url, headers, origin, action, ids, limit)
                else:
                    body = {"ids": ids} if ids is not None else {}
                    async with http.post(f"{url}/replay", json=body, headers=headers) as resp:
                        if resp.status != 200:
                            return await _admin_failed(resp, origin)
                        print(json.dumps(await resp.json()))
                return 0
        except aiohttp.ClientConnectionError:
            pass  # no daemon running: work on the outbox file
    if action in ("show", "delete", "audit"):
        print(f"mediator: dead-letters {action} needs a running daemon's admin endpoint", file=sys.stderr)
        return 1
    if config.outbox.kind != "sqlite":
        print("no running daemon answers, and an in-memory outbox keeps nothing on disk", file=sys.stderr)
        return 1
    from mediator.outbox import SqliteOutbox

    try:  # the outbox file is the daemon's while it runs: never two processes on it (mediator/lock.py)
        lock = DaemonLock.acquire(_pid_file(config.outbox.path))
    except AlreadyRunning as exc:
        print(f"mediator: no admin endpoint answers, and {exc}; ask it through its admin endpoint", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mediator: cannot lock the outbox's directory: {exc}", file=sys.stderr)
        return 1
    outbox = SqliteOutbox(config.outbox.path)
    try:
        await outbox.open()
    except BaseException:
        lock.release()
        raise
    try:
        if action == "list":
            _print_letters([describe(dl) for dl in await outbox.dead_letters(limit)], as_json)
        else:
            rows = await outbox.replay(ids)
            if ids and not rows:
                print(f"mediator: no replayable dead letter with id {', '.join(map(str, ids))}", file=sys.stderr)
                return 1
            print(json.dumps({"replayed": len(rows), "note": "delivered when the daemon next starts"}))
    finally:
        await outbox.close()
        lock.release()
    return 0


async def _dead_letter_action(
    http: Any, url: str, headers: dict[str, str], origin: str, action: str, ids: list[int] | None, limit: int
) -> int:
    """``show`` (each --id whole: attributes and data), ``delete`` (the --id letters) and ``audit`` (who
    changed what) through the admin API the dashboard uses (GET /admin/dead-letters/ID, POST
    /admin/dead-letters/delete, GET /admin/audit); JSON on stdout."""
    if action == "audit":
        async with http.get(url.removesuffix("/dead-letters") + "/audit", params={"limit": str(limit)},
                            headers=headers) as resp:  # fmt: skip
            if resp.status != 200:
                return await _admin_failed(resp, origin)
            print(json.dumps(await resp.json(), indent=2))
        return 0
    if not ids:
        print(f"mediator: dead-letters {action} needs --id", file=sys.stderr)
        return 1
    if action == "delete":
        async with http.post(f"{url}/delete", json={"ids": ids}, headers=headers) as resp:
            if resp.status != 200:
                return await _admin_failed(resp, origin)
            print(json.dumps(await resp.json()))
        return 0
    for i in ids:
        async with http.get(f"{url}/{i}", headers=headers) as resp:
            if resp.status != 200:
                return await _admin_failed(resp, origin)
            print(json.dumps(await resp.json(), indent=2, ensure_ascii=False))
    return 0


async def _admin_failed(resp: object, origin: str) -> int:
    """The daemon's refusal (404 for an unknown id, 401/403) on one line, exit status 1. A 401 or 403
    says which credential was refused (where it came from, never its value) and how to pass one."""
    import aiohttp

    from mediator.client import CREDENTIAL_HINT

    assert isinstance(resp, aiohttp.ClientResponse)
    try:
        body = await resp.json(content_type=None)
        reason = body.get("reason") if isinstance(body, dict) else None
    except ValueError:
        reason = None
    answer = f"{resp.status} {reason or resp.reason}"
    if resp.status in (401, 403) and not origin:
        print(f"mediator: the daemon asks for a credential ({answer}); {CREDENTIAL_HINT}", file=sys.stderr)
    elif resp.status in (401, 403):
        print(
            f"mediator: the daemon refused the credential from {origin} ({answer}); {CREDENTIAL_HINT} "
            "with one it accepts (a principal needs a role in [security] admin_roles)",
            file=sys.stderr,
        )
    else:
        print(f"mediator: the daemon answered {answer}", file=sys.stderr)
    return 1


async def _admin_get(
    url: str, headers: dict[str, str], origin: str, not_found: str | None = None
) -> dict[str, Any] | int:
    """GET an admin document: its JSON, or the exit status (1) once the refusal is printed. With
    ``not_found``, a 404 prints the problem's detail (or that text) instead of the generic refusal."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.get(url, headers=headers) as resp,
        ):
            if resp.status == 404 and not_found is not None:
                body = await resp.json(content_type=None)
                detail = (body.get("detail") or body.get("reason")) if isinstance(body, dict) else None
                print(f"mediator: {detail or not_found}", file=sys.stderr)
                return 1
            if resp.status != 200:
                return await _admin_failed(resp, origin)
            doc: dict[str, Any] = await resp.json()
            return doc
    except aiohttp.ClientConnectionError as exc:
        print(f"mediator: no running daemon answers at {url}: {exc}", file=sys.stderr)
        return 1


async def _status(config: Config, args: argparse.Namespace) -> int:

    from mediator.observability.status import render

    as_json: bool | None = args.json
    target = _admin_url(config, args)
    if target is None:
        print("mediator: the config has no HTTP listener serving the admin endpoints", file=sys.stderr)
        return 1
    url, headers, origin = target
    doc = await _admin_get(url.removesuffix("/dead-letters") + "/status", headers, origin)
    if isinstance(doc, int):
        return doc
    if as_json is None:
        as_json = not sys.stdout.isatty()
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    return 0


async def _event_status(config: Config, args: argparse.Namespace) -> int:
    """``mediator status EVENT-ID``: GET /events/{id}/status on the admin listener, with the credential
    the flags name (the admin token, or the publisher's or an admin's key or token)."""
    from urllib.parse import quote

    from mediator.client import table

    event_id: str = args.event_id
    as_json: bool | None = args.json
    target = _admin_url(config, args)
    if target is None:
        print("mediator: the config has no HTTP listener serving the admin endpoints", file=sys.stderr)
        return 1
    url, headers, origin = target
    url = url.removesuffix("/admin/dead-letters") + f"/events/{quote(event_id, safe='')}/status"
    doc = await _admin_get(url, headers, origin, not_found="no such event")
    if isinstance(doc, int):
        return doc
    if as_json is None:
        as_json = not sys.stdout.isatty()
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"event {doc['id']}: {doc['state']}" + (f" ({doc['reason']})" if doc.get("reason") else ""))
    rows = [["ROUTE", "OUTBOUND", "ADDRESS", "STATE", "ATTEMPTS", "AT", "REASON"]]
    for d in doc.get("destinations", []):
        at = d.get("delivered_at") or d.get("dead_at") or ""
        rows.append([d["route"], d["outbound"], d["address"], d["state"], str(d["attempts"]), at, d.get("reason", "")])
    print(table(rows, fold=True))
    return 0


def _admin_base(config: Config, args: argparse.Namespace) -> tuple[str, dict[str, str], str] | None:
    """The admin listener's base URL (``http://HOST:PORT/admin``), headers and the credential's origin."""
    target = _admin_url(config, args)
    if target is None:
        print("mediator: the config has no HTTP listener serving the admin endpoints", file=sys.stderr)
        return None
    url, headers, origin = target
    return url.removesuffix("/dead-letters"), headers, origin


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


async def _events(config: Config, args: argparse.Namespace) -> int:
    """``mediator events list`` (GET /admin/events, following ``next`` up to --limit) and ``show ID``."""
    from urllib.parse import quote, urlencode

    from mediator.client import table

    base = _admin_base(config, args)
    if base is None:
        return 1
    url, headers, origin = base
    if args.action == "show":
        if not args.id:
            print("mediator: events show needs an event id", file=sys.stderr)
            return EXIT_CONFIG
        query = f"?{urlencode({'source': args.source})}" if args.source else ""
        doc = await _admin_get(f"{url}/events/{quote(args.id, safe='')}{query}", headers, origin, "no such event")
        if isinstance(doc, int):
            return doc
        _print_json(doc)
        return 0
    params = {
        k: v
        for k, v in {
            "type": args.type,
            "source": args.source,
            "subject": args.subject,
            "since": args.since,
            "until": args.until,
            "where": args.where,
            "order": args.order,
        }.items()
        if v
    }
    wanted: int = args.limit
    events: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(events) < wanted:
        page_params = {**params, "limit": str(min(1000, wanted - len(events)))}
        if cursor:
            page_params["cursor"] = cursor
        doc = await _admin_get(f"{url}/events?{urlencode(page_params)}", headers, origin)
        if isinstance(doc, int):
            return doc
        events += doc["events"]
        cursor = doc.get("next")
        if not cursor:
            break
    if args.json:
        for e in events:
            print(json.dumps(e, separators=(",", ":")))
        return 0
    if not events:
        print("no stored events match")
        return 0
    rows = [["RECEIVED", "TYPE", "SOURCE", "SUBJECT", "INBOUND", "ID"]]
    for e in events:
        ev = e["event"]
        rows.append(
            [
                e["received"],
                ev.get("type", ""),
                ev.get("source", ""),
                str(ev.get("subject", "")),
                e["inbound"],
                ev["id"],
            ]
        )
    print(table(rows))
    if cursor:
        print(f"(more: --limit {wanted * 2} for more)")
    return 0


async def _replay(config: Config, args: argparse.Namespace) -> int:
    """``mediator replay``: POST /admin/replays, then follow the job until it ends (``--detach``: do not)."""
    import asyncio

    import aiohttp

    base = _admin_base(config, args)
    if base is None:
        return 1
    url, headers, origin = base
    if args.cancel:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
                http.delete(f"{url}/replays/{args.cancel}", headers=headers) as resp,
            ):
                if resp.status != 200:
                    return await _admin_failed(resp, origin)
                _print_json(await resp.json())
                return 0
        except aiohttp.ClientConnectionError as exc:
            print(f"mediator: no running daemon answers at {url}: {exc}", file=sys.stderr)
            return 1
    if not args.since or (args.to is None) == (args.route is None):
        print("mediator: replay needs --since and one of --to OUTBOUND[:ADDRESS] or --route NAME", file=sys.stderr)
        return EXIT_CONFIG
    body: dict[str, object] = {
        k: v
        for k, v in {
            "type": args.type,
            "source": args.source,
            "subject": args.subject,
            "since": args.since,
            "until": args.until,
            "where": args.where,
            "to": args.to,
            "route": args.route,
        }.items()
        if v
    }
    body["rate"] = args.rate
    body["dry_run"] = args.dry_run
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(f"{url}/replays", json=body, headers=headers) as resp:
                if resp.status not in (200, 201):
                    return await _admin_failed(resp, origin)
                job = await resp.json()
            if args.dry_run:
                print(f"dry run: {job['total']} events would be replayed" if not args.json else json.dumps(job))
                return 0
            print(f"replay {job['id']}: {job['total']} events", file=sys.stderr)
            while not args.detach and job["state"] == "running":
                await asyncio.sleep(1.0)
                async with http.get(f"{url}/replays/{job['id']}", headers=headers) as resp:
                    if resp.status != 200:
                        return await _admin_failed(resp, origin)
                    job = await resp.json()
                print(f"replay {job['id']}: {job['done']}/{job['total']} at {job['rate']}/s", file=sys.stderr)
    except aiohttp.ClientConnectionError as exc:
        print(f"mediator: no running daemon answers at {url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(job) if args.json else f"replay {job['id']}: {job['state']}, {job['done']}/{job['total']}")
    return 0 if job["state"] in ("done", "running") else 1


def cmd_events(args: argparse.Namespace, config: Config) -> int:
    from mediator import client
    from mediator.logs import configure

    configure("warning", "console")
    return client.run(_events(config, args))


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    from mediator import client
    from mediator.logs import configure

    configure("warning", "console")
    return client.run(_replay(config, args))


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from mediator import client
    from mediator.logs import configure

    configure("warning", "console")
    if args.event_id is not None:
        return client.run(_event_status(config, args))
    return client.run(_status(config, args))


def cmd_dead_letters(args: argparse.Namespace, config: Config) -> int:
    from mediator import client
    from mediator.logs import configure

    configure("warning", "console")
    return client.run(_dead_letters(config, args))


def cmd_publish(args: argparse.Namespace, config: Config | None) -> int:
    from mediator import client

    try:
        event = client.build_event(args, client.read_data(args.data, sys.stdin.buffer))
        target = client.target_of(args, config)
    except client.ClientError as exc:
        print(f"mediator: {exc}", file=sys.stderr)
        return 1

    async def main() -> int:
        reply = await client.publish(target, event, args.timeout)
        print(json.dumps(reply))
        return 0

    return client.run(main())


def cmd_tail(args: argparse.Namespace, config: Config | None) -> int:
    from mediator import client
    from mediator.v1.service_pb2 import SubscribeRequest

    try:
        target = client.target_of(args, config)
    except client.ClientError as exc:
        print(f"mediator: {exc}", file=sys.stderr)
        return 1
    request = SubscribeRequest(
        outbound=args.outbound or "", type=args.type or "", source=args.source or "", address=args.address or ""
    )
    return client.run(
        client.tail(
            target, request, count=args.count, timeout_s=args.timeout, as_json=args.json, out=sys.stdout, err=sys.stderr
        )
    )


def cmd_reload(args: argparse.Namespace) -> int:
    """Signal the running daemon to reload (SIGHUP; SIGUSR1 with ``--force``) and print the outcome it
    writes beside the outbox. Finds the daemon by its pid file there; exits 1 if the reload was refused or
    rolled back, or no daemon answers.

    With ``workers = N`` the pid is the supervisor's, and the outcome the supervisor's gathering of every
    worker's (``mediator.supervisor.merge_reload``: "pending" until each worker answered, "applied" only when
    each applied, each worker's own under ``workers``): printed once final; at the timeout, what is there so
    far, and the workers not heard from are named."""
    import signal
    import time
    import tomllib

    from mediator.daemon import PID_FILE, RELOAD_STATUS_FILE

    # Only where the outbox is, from the file as it is now: a file the daemon would refuse must not stop us.
    try:
        raw = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        outbox_path = str(raw.get("outbox", {}).get("path", "var/outbox.sqlite"))
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        outbox_path = "var/outbox.sqlite"
    state = Path(outbox_path).parent
    try:
        pid = int((state / PID_FILE).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        print(f"mediator: no running daemon (no live pid in {state / PID_FILE})", file=sys.stderr)
        return 1
    status_path = state / RELOAD_STATUS_FILE

    def status() -> dict[str, object] | None:
        try:
            value = json.loads(status_path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    before = status()
    os.kill(pid, signal.SIGUSR1 if args.force else signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        after = status()
        if after is not None and after != before and after.get("pid") == pid and after.get("outcome") != "pending":
            print(json.dumps(after, indent=2))
            _not_heard_from(after, "the daemon's wait")
            return 0 if after.get("outcome") == "applied" else 1
        time.sleep(0.1)
    after = status()
    if after is not None and after != before and after.get("pid") == pid:  # workers: some have not answered
        print(json.dumps(after, indent=2))
        _not_heard_from(after, f"{args.timeout} s")
        return 1
    print(
        f"mediator: sent {'SIGUSR1' if args.force else 'SIGHUP'} to {pid}; no outcome within {args.timeout} s "
        "(see the daemon's log)",
        file=sys.stderr,
    )
    return 1


def _not_heard_from(outcome: dict[str, object], within: str) -> None:
    """Name on stderr the workers whose reload outcome the supervisor is still waiting for."""
    workers = outcome.get("workers")
    waiting = [
        f"worker {k} ({w.get('state')})"
        for k, w in (workers.items() if isinstance(workers, dict) else ())
        if isinstance(w, dict) and w.get("outcome") == "waiting"
    ]
    if waiting:
        print(f"mediator: no reload outcome within {within} from {'; '.join(waiting)}", file=sys.stderr)


def _credential_options(p: argparse.ArgumentParser, admin: bool) -> None:
    """How to pass the listener's authentication: a bearer token or an API key, best by the NAME of an
    environment variable holding it (a value on the command line shows in ``ps``)."""
    g = p.add_argument_group(
        "credentials",
        "One credential, best by environment variable: a --token or --api-key value shows in `ps`. Default: "
        "$MEDIATOR_TOKEN or $MEDIATOR_API_KEY (one of them)"
        + (
            ", else the variable the HTTP listener's admin_token_env names. The admin endpoints take the "
            "admin_token_env token or, on a listener with auth, a principal with a role in [security] admin_roles"
            if admin
            else ""
        ),
    )
    g.add_argument("--token-env", metavar="NAME", help="environment variable holding the bearer token (preferred)")
    g.add_argument("--token", help="the bearer token itself, sent as `Authorization: Bearer ...` (visible in `ps`)")
    g.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the API key (preferred)")
    g.add_argument(
        "--api-key",
        help="the API key itself, sent in the header of the listener's api_key authenticator "
        "(default x-api-key; visible in `ps`)",
    )


def _client_options(p: argparse.ArgumentParser) -> None:
    """Where the daemon's gRPC API is and how to pass its listener's checks."""
    p.add_argument("--config", "-c", default=_default_config(), help="config.toml naming the gRPC listener")
    p.add_argument("--target", help="HOST:PORT of the gRPC listener (default: the config's first gRPC listener)")
    _credential_options(p, admin=False)
    p.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-file or the listener's tls)")
    p.add_argument("--ca-file", help="PEM CA bundle the listener's certificate chains to")
    p.add_argument("--cert-file", help="client certificate (PEM) for an mTLS listener")
    p.add_argument("--key-file", help="its private key (PEM)")
    p.add_argument("--server-name", help="name to verify in the listener's certificate instead of the host")


def _default_config() -> str:
    return os.environ.get(CONFIG_ENV) or "config.toml"


def cmd_hash_key(args: argparse.Namespace) -> int:
    """A new API key on stdout's first line, and the ``[[keys]]`` entry (its SHA-256, never the key) after."""
    from mediator.stages.authn import new_api_key

    key, digest = new_api_key()
    print(key)
    print("# add to the keys_file (the key above is shown once; give it to the client):", file=sys.stderr)
    roles = ", ".join(json.dumps(r) for r in args.role or [])
    entry = f'[[keys]]\nprincipal = {json.dumps(args.principal)}\nsha256 = "{digest}"\nroles = [{roles}]\n'
    if args.expires:
        from datetime import datetime

        try:
            when = datetime.fromisoformat(args.expires)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            print(f"--expires: {args.expires!r} is not an RFC 3339 date-time with an offset", file=sys.stderr)
            return EXIT_CONFIG
        entry += f"expires = {args.expires}\n"
    print(entry, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mediator", description="Multi-protocol event gateway.")
    parser.add_argument("--version", action="version", version=f"mediator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("run", cmd_run, "run the daemon"),
        ("check", cmd_check, "validate a config file and list every error"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", default=_default_config(), help=f"path to config.toml (or ${CONFIG_ENV})")
        if name == "run":
            p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # started by the supervisor
        p.set_defaults(func=func)
    dlq = sub.add_parser(
        "dead-letters",
        help="list or replay dead letters (running daemon, else the outbox file); show one whole, delete, "
        "or read the audit log of these changes (running daemon)",
    )
    dlq.add_argument("action", choices=["list", "replay", "show", "delete", "audit"])
    dlq.add_argument("--config", "-c", default=_default_config(), help=f"path to config.toml (or ${CONFIG_ENV})")
    dlq.add_argument("--id", type=int, action="append", help="replay (show, delete) only this dead letter (repeatable)")
    dlq.add_argument("--limit", type=int, default=100, help="list at most this many")
    shape = dlq.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", default=None, help="list as JSON (the default into a pipe)")
    shape.add_argument("--table", dest="json", action="store_false", help="list as a table (the default on a terminal)")
    _credential_options(dlq, admin=True)
    dlq.set_defaults(func=cmd_dead_letters)
    st = sub.add_parser(
        "status",
        help="the running daemon's listeners, brokers, inbounds, outbounds, outbox, config; "
        "with EVENT-ID, what became of that event (its delivery status)",
    )
    st.add_argument(
        "event_id", nargs="?", metavar="EVENT-ID", help="an event id a publish answered: that event's delivery status"
    )
    st.add_argument("--config", "-c", default=_default_config(), help=f"path to config.toml (or ${CONFIG_ENV})")
    shape = st.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", default=None, help="as JSON (the default into a pipe)")
    shape.add_argument("--table", dest="json", action="store_false", help="as tables (the default on a terminal)")
    _credential_options(st, admin=True)
    st.set_defaults(func=cmd_status)
    ev = sub.add_parser("events", help="list or show the events the running daemon's store keeps ([store])")
    ev.add_argument("action", choices=["list", "show"])
    ev.add_argument("id", nargs="?", metavar="ID", help="show: the event's id")
    ev.add_argument("--config", "-c", default=_default_config(), help=f"path to config.toml (or ${CONFIG_ENV})")
    ev.add_argument("--type", help="event type, exact or a glob ('com.example.*')")
    ev.add_argument("--source", help="event source (exact)")
    ev.add_argument("--subject", help="event subject (exact)")
    ev.add_argument("--since", help="received at or after: '10m', '2h', '7d' ago, or an RFC 3339 time")
    ev.add_argument("--until", help="received before: as --since")
    ev.add_argument("--where", help="CEL over attributes and data, e.g. 'data.total > 100.0'")
    ev.add_argument("--order", choices=["newest", "oldest"], help="newest first (the default) or oldest first")
    ev.add_argument("--limit", type=int, default=100, help="list at most this many (default 100)")
    ev.add_argument("--json", action="store_true", help="one JSON object per line (the event and the gateway's facts)")
    _credential_options(ev, admin=True)
    ev.set_defaults(func=cmd_events)
    rp = sub.add_parser(
        "replay",
        help="send stored events again through the outbox (a durable, rate-limited job of the running daemon)",
    )
    rp.add_argument("--config", "-c", default=_default_config(), help=f"path to config.toml (or ${CONFIG_ENV})")
    rp.add_argument("--type", help="event type, exact or a glob")
    rp.add_argument("--source", help="event source (exact)")
    rp.add_argument("--subject", help="event subject (exact)")
    rp.add_argument("--since", help="received at or after (required): '1h' ago or an RFC 3339 time")
    rp.add_argument("--until", help="received before (default: now)")
    rp.add_argument("--where", help="CEL over attributes and data")
    rp.add_argument("--to", metavar="OUTBOUND[:ADDRESS]", help="one destination (the address may be a template)")
    rp.add_argument("--route", metavar="NAME", help="through today's route NAME ('*': every route)")
    rp.add_argument("--rate", type=float, default=1000.0, help="events a second at most (default 1000)")
    rp.add_argument("--dry-run", action="store_true", help="count the events, send nothing")
    rp.add_argument("--detach", action="store_true", help="start it and exit (follow with `mediator status`)")
    rp.add_argument("--cancel", metavar="REPLAY-ID", help="cancel a running replay")
    rp.add_argument("--json", action="store_true", help="the replay's final document as JSON")
    _credential_options(rp, admin=True)
    rp.set_defaults(func=cmd_replay)
    pub = sub.add_parser("publish", help="publish one event through the running daemon's gRPC API")
    pub.add_argument("data", nargs="?", help="the event data: text, @FILE for a file's bytes, - for stdin")
    pub.add_argument("--type", required=True, help="event type, e.g. com.example.order.created")
    pub.add_argument("--source", default="/mediator/cli", help="event source (default /mediator/cli)")
    pub.add_argument("--id", help="event id (default: a new UUID); the same source and id again is a duplicate")
    pub.add_argument("--content-type", help="datacontenttype (default: guessed: JSON, text or octet-stream)")
    pub.add_argument("--attr", action="append", metavar="NAME=VALUE", help="an extension attribute (repeatable)")
    pub.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the commit (default 10)")
    _client_options(pub)
    pub.set_defaults(func=cmd_publish)
    tl = sub.add_parser(
        "tail",
        help="print the events routed to a gRPC outbound as they arrive (Subscribe)",
        description="Print the events routed to the daemon's gRPC outbounds as they arrive (Subscribe). Waits "
        "for a daemon that is not up yet and subscribes again when it restarts (backoff up to 5 s, a line on "
        "stderr each time); events routed while no subscription was live are not shown: Subscribe cannot resume.",
    )
    tl.add_argument("--type", help="exact type or a glob, e.g. 'com.example.*' (default: any)")
    tl.add_argument("--source", help="glob over source (default: any)")
    tl.add_argument("--outbound", help="the gRPC outbound to follow (default: every one)")
    tl.add_argument("--address", help="glob over the destination address (default: any)")
    tl.add_argument("--count", type=int, help="exit after this many events")
    tl.add_argument("--timeout", type=float, help="exit after this many seconds")
    tl.add_argument("--json", action="store_true", help="one CloudEvents JSON object per line")
    _client_options(tl)
    tl.set_defaults(func=cmd_tail)
    hk = sub.add_parser("hash-key", help="make a new API key and its [[keys]] entry for an api_key keys_file")
    hk.add_argument("--principal", required=True, help="who the key authenticates")
    hk.add_argument("--role", action="append", help="a role of that principal (repeatable)")
    hk.add_argument("--expires", help="RFC 3339 date-time after which the key is refused, e.g. 2027-01-01T00:00:00Z")
    rl = sub.add_parser("reload", help="make the running daemon reload its config file and print the outcome")
    rl.add_argument("--config", "-c", default=_default_config(), help=f"path to config.toml (or ${CONFIG_ENV})")
    rl.add_argument("--force", action="store_true", help="apply a config with no route, inbound or listener")
    rl.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the outcome (default 30)")
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        return cmd_hash_key(args)
    if args.command == "reload":
        return cmd_reload(args)
    try:
        if args.command in ("publish", "tail") and args.target is not None:
            return int(args.func(args, None))  # told where: no config needed
        if args.command == "run" and args.worker is None:
            args.lock = _early_lock(args.config)  # before the heavy imports: a second run is refused at once
        if args.command == "run" and args.worker is not None:
            from mediator.supervisor import enter_worker

            args.slot = enter_worker(args.worker)  # before the load: the worker sees the config through its view
        elif args.command == "run":
            from mediator.supervisor import enter_daemon

            enter_daemon()  # its MQTT inbounds drain the sessions another `workers` count left
        code: int = args.func(args, _load(args.config))
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    except AlreadyRunning as exc:
        print(f"mediator: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    return code


if __name__ == "__main__":
    sys.exit(main())
