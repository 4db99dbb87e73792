"""What a reload applies to the running daemon and what waits for a restart: one table, every key decided.

Each top-level section of ``RootConfig`` (and each key of ``[daemon]``, which mixes both) is either
``LIVE``, swapped in by ``Daemon._apply`` without a restart, or ``RESTART``: the running daemon keeps the
value it started with, and every reload names it in ``restart_required`` until the process is restarted.
tests/observability/test_reload_sections.py fails when a field of either model is missing here, so a new
section cannot be added without deciding which it is (and, if live, making it so).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

from mediator.config import DaemonConfig, RootConfig

Applied = Literal["live", "restart"]
LIVE: Final = "live"
RESTART: Final = "restart"

SECTIONS: Mapping[str, Applied] = {
    "daemon": LIVE,  # per key: DAEMON_KEYS
    # The outbox file is open, its dedup window and max_pending sized, from the start.
    "outbox": RESTART,
    # The store's tables, backend connection and expiry task are set up with the outbox, at start.
    "store": RESTART,
    "dead_letters": LIVE,  # the pipeline's forward destination
    "routing": LIVE,  # compiled into the routes
    # The ingress stages, built again and swapped whole (aggregate reconfigures its store).
    "security": LIVE,
    "auth": LIVE,
    "authorization": LIVE,
    "rate_limits": LIVE,
    "validation": LIVE,
    "schemas": LIVE,
    "encryption": LIVE,  # key rings: the stages are rebuilt with the new keys (daemon.SECURITY_SECTIONS)
    "enrich": LIVE,
    "aggregate": LIVE,
    # A new span recorder and exporter thread replace the old one (which flushes what it holds), or
    # none when turned off: the sink and every outbound are rewrapped (mediator/observability/tracing.py).
    "tracing": LIVE,
    # The counters and the /metrics endpoint are wired into the pipeline and the listeners at start.
    "metrics": RESTART,
    # The schema store is opened and the registry's paths mounted at start (mediator/schemaregistry/).
    "registry": RESTART,
    # The adapters, as units started, stopped and restarted one by one (mediator/units.py).
    "listeners": LIVE,
    "brokers": LIVE,
    "inbound": LIVE,
    "outbound": LIVE,
    "routes": LIVE,
    # Thresholds read by the overload manager at every check; priorities with the inbounds (mediator/overload.py).
    "overload": LIVE,
}

DAEMON_KEYS: Mapping[str, Applied] = {
    "log_level": RESTART,  # structlog and the stdlib loggers are configured once, before the daemon
    "log_format": RESTART,
    "drain_timeout_s": LIVE,  # read when the drain starts
    "removed_outbound": LIVE,  # read when a reload removes an outbound
    "removed_outbound_grace_s": LIVE,
    "workers": RESTART,  # the supervisor forks its workers once
}


def restart_required(started: RootConfig, new: RootConfig) -> list[str]:
    """The keys of ``new`` that differ from the config the process ``started`` with and are not applied
    until a restart: ``outbox``, ``metrics``, ``daemon.log_level``, ... (sorted as the tables are)."""
    out = [k for k, how in SECTIONS.items() if how == RESTART and getattr(started, k) != getattr(new, k)]
    out += [
        f"daemon.{k}"
        for k, how in DAEMON_KEYS.items()
        if how == RESTART and getattr(started.daemon, k) != getattr(new.daemon, k)
    ]
    return out


def in_force(started: RootConfig, new: RootConfig) -> RootConfig:
    """``new`` as the daemon actually runs it after a reload: the restart-only keys as it started with
    (so /admin/status, and the next reload's comparison, see what is in force)."""
    daemon = new.daemon.model_copy(
        update={k: getattr(started.daemon, k) for k, how in DAEMON_KEYS.items() if how == RESTART}
    )
    kept: dict[str, object] = {k: getattr(started, k) for k, how in SECTIONS.items() if how == RESTART}
    return new.model_copy(update={**kept, "daemon": daemon})


def unclassified() -> list[str]:
    """Fields of the config models that neither table decides (empty: tested)."""
    missing = [k for k in RootConfig.model_fields if k not in SECTIONS]
    missing += [f"daemon.{k}" for k in DaemonConfig.model_fields if k not in DAEMON_KEYS]
    extra = [k for k in SECTIONS if k not in RootConfig.model_fields]
    extra += [f"daemon.{k}" for k in DAEMON_KEYS if k not in DaemonConfig.model_fields]
    return missing + [f"{k} (no such key)" for k in extra]
