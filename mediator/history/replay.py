"""Replays: stored events sent again through the outbox, as a durable, rate-limited, cancellable job.

A replay reads the store oldest first (received, seq), so the events of one source go out in the order
they came in. Each event is copied with the extension attribute ``replayed`` = the replay's id (the
original ``id`` kept, so a consumer can deduplicate), and committed as new deliveries: to one destination
(``to = "OUTBOUND[:ADDRESS]"``, the address a template like a route's) or through today's routes
(``route = NAME``, or ``"*"`` for every route). The copies are not deduplicated (the dedup window would
swallow every one of them) and not stored again.

Durable: the job and its cursor live in the outbox's database (table ``replays``), and each chunk's
deliveries and the cursor past them are written in ONE transaction (``commit_with``), so after a crash
(``kill -9``) the job resumes from its cursor: no event is skipped, and none is sent twice beyond what
the outbox's own at-least-once allows. With an in-memory outbox the jobs are in memory, and end with it.

Rate: at most ``rate`` events a second (default 1,000), in chunks of a tenth of a second's worth, and
while the outbox holds more than half of ``max_pending`` undelivered the job waits: a replay never
starves live traffic of the outbox's room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog

from mediator.core.envelope import Envelope
from mediator.core.patterns import Template, TemplateError
from mediator.core.router import Delivery, Router, Unroutable
from mediator.core.seams import OutboundConfigBase
from mediator.history.base import EventQuery, EventStore, QueryError, iso, query_of
from mediator.outbox.base import Accepted, Pending, StorageError

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS replays (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,  -- the request, as JSON
    state TEXT NOT NULL,  -- running, done, cancelled, failed
    cursor_received REAL,
    cursor_seq INTEGER,
    done INTEGER NOT NULL,
    total INTEGER NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    error TEXT
);
"""
MARKER = "replayed"
"""The extension attribute a replayed copy carries: the replay's id."""
DEFAULT_RATE = 1000.0
CANCEL_WAIT_S = 5.0
"""A cancel waits this long for the chunk being committed, then cancels the job outright."""
KEPT = 100
"""Finished replays listed at most (the oldest finished ones are forgotten first)."""


class ReplayError(ValueError):
    """A replay request that cannot run (an unknown outbound or route, a bad filter): the caller's 400."""


@dataclass(frozen=True, slots=True)
class ReplaySpec:
    filter: dict[str, str]  # type, source, subject, since, until, where (as GET /admin/events takes them)
    to: str | None = None  # OUTBOUND[:ADDRESS]
    route: str | None = None  # a route's name, or "*"
    rate: float = DEFAULT_RATE
    dry_run: bool = False


