"""One worker of ``workers = N`` (``mediator.supervisor``): a whole daemon that answers admin and metrics
requests for the whole daemon.

A request on a shared port reaches whichever worker the kernel picked, and each worker has its own outbox.
So every worker serves its own state to its siblings on a Unix socket in the supervisor's run directory
(``PeerServer``: mode 0600 in a directory only the daemon's user can enter), and the listeners' admin is a
``FleetAdmin``, which asks every sibling and merges:

- ``/admin/dead-letters``: the dead letters of every outbox, oldest first, each with its ``worker``; ids
  are made unique across workers as ``local_id * 1000 + K`` (``ID_SPAN``), which a replay splits again;
- ``/admin/status``: numbers summed over the workers, booleans true only when true in every worker,
  other values kept where the workers agree; each worker's own status under ``workers``;
- ``/events/{id}/status`` and ``GetStatus``: the event's status from the worker whose outbox holds it
  (this worker's first, then the siblings'); ``Prefer: wait`` waits in the worker that took the publish,
  whose outbox committed it;
- ``/metrics``: one exposition with every sample labelled ``worker="K"`` (``sum without (worker)`` is
  the daemon). The listener renders synchronously, so the siblings' part is what they answered at most
  ``METRICS_REFRESH_S`` ago (fetched in the background); this worker's own part is current.

A sibling that does not answer (it is being restarted) is left out of the answer and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mediator.admin import DeadLetterAdmin
from mediator.config import Config
from mediator.core.seams import StatusLookup, StatusReader, WaitOutcome
from mediator.daemon import Daemon
from mediator.status import lookup_from_json, lookup_to_json
from mediator.supervisor import Slot

log = structlog.get_logger(__name__)

ID_SPAN = 1000
"""A dead letter's id across workers: ``local_id * ID_SPAN + K`` (``workers`` is at most 999)."""
PEER_TIMEOUT_S = 5.0
METRICS_REFRESH_S = 1.0


def merge_status(parts: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Whole-daemon status from each worker's (see the module docstring)."""
    merged = _merge([dict(p) for _, p in sorted(parts.items())])
    assert isinstance(merged, dict)
    merged["pid"] = os.getppid()  # the supervisor: the daemon's pid
    merged["workers"] = {str(k): dict(v) for k, v in sorted(parts.items())}
    return merged


_NOT_SUMMED = frozenset(
    {"pid", "port", "max_pending", "max_in_flight", "prefetch"}
    # [overload]'s thresholds and each worker's own ratios and lags (mediator/overload.py)
    | {"fill", "low", "normal", "lag_s", "max_lag_s", "low_s", "normal_s", "stall_s"}
)


def _merge(values: Sequence[Any], key: str = "") -> Any:
    """Numbers summed, booleans and-ed, lists of named items merged by name, anything else the first
    worker's (times, details)."""
    first = values[0]
    if all(isinstance(v, bool) for v in values):
        return all(values)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) and key not in _NOT_SUMMED:
        return sum(values)
    if all(isinstance(v, dict) for v in values):
        keys: list[str] = []
        for v in values:
            keys += [k for k in v if k not in keys]
        return {k: _merge([v[k] for v in values if k in v], k) for k in keys}
    if all(isinstance(v, list) for v in values) and all(_named(item) for v in values for item in v):
        names: list[str] = []
        for v in values:
            names += [item["name"] for item in v if item["name"] not in names]
        return [_merge([item for v in values for item in v if item["name"] == n]) for n in names]
    return first


