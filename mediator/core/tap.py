"""The live tail: events as they pass the pipeline, for whoever watches (the dashboard's Live tail page,
``GET /admin/tail``).

The pipeline offers every committed batch to the ``Tap`` only while someone watches: ``active`` is a plain
attribute the pipeline reads once per batch, so with no watcher the tail costs one attribute read per batch
and nothing else (no copy, no JSON, no filter). A watcher has a bounded queue; one that falls behind loses
the events that do not fit (counted, and told in the next event it gets as ``dropped``), so a slow browser
never slows the pipeline nor holds memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mediator.core.envelope import Envelope
from mediator.core.patterns import compile_glob
from mediator.core.predicate import Predicate, PredicateError
from mediator.core.router import variables_for

WATCHER_QUEUE = 256
"""Events a watcher may have waiting before later ones are dropped for it."""
MAX_WATCHERS = 16
"""Watchers at once (each costs a filter per event while active)."""


@dataclass(frozen=True, slots=True)
class TailFilter:
    """What a watcher wants: globs on type and source, a route name, a CEL expression (as a route's
    ``when``); empty means any. ``compile`` raises ValueError naming a bad CEL expression."""

    type: str = ""
    source: str = ""
    route: str = ""
    when: str = ""

    def compile(self) -> _Compiled:
        return _Compiled(
            compile_glob(self.type) if self.type else None,
            compile_glob(self.source) if self.source else None,
            self.route or None,
            Predicate.compile(self.when) if self.when else None,
        )


@dataclass(frozen=True, slots=True)
class _Compiled:
    type: Callable[[str], bool] | None
    source: Callable[[str], bool] | None
    route: str | None
    when: Predicate | None

    def matches(self, env: Envelope, routes: Sequence[str]) -> bool:
        if self.type is not None and not self.type(env.type):
            return False
        if self.source is not None and not self.source(env.source):
            return False
        if self.route is not None and self.route not in routes:
            return False
        if self.when is not None:
            try:
                return self.when.evaluate(variables_for(env, self.when))
            except PredicateError:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Passed:
    """One event the tail saw: the envelope as committed, the routes it matched (empty: dead-lettered at
    ingress, with ``dead_reason``), whether the dedup window dropped it, and how many events this
    watcher lost before it."""

    event: Envelope
    routes: tuple[str, ...]
    outbounds: tuple[str, ...]
    duplicate: bool = False
    dead_reason: str | None = None
    dropped: int = 0


@dataclass(eq=False, slots=True)
class Watcher:
    filter: _Compiled
    queue: asyncio.Queue[Passed] = field(default_factory=lambda: asyncio.Queue(WATCHER_QUEUE))
    dropped: int = 0

    async def next(self, timeout_s: float) -> list[Passed]:
        """Every event waiting, at least one, or [] after ``timeout_s``: a watcher writes what piled up at
        once (one write per wake-up, not per event)."""
        queue = self.queue
        if queue.empty():
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
                # arrives as the item does, and a stream must stop when the listener stops.
                async with asyncio.timeout(timeout_s):
                    first = await queue.get()
            except TimeoutError:
                return []
        else:
            first = queue.get_nowait()
        out = [first]
        while not queue.empty():
            out.append(queue.get_nowait())
        return out


class TooManyWatchers(Exception):
    """MAX_WATCHERS watch already."""


class Tap:
    def __init__(self) -> None:
        self.active = False  # read by the pipeline once per batch: True only while someone watches
        self._watchers: tuple[Watcher, ...] = ()

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def watch(self, wanted: TailFilter) -> Watcher:
        """A new watcher of every event from now on that ``wanted`` matches; ``close`` it when done.
        Raises ValueError (a bad CEL expression) or TooManyWatchers."""
        if len(self._watchers) >= MAX_WATCHERS:
            raise TooManyWatchers(f"{MAX_WATCHERS} live tails are open already")
        watcher = Watcher(wanted.compile())
        self._watchers = (*self._watchers, watcher)
        self.active = True
        return watcher

    def close(self, watcher: Watcher) -> None:
        self._watchers = tuple(w for w in self._watchers if w is not watcher)
        self.active = bool(self._watchers)

    def offer(self, passed: Sequence[Passed]) -> None:
        """Hand each event to every watcher whose filter matches, without waiting."""
        for watcher in self._watchers:
            for p in passed:
                if not watcher.filter.matches(p.event, p.routes):
                    continue
                if watcher.queue.full():
                    watcher.dropped += 1
                    continue
                if watcher.dropped:
                    p = Passed(p.event, p.routes, p.outbounds, p.duplicate, p.dead_reason, watcher.dropped)
                    watcher.dropped = 0
                watcher.queue.put_nowait(p)