@dataclass(slots=True)
class Job:
    id: str
    spec: ReplaySpec
    state: str = "running"
    cursor: tuple[float, int] | None = None
    done: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    started_mono: float = field(default_factory=time.monotonic)
    ended_mono: float | None = None
    done_at_start: int = 0
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # cancel: ends the job between two chunks

    def end(self, state: str, error: str | None = None) -> None:
        self.state, self.error = state, error
        self.finished, self.ended_mono = time.time(), time.monotonic()

    def document(self) -> dict[str, object]:
        """``rate``: events a second since this process (re)started the job."""
        elapsed = (self.ended_mono or time.monotonic()) - self.started_mono
        rate = (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        return {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "rate": round(rate, 1),
            "rate_limit": self.spec.rate,
            "filter": self.spec.filter,
            "to": self.spec.to,
            "route": self.spec.route,
            "dry_run": self.spec.dry_run,
            "created": iso(self.created),
            "finished": iso(self.finished) if self.finished is not None else None,
            "error": self.error,
        }


def spec_of(body: Mapping[str, Any]) -> ReplaySpec:
    """A ``ReplaySpec`` from ``POST /admin/replays``'s JSON body; raises ReplayError."""
    if not isinstance(body, Mapping):
        raise ReplayError("the body must be a JSON object")
    known = {"type", "source", "subject", "since", "until", "where", "to", "route", "rate", "dry_run"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ReplayError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    to, route = body.get("to"), body.get("route")
    if (to is None) == (route is None):
        raise ReplayError("name exactly one of to (OUTBOUND[:ADDRESS]) and route (a route's name, or '*')")
    if not body.get("since"):
        raise ReplayError("since is required (an RFC 3339 time, Unix seconds or a duration ago: '1h')")
    rate = body.get("rate", DEFAULT_RATE)
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 < rate <= 1_000_000:
        raise ReplayError("rate must be a number of events a second, above 0 and at most 1000000")
    filt = {}
    for k in ("type", "source", "subject", "since", "until", "where"):
        v = body.get(k)
        if v is not None:
            if not isinstance(v, str):
                raise ReplayError(f"{k} must be a string")
            filt[k] = v
    for name, value in (("to", to), ("route", route)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ReplayError(f"{name} must be a non-empty string")
    return ReplaySpec(filt, to, route, float(rate), bool(body.get("dry_run", False)))


class CommitWith(Protocol):
    async def commit_with(self, items: list[Accepted], also: Callable[[Any], None]) -> list[Pending]: ...


class Replays:
    """The replay jobs of this daemon (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        outbox: CommitWith,
        *,
        durable: Any = None,  # the SqliteOutbox whose database keeps the jobs (None: in memory)
        router: Callable[[], Router],
        outbounds: Callable[[], Mapping[str, OutboundConfigBase]],
        routes: Callable[[], list[str]],
        room: Callable[[], bool],
        max_examined: int = 5000,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._durable = durable
        self._router = router
        self._outbounds = outbounds
        self._routes = routes
        self._room = room
        self._max_examined = max_examined
        self.jobs: dict[str, Job] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._resume: list[Job] = []

    async def open(self) -> None:
        if self._durable is None:
            return
        rows = await self._durable.transact(_load)
        for jid, spec, state, c_rec, c_seq, done, total, created, finished, error in rows:
            job = Job(jid, ReplaySpec(**json.loads(spec)), state, None, done, total, created, finished, error)
            if c_rec is not None:
                job.cursor = (c_rec, c_seq)
            job.done_at_start = done
            self.jobs[jid] = job
            if state == "running":
                self._resume.append(job)
        if self._resume:
            log.info("replay.resuming", replays=[j.id for j in self._resume])

    async def run(self) -> None:
        """The jobs' tasks, until cancelled; resumes the jobs an earlier run left running."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for job in self._resume:
                    self._spawn(job)
                self._resume = []
                await asyncio.Event().wait()
        finally:
            self._tg = None

    def _spawn(self, job: Job) -> None:
        assert self._tg is not None
        job.started_mono = time.monotonic()
        job.done_at_start = job.done
        job.task = self._tg.create_task(self._run_job(job), name=f"replay:{job.id}")

    def _query(self, spec: ReplaySpec, cursor: tuple[float, int] | None, limit: int) -> EventQuery:
        try:
            q = query_of({**spec.filter, "order": "oldest", "limit": str(limit)}, time.time(), self._max_examined)
        except QueryError as exc:
            raise ReplayError(str(exc)) from None
        return EventQuery(
            q.type, q.source, q.subject, q.since, q.until, "oldest", limit, cursor, q.where, q.max_examined
        )

    def _check(self, spec: ReplaySpec) -> None:
        if spec.to is not None:
            name, _, address = spec.to.partition(":")
            if name not in self._outbounds():
                raise ReplayError(
                    f"no outbound {name!r}; the config has {', '.join(sorted(self._outbounds())) or 'none'}"
                )
            try:
                Template.compile(address)
            except (TemplateError, ValueError) as exc:
                raise ReplayError(f"address {address!r}: {exc}") from None
        elif spec.route != "*" and spec.route not in self._routes():
            raise ReplayError(f"no route {spec.route!r}; the config has {', '.join(self._routes()) or 'none'}")

    async def start(self, spec: ReplaySpec) -> dict[str, object]:
        """Validate, count, persist and start a replay (a dry run only counts); returns its document.
        Raises ReplayError, StorageError."""
        self._check(spec)
        # Fixed at the start: "since 1h" means the hour before the request, however long the replay runs.
        now = time.time()
        q = self._query(spec, None, 1)
        fixed = dict(spec.filter)
        fixed["since"] = iso(q.since) if q.since is not None else fixed.get("since", "")
        fixed["until"] = iso(q.until if q.until is not None else now)
        spec = ReplaySpec(fixed, spec.to, spec.route, spec.rate, spec.dry_run)
        total = await self._store.count(self._query(spec, None, 1))
        job = Job("r" + secrets.token_hex(6), spec, total=total)
        if spec.dry_run:
            job.end("done")
            log.info("replay.counted", replay=job.id, total=total)
            return job.document()
        if self._tg is None:
            raise StorageError("the daemon is not running its replays")
        await self._persist(job)
        self.jobs[job.id] = job
        self._forget_old()
        self._spawn(job)
        log.info("replay.started", replay=job.id, total=total, to=spec.to, route=spec.route, rate=spec.rate)
        return job.document()

    def _forget_old(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.state != "running"), key=lambda j: j.created)
        for job in finished[: max(0, len(finished) - KEPT)]:
            del self.jobs[job.id]

    async def cancel(self, job_id: str) -> dict[str, object] | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.state == "running":
            # Between two chunks, so that ``done`` is exactly what was committed; a chunk waiting for room
            # in the outbox is cancelled outright.
            job.stop.set()
            if job.task is not None:
                try:
                    async with asyncio.timeout(CANCEL_WAIT_S):
                        await asyncio.shield(job.task)
                except TimeoutError:
                    job.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await job.task
            job.end("cancelled")
            await self._persist(job)
            log.info("replay.cancelled", replay=job.id, done=job.done, total=job.total)
        return job.document()

    def documents(self) -> list[dict[str, object]]:
        return [j.document() for j in sorted(self.jobs.values(), key=lambda j: j.created)]

    def get(self, job_id: str) -> dict[str, object] | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.document()

    async def _persist(self, job: Job) -> None:
        if self._durable is not None:
            row = _row(job)
            await self._durable.transact(lambda conn: _save(conn, row))

    async def _run_job(self, job: Job) -> None:
        spec = job.spec
        chunk = max(1, min(500, int(spec.rate / 10)))
        paced_from, paced = time.monotonic(), 0
        try:
            while not job.stop.is_set():
                await self._wait_for_room()
                page = await self._store.query(self._query(spec, job.cursor, chunk))
                items = [i for e in page.events if (i := self._item(job, e.event)) is not None]
                cursor, done = page.next, job.done + len(page.events)
                if cursor is None:
                    cursor = (page.events[-1].received, page.events[-1].seq) if page.events else job.cursor
                row = _row(job, cursor=cursor, done=done, state="running" if page.next is not None else "done")
                await self._outbox.commit_with(items, _saver(row))
                job.cursor, job.done = cursor, done
                if page.next is None:
                    break
                paced += len(page.events)
                wait = paced_from + paced / spec.rate - time.monotonic()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await job.stop.wait()
                elif wait < -1.0:  # far behind (the outbox was full): no burst to catch up
                    paced_from, paced = time.monotonic(), 0
            if job.stop.is_set():
                return  # cancelled: ``cancel`` records it
            job.end("done")
            await self._persist(job)
            log.info("replay.finished", replay=job.id, done=job.done, total=job.total)
        except asyncio.CancelledError:
            raise
        except (StorageError, ReplayError) as exc:
            job.end("failed", str(exc))
            log.error("replay.failed", replay=job.id, error=str(exc), done=job.done)
            with contextlib.suppress(StorageError):
                await self._persist(job)

    async def _wait_for_room(self) -> None:
        """While the outbox is half full, live traffic goes first: looked at every 0.1 s (a poll: the
        backlog has no event to wait on, and a replay may lag that much)."""
        if self._room():
            return
        while True:
            await asyncio.sleep(0.1)
            if self._room():
                return

    def _item(self, job: Job, original: Envelope) -> Accepted | None:
        event = Envelope()
        event.CopyFrom(original)
        event.attributes[MARKER].ce_string = job.id
        spec = job.spec
        rid = f"replay:{job.id}"
        if spec.to is not None:
            name, _, address = spec.to.partition(":")
            cfg = self._outbounds().get(name)
            fmt = str(getattr(cfg, "format", None) or "binary")
            try:
                rendered = Template.compile(address).render(event)
            except TemplateError as exc:
                return Accepted(event, (), [Unroutable(rid, name, f"unroutable: {exc}")], stored=False)
            return Accepted(event, [Delivery(rid, name, rendered, fmt)], stored=False)
        deliveries, failures = self._router().route(event)
        if spec.route != "*":
            deliveries = [d for d in deliveries if d.route == spec.route]
            failures = [f for f in failures if f.route == spec.route]
        if not deliveries and not failures:
            return None  # today's route no longer takes it: nothing to send
        return Accepted(event, deliveries, failures, stored=False)


def _row(
    job: Job, *, cursor: tuple[float, int] | None = None, done: int | None = None, state: str | None = None
) -> tuple[Any, ...]:
    c = cursor if cursor is not None else job.cursor
    return (
        job.id,
        json.dumps(asdict(job.spec)),
        state or job.state,
        c[0] if c is not None else None,
        c[1] if c is not None else None,
        job.done if done is None else done,
        job.total,
        job.created,
        job.finished,
        job.error,
    )


def _saver(row: tuple[Any, ...]) -> Callable[[sqlite3.Connection | None], None]:
    """The cursor's write for ``commit_with`` (given None by an in-memory outbox: nothing to write)."""

    def save(conn: sqlite3.Connection | None) -> None:
        if conn is not None:
            _save(conn, row)

    return save


def _save(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    conn.execute("INSERT OR REPLACE INTO replays VALUES (?,?,?,?,?,?,?,?,?,?)", row)


def _load(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    conn.execute(SCHEMA)
    return conn.execute(
        "SELECT id, spec, state, cursor_received, cursor_seq, done, total, created, finished, error FROM replays"
        " ORDER BY created"
    ).fetchall()