def _named(item: object) -> bool:
    return isinstance(item, dict) and isinstance(item.get("name"), str)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_metrics(parts: Mapping[int, bytes]) -> bytes:
    """One Prometheus text exposition from each worker's, every sample labelled ``worker="K"``."""
    families: dict[str, Metric] = {}
    for k, text in sorted(parts.items()):
        for family in text_string_to_metric_families(text.decode("utf-8")):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [s._replace(labels={**s.labels, "worker": str(k)}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class Peers:
    """The sibling workers' ``PeerServer`` sockets."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    @property
    def others(self) -> list[int]:
        return [k for k in range(1, self.slot.count + 1) if k != self.slot.index]

    async def call(self, k: int, method: str, path: str, body: object = None) -> Any:
        connector = aiohttp.UnixConnector(path=str(self.slot.socket(k)))
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
            http.request(method, f"http://worker{k}{path}", json=body) as resp,
        ):
            resp.raise_for_status()
            if resp.content_type == "application/json":
                return await resp.json()
            return await resp.read()

    async def gather(self, method: str, path: str, body: object = None, quiet: bool = False) -> dict[int, Any]:
        """Every sibling's answer; one that does not answer is left out (logged; at debug when ``quiet``)."""
        others = self.others
        results = await asyncio.gather(*(self.call(k, method, path, body) for k in others), return_exceptions=True)
        out: dict[int, Any] = {}
        for k, result in zip(others, results, strict=True):
            if isinstance(result, Exception):
                (log.debug if quiet else log.warning)("worker.peer_unreachable", peer=k, path=path, error=repr(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                out[k] = result
        return out


def _stamp(letters: list[dict[str, object]], k: int) -> list[dict[str, object]]:
    out = []
    for letter in letters:
        local = letter.get("id")
        out.append({**letter, "id": local * ID_SPAN + k if isinstance(local, int) else local, "worker": k})
    return out


class FleetAdmin(DeadLetterAdmin):
    """The admin of a worker's listeners: the whole daemon's, from every worker. ``DeadLetterAdmin``'s
    own methods (``super()``) are this worker's part, which ``PeerServer`` serves to the siblings."""

    def __init__(self, daemon: Daemon, slot: Slot) -> None:
        super().__init__(daemon)
        self.slot = slot
        self.peers = Peers(slot)
        self.own_metrics: Callable[[], bytes] | None = None
        self._peer_metrics: dict[int, bytes] = {}

    # this worker's part
    async def local_dead_letters(self, limit: int) -> list[dict[str, object]]:
        return await super().dead_letters(limit)

    async def local_replay(self, ids: Sequence[int] | None, who: str = "") -> int:
        return await super().replay(ids, who)

    async def local_call(self, action: str, body: Mapping[str, Any]) -> Any:
        """One dead-letter action of the dashboard's on this worker's outbox (``PeerServer``'s ``/act``)."""
        who = str(body.get("who", ""))
        if action == "get":
            return await super().dead_letter(int(body["id"]))
        if action == "edit":
            data = body.get("data")
            raw = data.encode("utf-8") if isinstance(data, str) else None
            return await super().edit_replay(int(body["id"]), raw, body.get("attributes"), who)
        if action == "delete":
            return await super().delete([int(i) for i in body["ids"]], who)
        if action == "audit":
            return await super().audit(int(body.get("limit", 100)))
        raise ValueError(f"unknown action {action!r}")

    async def _on_worker(self, id: int, action: str, body: dict[str, Any]) -> Any:
        """``action`` on the worker whose outbox holds the dead letter ``id`` (ids are stamped: ``_stamp``)."""
        k, local = id % ID_SPAN, id // ID_SPAN
        body = {**body, "id": local}
        if k == self.slot.index:
            return await self.local_call(action, body)
        if k not in self.peers.others:
            return None
        try:
            return await self.peers.call(k, "POST", f"/act/{action}", body)
        except aiohttp.ClientResponseError as exc:
            if exc.status == 400:
                raise ValueError(f"worker {k} refused the {action}") from exc
            raise

    async def local_status(self) -> dict[str, object]:
        return await super().status()

    # the whole daemon
    async def dead_letters(self, limit: int) -> list[dict[str, object]]:
        own = _stamp(await self.local_dead_letters(limit), self.slot.index)
        others = await self.peers.gather("GET", f"/dead-letters?limit={limit}")
        letters = own + [letter for k, part in others.items() for letter in _stamp(part, k)]
        letters.sort(key=lambda letter: str(letter.get("at", "")))
        return letters[:limit]

    async def dead_letter(self, id: int) -> dict[str, object] | None:
        found = await self._on_worker(id, "get", {})
        return _stamp([found], id % ID_SPAN)[0] if isinstance(found, dict) else None

    async def edit_replay(
        self, id: int, data: bytes | None, attributes: Mapping[str, str] | None, who: str = ""
    ) -> int:
        text = data.decode("utf-8") if data is not None else None  # the dashboard edits text data
        return int(await self._on_worker(id, "edit", {"data": text, "attributes": attributes, "who": who}) or 0)

    async def delete(self, ids: Sequence[int], who: str = "") -> int:
        total = 0
        for i in ids:
            k = i % ID_SPAN
            if k == self.slot.index:
                total += await self.local_call("delete", {"ids": [i // ID_SPAN], "who": who})
            elif k in self.peers.others:
                total += int(await self.peers.call(k, "POST", "/act/delete", {"ids": [i // ID_SPAN], "who": who}))
        return total

    async def audit(self, limit: int) -> list[dict[str, object]]:
        own = await self.local_call("audit", {"limit": limit})
        others = await self.peers.gather("POST", "/act/audit", {"limit": limit})
        entries = [dict(e, worker=self.slot.index) for e in own]
        entries += [dict(e, worker=k) for k, part in others.items() for e in part]
        entries.sort(key=lambda e: str(e.get("at", "")), reverse=True)
        return entries[:limit]

    async def replay(self, ids: Sequence[int] | None, who: str = "") -> int:
        if ids is None:
            others = await self.peers.gather("POST", "/replay", {"ids": None, "who": who})
            return await self.local_replay(None, who) + sum(int(n) for n in others.values())
        by_worker: dict[int, list[int]] = {}
        for i in ids:
            by_worker.setdefault(i % ID_SPAN, []).append(i // ID_SPAN)
        total = 0
        for k, local_ids in sorted(by_worker.items()):
            if k == self.slot.index:
                total += await self.local_replay(local_ids, who)
            elif k in self.peers.others:
                try:
                    total += int(await self.peers.call(k, "POST", "/replay", {"ids": local_ids, "who": who}))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("worker.peer_unreachable", peer=k, path="/replay", error=repr(exc))
        return total

    async def status(self) -> dict[str, object]:
        own = await self.local_status()
        others = await self.peers.gather("GET", "/status")
        merged = merge_status({self.slot.index: own, **others})
        merged["workers_configured"] = self.slot.count
        merged["workers_answering"] = 1 + len(others)
        return merged

    def render_metrics(self) -> bytes:
        own = self.own_metrics() if self.own_metrics is not None else b""
        return merge_metrics({self.slot.index: own, **self._peer_metrics})

    async def refresh_metrics(self) -> None:
        """Keep the siblings' expositions at most ``METRICS_REFRESH_S`` old (see the module docstring)."""
        while True:
            answers = await self.peers.gather("GET", "/metrics", quiet=True)
            self._peer_metrics = {k: bytes(v) for k, v in answers.items()}
            await asyncio.sleep(METRICS_REFRESH_S)


class FleetStatus:
    """The delivery status of the whole daemon: the worker whose outbox holds the event answers."""

    def __init__(self, local: StatusReader, peers: Peers) -> None:
        self.local = local
        self.peers = peers

    @property
    def window_s(self) -> float:
        return self.local.window_s

    async def lookup(self, event_id: str) -> StatusLookup:
        own = await self.local.lookup(event_id)
        if own.found == "known":
            return own
        answers = await self.peers.gather("GET", f"/event-status?id={quote(event_id, safe='')}")
        found = [lookup_from_json(a) for _, a in sorted(answers.items())]
        known = [f for f in found if f.found == "known"]
        if known:
            return known[0]
        if own.found == "expired" or any(f.found == "expired" for f in found):
            return StatusLookup("expired")
        return own

    async def wait(self, event_id: str, timeout_s: float, gone: asyncio.Future[None] | None = None) -> WaitOutcome:
        return await self.local.wait(event_id, timeout_s, gone)  # the publish was committed by this worker


class PeerServer:
    """This worker's own part on ``slot.socket(slot.index)``, for its siblings: ``GET /dead-letters``,
    ``POST /replay``, ``GET /status``, ``GET /metrics``, ``GET /event-status?id=``."""

    def __init__(self, admin: FleetAdmin, status: StatusReader) -> None:
        self.admin = admin
        self.status = status

    async def run(self) -> None:
        admin = self.admin

        async def dead_letters(request: web.Request) -> web.Response:
            return web.json_response(await admin.local_dead_letters(int(request.query.get("limit", "100"))))

        async def replay(request: web.Request) -> web.Response:
            body = await request.json()
            return web.json_response(await admin.local_replay(body.get("ids"), str(body.get("who", ""))))

        async def act(request: web.Request) -> web.Response:
            try:
                return web.json_response(await admin.local_call(request.match_info["action"], await request.json()))
            except ValueError as exc:
                return web.json_response({"error": "invalid", "reason": str(exc)}, status=400)

        async def status(request: web.Request) -> web.Response:
            return web.json_response(await admin.local_status())

        async def metrics(request: web.Request) -> web.Response:
            render = admin.own_metrics
            return web.Response(body=render() if render is not None else b"", content_type="text/plain")

        async def event_status(request: web.Request) -> web.Response:
            return web.json_response(lookup_to_json(await self.status.lookup(request.query.get("id", ""))))

        app = web.Application()
        app.router.add_get("/event-status", event_status)
        app.router.add_get("/dead-letters", dead_letters)
        app.router.add_post("/replay", replay)
        app.router.add_post("/act/{action}", act)
        app.router.add_get("/status", status)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        path = admin.slot.socket(admin.slot.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # the socket of the worker this one replaces
        site = web.UnixSite(runner, str(path))
        await site.start()
        os.chmod(path, 0o600)
        try:
            await asyncio.Future()
        finally:
            await runner.cleanup()


class WorkerDaemon(Daemon):
    """The daemon of one worker: its listeners serve the whole daemon's admin and metrics (``FleetAdmin``),
    it serves its own part to its siblings (``PeerServer``), and the pid file is the supervisor's."""

    def __init__(self, config: Config, slot: Slot) -> None:
        super().__init__(config)
        self.slot = slot
        # Daemon builds its units with its own admin and metrics endpoint: swap both, in the listeners
        # built already and for those a reload builds (from these attributes).
        local, endpoint, own_status = self._admin, self.metrics_endpoint, self.status_reader
        self.fleet = FleetAdmin(self, slot)
        self._admin = self.fleet
        self.fleet_status = FleetStatus(own_status, self.fleet.peers)
        self.status_reader = self.fleet_status  # listeners a reload builds read it (their inbounds wait locally)
        if endpoint is not None:
            self.fleet.own_metrics = endpoint.render
            self.metrics_endpoint = dataclasses.replace(endpoint, render=self.fleet.render_metrics)
        for service in self.services:
            if getattr(service, "admin", None) is local:
                service.admin = self.fleet  # type: ignore[attr-defined]
            if getattr(service, "status", None) is own_status:
                service.status = self.fleet_status  # type: ignore[attr-defined]
            if endpoint is not None and getattr(service, "metrics", None) is endpoint:
                service.metrics = self.metrics_endpoint  # type: ignore[attr-defined]

    async def run(self) -> None:
        log.info("worker.starting", worker=self.slot.index, workers=self.slot.count, outbox=self.config.outbox.path)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(PeerServer(self.fleet, self.fleet_status.local).run(), name="worker:peers")]
            if self.fleet.own_metrics is not None:
                tasks.append(tg.create_task(self.fleet.refresh_metrics(), name="worker:peer-metrics"))
            try:
                await super().run()
            finally:
                for task in tasks:
                    task.cancel()

    def _write_pid(self) -> None:
        pass  # the supervisor writes it: `mediator reload` signals the supervisor, which forwards
        # (the worker holds the supervisor's lock through the descriptor it inherited: mediator/lock.py)

    def _reload_status_path(self) -> Path:
        # The supervisor reads it and writes the whole daemon's outcome beside the outbox (Supervisor.reload).
        return self.slot.reload_status(self.slot.index)

    def _remove_pid(self) -> None:
        pass
