"""Readiness of every component, for /readyz and the logs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ComponentState:
    ready: bool
    detail: str


class Health:
    """Components register when built (not ready) and report as they connect and disconnect."""

    def __init__(self) -> None:
        self._states: dict[str, ComponentState] = {}
        self.draining = False

    def register(self, component: str) -> None:
        self._states.setdefault(component, ComponentState(False, "starting"))

    def set(self, component: str, ready: bool, detail: str = "") -> None:
        self._states[component] = ComponentState(ready, detail)

    @property
    def ready(self) -> bool:
        return not self.draining and all(s.ready for s in self._states.values())

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {name: {"ready": s.ready, "detail": s.detail} for name, s in sorted(self._states.items())}
