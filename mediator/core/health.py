"""Readiness of every component, for /readyz, gRPC health and the dispatchers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(slots=True)
class ComponentState:
    ready: bool
    detail: str


class Health:
    """Components register when built (not ready) and report as they connect and disconnect.

    Must be used from the event loop thread only.
    """

    def __init__(self) -> None:
        self._states: dict[str, ComponentState] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._connects: dict[str, int] = {}  # times each component became ready (its reconnects, for metrics)
        self.draining = False

    def register(self, component: str) -> None:
        self._states.setdefault(component, ComponentState(False, "starting"))

    def unregister(self, component: str) -> None:
        """Forget a component a reload removed, so readiness no longer waits for it."""
        self._states.pop(component, None)

    def set(self, component: str, ready: bool, detail: str = "") -> None:
        if ready:
            previous = self._states.get(component)
            if previous is None or not previous.ready:
                self._connects[component] = self._connects.get(component, 0) + 1
        self._states[component] = ComponentState(ready, detail)
        event = self._events.get(component)
        if event is not None:
            if ready:
                event.set()
            else:
                event.clear()

    def is_ready(self, component: str) -> bool:
        state = self._states.get(component)
        return state is not None and state.ready

    async def wait_ready(self, component: str) -> None:
        """Return once ``component`` reports ready (at once if it already is, or was never registered)."""
        if component not in self._states or self._states[component].ready:
            return
        event = self._events.setdefault(component, asyncio.Event())
        await event.wait()

    def connects(self, component: str) -> int:
        """How many times ``component`` became ready (so it reconnected that many times less one)."""
        return self._connects.get(component, 0)

    @property
    def ready(self) -> bool:
        return not self.draining and all(s.ready for s in self._states.values())

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {name: {"ready": s.ready, "detail": s.detail} for name, s in sorted(self._states.items())}
