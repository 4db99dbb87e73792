"""The running adapters as units that a reload starts, stops and restarts one by one.

A *unit* is the smallest piece of the adapters' config that owns its connections:

- ``listener:NAME``: a listener with every inbound and outbound served on it (an HTTP listener and its
  paths; a gRPC listener with its inbound and the Subscribe outbounds its hub feeds);
- ``inbound:NAME`` / ``outbound:NAME``: an inbound or outbound with a broker connection of its own (MQTT,
  AMQP: each holds its own connection) or with none (an HTTP webhook), together with its broker's section;
  also one of another kind that serves paths on a listener (a push outbound, a WebSocket inbound on an HTTP
  listener: it adds itself to the listener's ``Mounts`` while it runs, so either can restart alone).

A unit's identity is its typed config (the pydantic models, compared by value) plus what the daemon lends
to its adapter (the credential headers and admin roles the stages ask for, the outbox's ``max_pending``).
A reload compares the units of the running config with the new one's: what is equal is left running
untouched (its connections, its MQTT session), what differs is stopped and built again, what is new is
built and started, what is gone is stopped. A broker is not a unit of its own: a changed ``[brokers.X]``
changes every unit that uses it, an unused one changes nothing. Building a unit is ``AdapterSpec.build``
on the unit's part of the config, so the adapters need nothing of their own for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mediator.config import Config
from mediator.core.errors import ConfigError
from mediator.core.health import Health
from mediator.core.seams import (
    AdapterConfig,
    AdapterSpec,
    Admin,
    Admission,
    MetricsEndpoint,
    Mounts,
    Outbound,
    Replies,
    Reports,
    Requests,
    Runtime,
    Service,
    Sink,
    StatusReader,
)

SETTLE_INTERVAL_S = 0.5
"""A config file is loaded only once two looks this far apart see the same mtime, size and content."""

SETTLE_TIMEOUT_S = 10.0
"""A file still changing after this long is not loaded (the reload is refused; the next change retries)."""


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """What a unit is built from; two specs that compare equal build the same unit."""

    key: str
    kind: str
    section: AdapterConfig
    credential_headers: frozenset[str]
    admin_roles: frozenset[str]
    max_pending: int | None = None  # [outbox] max_pending, which bounds a broker inbound's window
    outbox_path: str | None = None  # the SQLite outbox file (None: in memory), beside which adapters keep state

    @property
    def components(self) -> list[str]:
        """The health components the unit's adapter registers (``listener:``, ``inbound:``, ``outbound:``)."""
        s = self.section
        return [
            *(f"listener:{n}" for n in s.listeners),
            *(f"inbound:{n}" for n in s.inbounds),
            *(f"outbound:{n}" for n in s.outbounds),
        ]


def plan(config: Config, credential_headers: frozenset[str], admin_roles: frozenset[str]) -> dict[str, UnitSpec]:
    """The units of ``config``, by key."""
    units: dict[str, UnitSpec] = {}

    def add(key: str, kind: str, section: AdapterConfig) -> None:
        outbox_path = config.outbox.path if config.outbox.kind == "sqlite" else None
        units[key] = UnitSpec(
            key, kind, section, credential_headers, admin_roles, config.outbox.max_pending, outbox_path
        )

    for kind, adapter in config.adapters.items():
        for name, listener in adapter.listeners.items():
            inbounds = {n: c for n, c in adapter.inbounds.items() if c.connection() == name}
            outbounds = {n: c for n, c in adapter.outbounds.items() if c.connection() == name}
            add(
                f"listener:{name}",
                kind,
                AdapterConfig(listeners={name: listener}, inbounds=inbounds, outbounds=outbounds),
            )
        for name, inbound in adapter.inbounds.items():
            ref = inbound.connection()
            if ref is None or ref not in adapter.listeners:
                brokers = {ref: adapter.brokers[ref]} if ref is not None and ref in adapter.brokers else {}
                add(f"inbound:{name}", kind, AdapterConfig(brokers=brokers, inbounds={name: inbound}))
        for name, outbound in adapter.outbounds.items():
            ref = outbound.connection()
            if ref is None or ref not in adapter.listeners:
                brokers = {ref: adapter.brokers[ref]} if ref is not None and ref in adapter.brokers else {}
                add(f"outbound:{name}", kind, AdapterConfig(brokers=brokers, outbounds={name: outbound}))
    return units


@dataclass(slots=True)
class Unit:
    """A built unit: its services (run by the daemon as tasks), outbounds (each with a dispatcher) and the
    reload hooks its adapter added."""

    spec: UnitSpec
    services: list[Service]
    outbounds: dict[str, Outbound]
    hooks: list[Callable[[], None]]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    failure: BaseException | None = None  # a service that raised (a bind failure), for the reload to see


def build_unit(
    spec: UnitSpec,
    specs: Mapping[str, AdapterSpec],
    sink: Sink,
    health: Health,
    admin: Admin | None,
    metrics: MetricsEndpoint | None = None,
    status: StatusReader | None = None,
    *,
    mounts: Mounts | None = None,
    reports: Reports | None = None,
    replies: Replies | None = None,
    requests: Requests | None = None,
    admission: Admission | None = None,
) -> Unit:
    """Build ``spec`` (no I/O: the services connect or bind when run). Raises ConfigError like the
    adapter's ``build`` (which a dry build of the whole config has already run, so it should not)."""
    rt = Runtime(
        sink=sink,
        health=health,
        admin=admin,
        credential_headers=spec.credential_headers,
        reload_hooks=[],
        admin_roles=spec.admin_roles,
        metrics=metrics,
        max_pending=spec.max_pending,
        status=status,
        replies=replies,
        requests=requests,
        mounts=mounts if mounts is not None else Mounts(),
        reports=reports if reports is not None else Reports(),
        outbox_path=spec.outbox_path,
        admission=admission,
    )
    built = specs[spec.kind].build(spec.section, rt)
    return Unit(spec, built.services, built.outbounds, rt.reload_hooks)


def _look(path: Path) -> tuple[int, int, str]:
    st = os.stat(path)
    text = path.read_bytes()
    return st.st_mtime_ns, st.st_size, hashlib.sha256(text).hexdigest()


async def settled_text(path: Path, interval_s: float = SETTLE_INTERVAL_S, timeout_s: float = SETTLE_TIMEOUT_S) -> str:
    """The text of ``path`` once it has stopped changing: the mtime, size and SHA-256 of the content the
    same in two looks ``interval_s`` apart (an editor or a ``cp`` caught half-way changes at least one).
    Raises ConfigError when it cannot be read, or is still changing after ``timeout_s``. The reading is
    done on a thread."""
    file = str(path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        before = await asyncio.to_thread(_look, path)
        while True:
            await asyncio.sleep(interval_s)
            after = await asyncio.to_thread(_look, path)
            if after == before:
                text = await asyncio.to_thread(path.read_text, encoding="utf-8")
                if hashlib.sha256(text.encode()).hexdigest() == after[2]:
                    return text
                after = (0, 0, "")  # changed between the look and the read: look again
            if loop.time() >= deadline:
                raise ConfigError(file, [f"the file was still changing after {timeout_s:.0f} s; not loaded"])
            before = after
    except OSError as exc:
        raise ConfigError(file, [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, [f"not UTF-8: {exc}"]) from exc
