"""Aggregation: several events combined into one composite event.

One ``[[aggregate]]`` table names the events it takes (``types``, ``inbounds``; an event is taken by the
first aggregation that matches), a correlation key (a key template, ``{data.orderId}``), and when a
group is complete: ``count`` members, ``timeout_s`` without a new member, or ``interval_s`` after its
first member, whichever comes first (``max_members`` bounds a group without a count).

The ``Aggregator`` is the last ingress stage: it takes its members out of the batch (they are not routed
themselves) and stores them durably (``aggstore.py``) before the pipeline goes on, so a member whose
sender was acknowledged survives a crash. It is also a service the daemon runs: a completed group
becomes one composite, handed to the pipeline with a trusted ``Origin`` (``protocol = "aggregate"``), so
the ingress stages (authentication, limits, this one) are skipped and the composite is routed (by its
type) and committed like any event; then the group is deleted. A crash between the two produces the
composite again with the same id, which the outbox's deduplication window drops (at-least-once).

The composite: ``id`` = the group's uid (stored with the group), ``type`` and ``source`` from templates
over the first member, ``time`` = when its last member arrived, ``datacontenttype = application/json``,
data = the JSON array of the members' data (``data = "events"``: of the members as CloudEvents JSON
objects), and the extension attributes ``aggregatedids`` (the members' ids in arrival order, comma
separated; a ``%`` or ``,`` inside an id is written ``%25`` / ``%2C``), ``aggregatecount`` and
``aggregatekey``.

A member repeated by its sender (same source and id, within ``dedup_window_s``) is acknowledged and not
counted twice. A member for a key whose group completed within ``late_window_s`` follows ``late``:
``new_group`` (it opens the next group for the key) or ``dead_letter``. An event whose key cannot be
rendered is dead-lettered. On start, the stored groups are loaded and their timers re-armed; a group
already due completes at once; a group of an aggregation no longer configured is dead-lettered member
by member.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
import structlog
from pydantic import Field, field_validator, model_validator

from mediator.core.content import NOT_JSON, parsed
from mediator.core.envelope import Envelope, new_id
from mediator.core.errors import NotReady, Overloaded, Rejected
from mediator.core.formats import to_json_dict
from mediator.core.ingress import Batch, Origin
from mediator.core.patterns import TemplateError, any_of, compile_glob
from mediator.core.seams import ConfigModel
from mediator.stages.aggstore import AggregateStore, StoredGroup, StoredMember
from mediator.stages.config import named_problems
from mediator.stages.keys import KeyTemplate

log = structlog.get_logger(__name__)

PROTOCOL = "aggregate"
RETRY_MAX_S = 5.0
PRUNE_EVERY_S = 10.0


class AggregateConfig(ConfigModel):
    """One ``[[aggregate]]`` table."""

    name: str = Field(min_length=1)
    types: list[str] = Field(default_factory=list, description="member event types (globs); empty: every type")
    inbounds: list[str] = Field(default_factory=list, description="inbound names; empty: every inbound")
    key: str = Field(description="correlation key template, e.g. '{data.orderId}'")
    count: int | None = Field(default=None, ge=1, description="complete at this many members")
    timeout_s: float | None = Field(default=None, gt=0, description="complete after this long without a member")
    interval_s: float | None = Field(default=None, gt=0, description="complete this long after the first member")
    max_members: int = Field(default=1000, ge=1, description="a group without a count completes at this many")
    max_groups: int = Field(default=100_000, ge=1, description="open groups at most (more: 503, redelivery)")
    type: str = Field(description="the composite's type (template over the first member)")
    source: str = Field(description="the composite's source (template over the first member)")
    data: Literal["data", "events"] = Field(default="data", description="array of the members' data, or events")
    late: Literal["new_group", "dead_letter"] = "new_group"
    late_window_s: float = Field(default=300.0, ge=0, description="how long a completed key counts as closed")
    dedup_window_s: float = Field(default=300.0, ge=0, description="a member repeated within it counts once")

    @field_validator("key", "type", "source")
    @classmethod
    def _template(cls, value: str) -> str:
        KeyTemplate.compile(value)
        return value

    @model_validator(mode="after")
    def _completion(self) -> AggregateConfig:
        if self.count is None and self.timeout_s is None and self.interval_s is None:
            raise ValueError("say when a group is complete: count, timeout_s and/or interval_s")
        if self.count is not None and self.count > self.max_members:
            raise ValueError(f"count ({self.count}) is over max_members ({self.max_members})")
        return self


def problems(configs: list[AggregateConfig], inbound_names: set[str]) -> list[str]:
    return named_problems("aggregate", configs, inbound_names)


class Sink(Protocol):
    async def accept(self, events: Sequence[Envelope], origin: Origin | None = None) -> object: ...

    async def dead_letter(self, event: Envelope, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Spec:
    cfg: AggregateConfig
    key: KeyTemplate
    type: KeyTemplate
    source: KeyTemplate
    types: tuple[Any, ...]
    inbounds: frozenset[str]

    @classmethod
    def of(cls, cfg: AggregateConfig) -> _Spec:
        return cls(
            cfg,
            KeyTemplate.compile(cfg.key),
            KeyTemplate.compile(cfg.type),
            KeyTemplate.compile(cfg.source),
            tuple(compile_glob(t) for t in cfg.types),
            frozenset(cfg.inbounds),
        )

    @property
    def limit(self) -> int:
        return self.cfg.count or self.cfg.max_members

    def matches(self, env: Envelope, inbound: str) -> bool:
        if self.inbounds and inbound not in self.inbounds:
            return False
        return not self.types or any_of(self.types, env.type)


@dataclass(slots=True, eq=False)
class _Group:
    uid: str
    spec: _Spec
    key: str
    opened: float  # Unix time of the first member
    members: list[StoredMember] = field(default_factory=list)
    reserved: int = 0  # members stored or being stored
    pending: int = 0  # being stored
    due: bool = False  # complete once nothing is pending
    queued: bool = False  # handed to the completion loop
    timer: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.spec.cfg.name


def _escape(event_id: str) -> str:
    return event_id.replace("%", "%25").replace(",", "%2C")


def member_data(env: Envelope, mode: str) -> Any:
    obj = to_json_dict(env)
    if mode == "events":
        return obj
    if "data" in obj:
        return obj["data"]
    return obj.get("data_base64")


def composite(spec: _Spec, uid: str, key: str, members: list[StoredMember]) -> Envelope:
    """The composite event of a complete group (pure: the same group gives the same event)."""
    first = members[0].event
    try:
        first_data = parsed(first)
    except Rejected:
        first_data = NOT_JSON
    env = Envelope(
        id=uid,
        source=spec.source.render(first, first_data),
        spec_version="1.0",
        type=spec.type.render(first, first_data),
        binary_data=orjson.dumps([member_data(m.event, spec.cfg.data) for m in members]),
    )
    env.attributes["datacontenttype"].ce_string = "application/json"
    last = max(m.at for m in members)
    seconds = int(last)
    env.attributes["time"].ce_timestamp.seconds = seconds
    env.attributes["time"].ce_timestamp.nanos = int((last - seconds) * 1e6) * 1000
    env.attributes["aggregatedids"].ce_string = ",".join(_escape(m.event.id) for m in members)
    env.attributes["aggregatecount"].ce_integer = len(members)
    env.attributes["aggregatekey"].ce_string = key
    prov = env.provenance
    prov.inbound = spec.cfg.name
    prov.protocol = PROTOCOL
    prov.topic = first.provenance.topic
    prov.topic_separator = first.provenance.topic_separator
    prov.received.seconds = seconds
    return env


def _member_key(env: Envelope) -> str | None:
    return None if env.provenance.id_minted else f"{env.source}\x00{env.id}"


class Aggregator:
    """The aggregation stage and its completion service (see the module docstring).

    ``open`` loads the stored groups (before the daemon serves), ``run`` completes groups until
    cancelled, ``close`` stops the store. ``configure`` swaps the tables in on a reload: groups of a
    table that is gone are completed with the table they started with.
    """

    name = "aggregate"

    def __init__(self, path: str, configs: list[AggregateConfig]) -> None:
        self._store = AggregateStore(path)
        self._specs: dict[str, _Spec] = {c.name: _Spec.of(c) for c in configs}
        self._open: dict[tuple[str, str], _Group] = {}  # groups taking members, by (aggregation, key)
        self._groups: dict[str, _Group] = {}  # every group not yet deleted, by uid
        self._seen: dict[tuple[str, str], float] = {}  # member keys: 0.0 while in a group, else completed at
        self._closed: dict[tuple[str, str], float] = {}  # completed (aggregation, key): when
        # One entry per group at most (``_Group.queued``), so it is bounded by the open groups.
        self._due: asyncio.Queue[_Group] = asyncio.Queue()
        self._orphans: list[StoredGroup] = []
        self._stage = AggregateStage(self)
        self._store_open = False
        self._store_exists = path != ":memory:" and Path(path).exists()
        self.sink: Sink | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._specs)

    def stages(self) -> tuple[AggregateStage, ...]:
        """The stage to append to the ingress stages (none when no aggregation is configured)."""
        return (self._stage,) if self._specs else ()

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Load the stored groups. Without an aggregation and without a store file, nothing is opened
        (a reload that adds an aggregation opens it then)."""
        if not self._specs and not self._store_exists:
            return
        loaded = await self._store.open()
        self._store_open = True
        now = time.time()
        for name, member_key, at in loaded.seen:
            self._seen[(name, member_key)] = at
        for name, key, at in loaded.closed:
            self._closed[(name, key)] = at
        for stored in loaded.groups:
            spec = self._specs.get(stored.aggregation)
            if spec is None:
                self._orphans.append(stored)
                continue
            group = _Group(stored.uid, spec, stored.key, stored.opened, stored.members, len(stored.members))
            self._groups[group.uid] = group
            for m in group.members:
                if m.member_key is not None:
                    self._seen[(group.name, m.member_key)] = 0.0
            if group.reserved >= spec.limit:
                self._closed[(group.name, group.key)] = now
                self._queue(group)
            else:
                self._open[(group.name, group.key)] = group
                self._arm(group)
        log.info(
            "aggregate.loaded",
            groups=len(self._groups),
            members=sum(len(g.members) for g in self._groups.values()),
            orphaned=len(self._orphans),
        )

    async def run(self) -> None:
        """Complete due groups until cancelled (at most 16 at a time); a group whose composite could not
        be committed (draining, overloaded) is retried with backoff, and stays stored if cancelled."""
        for stored in self._orphans:
            await self._dead_letter_orphan(stored)
        self._orphans.clear()
        limit = asyncio.Semaphore(16)
        last_prune = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    async with asyncio.timeout(PRUNE_EVERY_S):
                        group = await self._due.get()
                except TimeoutError:
                    group = None
                if time.monotonic() - last_prune > PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    await self._prune()
                if group is None:
                    continue
                await limit.acquire()
                task = tg.create_task(self._complete(group), name=f"aggregate:{group.name}")
                task.add_done_callback(lambda _t: limit.release())

    async def close(self) -> None:
        for group in self._groups.values():
            if group.timer is not None:
                group.timer.cancel()
        await self._store.close()

    async def configure(self, configs: list[AggregateConfig]) -> None:
        specs = {c.name: _Spec.of(c) for c in configs}
        if specs and not self._store_open:
            self._specs = specs
            await self.open()
            return
        self._specs = specs
        for group in list(self._groups.values()):
            new = specs.get(group.name)
            if new is None:
                self._close_group(group)
                self._queue(group)
                continue
            group.spec = new
            if group.reserved >= new.limit:
                self._close_group(group)
                if not group.pending:
                    self._queue(group)
            elif not group.queued and not group.due:
                self._arm(group)

    # ------------------------------------------------------------------ the stage

    async def run_stage(self, batch: Batch) -> None:
        """The ingress stage: take the members out of the batch and store them (see the module docstring)."""
        specs = self._specs
        inbound = batch.origin.inbound
        now = time.time()
        taken: dict[int, tuple[_Group, StoredMember]] = {}
        dead: dict[int, str] = {}
        repeats: set[int] = set()
        new_groups: list[_Group] = []
        for i, env in enumerate(batch.events):
            spec = next((s for s in specs.values() if s.matches(env, env.provenance.inbound or inbound)), None)
            if spec is None:
                continue
            name = spec.cfg.name
            try:
                key = spec.key.render(env, batch.data.get(env) if spec.key.uses_data else NOT_JSON)
            except TemplateError as exc:
                dead[i] = f"aggregate:{name}: no correlation key: {exc}"
                continue
            mk = _member_key(env)
            if mk is not None:
                at = self._seen.get((name, mk))
                if at is not None and (at == 0.0 or now - at < spec.cfg.dedup_window_s):
                    repeats.add(i)  # the sender repeated it (its ack was lost): acknowledged, counted once
                    continue
            group = self._open.get((name, key))
            if group is None:
                closed_at = self._closed.get((name, key))
                if (
                    closed_at is not None
                    and now - closed_at < spec.cfg.late_window_s
                    and spec.cfg.late == "dead_letter"
                ):
                    dead[i] = f"aggregate:{name}: late member for the completed group {key!r}"
                    continue
                if len(self._groups) + len(new_groups) >= spec.cfg.max_groups:
                    self._unreserve(taken, new_groups)
                    raise Overloaded(f"aggregate:{name}: {spec.cfg.max_groups} groups open", retry_after_s=2.0)
                group = _Group(new_id(), spec, key, now)
                self._open[(name, key)] = group
                new_groups.append(group)
            group.reserved += 1
            group.pending += 1
            if group.reserved >= spec.limit:
                self._close_group(group, now)
            taken[i] = (group, StoredMember(group.reserved - 1, mk, env, now))
            if mk is not None:
                self._seen[(name, mk)] = 0.0
        if not taken and not dead and not repeats:
            return
        for g in new_groups:
            self._groups[g.uid] = g
        if taken:
            rows = [(g.uid, g.name, g.key, g.opened) for g in {g for g, _ in taken.values()}]
            stored = asyncio.ensure_future(
                self._store.call(self._store.add(rows, [(g.uid, m) for g, m in taken.values()]))
            )
            # The bookkeeping follows the store's outcome even when this caller is cancelled meanwhile
            # (its sender is not acknowledged then, and a repeat is deduplicated).
            stored.add_done_callback(lambda f: self._stored(f, taken, new_groups))
            try:
                await asyncio.shield(stored)
            except NotReady:
                raise
            except Exception as exc:
                raise NotReady(str(exc), retry_after_s=5.0) from exc
        batch.dead_letters.extend((batch.events[i], reason) for i, reason in dead.items())
        drop = taken.keys() | dead.keys() | repeats
        aligned = len(batch.principals) == len(batch.events)
        if aligned:
            batch.principals = [p for i, p in enumerate(batch.principals) if i not in drop]
        batch.events = [e for i, e in enumerate(batch.events) if i not in drop]
        log.debug("aggregate.stored", members=len(taken), dead=len(dead) or None, repeats=len(repeats) or None)

    def _stored(
        self, future: asyncio.Future[Any], taken: dict[int, tuple[_Group, StoredMember]], new_groups: list[_Group]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            self._unreserve(taken, new_groups)
            return
        for group, member in taken.values():
            group.members.append(member)
            group.pending -= 1
        for group in {g for g, _ in taken.values()}:
            self._settle(group)

    def _unreserve(self, taken: dict[int, tuple[_Group, StoredMember]], new_groups: list[_Group]) -> None:
        for group, member in taken.values():
            group.reserved -= 1
            group.pending -= 1
            if member.member_key is not None:
                self._seen.pop((group.name, member.member_key), None)
        for group in new_groups:
            if not group.members and not group.pending:
                self._groups.pop(group.uid, None)
                if self._open.get((group.name, group.key)) is group:
                    del self._open[(group.name, group.key)]
                self._closed.pop((group.name, group.key), None)
        for group in {g for g, _ in taken.values()}:
            if group.members:
                self._settle(group)

    def _close_group(self, group: _Group, now: float | None = None) -> None:
        """No more members for this group; the next one for its key is late."""
        if self._open.get((group.name, group.key)) is group:
            del self._open[(group.name, group.key)]
            self._closed[(group.name, group.key)] = time.time() if now is None else now
        group.due = True
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None

    def _settle(self, group: _Group) -> None:
        if group.pending:
            return
        if group.due:
            self._queue(group)
        else:
            self._arm(group)

    def _deadline(self, group: _Group) -> float | None:
        cfg = group.spec.cfg
        times = []
        if cfg.timeout_s is not None:
            last = max((m.at for m in group.members), default=group.opened)
            times.append(last + cfg.timeout_s)
        if cfg.interval_s is not None:
            times.append(group.opened + cfg.interval_s)
        return min(times) if times else None

    def _arm(self, group: _Group) -> None:
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        deadline = self._deadline(group)
        if deadline is None:
            return
        delay = max(0.0, deadline - time.time())
        group.timer = asyncio.get_running_loop().call_later(delay, self._expire, group)

    def _expire(self, group: _Group) -> None:
        group.timer = None
        self._close_group(group)
        if not group.pending:
            self._queue(group)

    def _queue(self, group: _Group) -> None:
        if group.queued or not group.members:
            return
        group.queued = True
        group.due = True
        self._due.put_nowait(group)

    # ------------------------------------------------------------------ completion

    async def _complete(self, group: _Group) -> None:
        assert self.sink is not None
        spec, members = group.spec, list(group.members)
        origin = Origin(inbound=spec.cfg.name, protocol=PROTOCOL, trusted=True)
        delay = 0.1
        try:
            event: Envelope | None = composite(spec, group.uid, group.key, members)
        except TemplateError as exc:
            event = None
            reason = f"aggregate:{group.name}: cannot make the composite: {exc}"
        while True:
            try:
                if event is not None:
                    await self.sink.accept([event], origin)
                else:
                    for m in members:
                        await self.sink.dead_letter(m.event, reason)
                break
            except Exception as exc:  # NotReady (draining, overloaded, storage), or a bug: never lose the group
                reason_now = exc.reason if isinstance(exc, NotReady) else repr(exc)
                log.warning("aggregate.complete_retried", aggregation=group.name, key=group.key, reason=reason_now)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        now = time.time()
        keys = [m.member_key for m in members if m.member_key is not None]
        while True:
            try:
                await self._store.call(AggregateStore.complete(group.uid, group.name, group.key, keys, now))
                break
            except NotReady as exc:  # StorageError is not NotReady: see below
                log.error("aggregate.delete_failed", aggregation=group.name, reason=exc.reason)
                await asyncio.sleep(RETRY_MAX_S)
            except Exception as exc:
                # The composite is committed; the group stays stored and is produced again (same id, which
                # the outbox's window drops) on the next start.
                log.error("aggregate.delete_failed", aggregation=group.name, error=str(exc))
                return
        self._groups.pop(group.uid, None)
        for k in keys:
            self._seen[(group.name, k)] = now
        log.info(
            "aggregate.completed",
            aggregation=group.name,
            key=group.key,
            event_id=group.uid,
            members=len(members),
            dead_lettered=event is None or None,
        )

    async def _dead_letter_orphan(self, stored: StoredGroup) -> None:
        assert self.sink is not None
        reason = f"aggregate:{stored.aggregation}: the aggregation is no longer configured"
        while True:
            try:
                for m in stored.members:
                    await self.sink.dead_letter(m.event, reason)
                break
            except Exception as exc:  # the outbox cannot commit now: the members stay stored meanwhile
                log.warning("aggregate.dead_letter_retried", aggregation=stored.aggregation, error=repr(exc))
                await asyncio.sleep(1.0)
        with contextlib.suppress(Exception):
            await self._store.call(AggregateStore.complete(stored.uid, stored.aggregation, stored.key, [], time.time()))

    async def _prune(self) -> None:
        now = time.time()
        windows = {name: s.cfg.dedup_window_s for name, s in self._specs.items()}
        late = {name: s.cfg.late_window_s for name, s in self._specs.items()}
        default = 300.0
        self._seen = {k: at for k, at in self._seen.items() if at == 0.0 or now - at < windows.get(k[0], default)}
        self._closed = {k: at for k, at in self._closed.items() if now - at < late.get(k[0], default)}
        seen_before = {name: now - w for name, w in windows.items()}
        closed_before = {name: now - w for name, w in late.items()}
        with contextlib.suppress(Exception):
            await self._store.call(AggregateStore.prune(seen_before, closed_before))


class AggregateStage:
    """The ``Stage`` face of an ``Aggregator`` (its own ``run`` is the completion service)."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.name = "aggregate"
        self.aggregator = aggregator

    async def run(self, batch: Batch) -> None:
        await self.aggregator.run_stage(batch)
