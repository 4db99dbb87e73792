"""``GET /admin/status`` and ``mediator status``: the operator's view of a running daemon, in one answer.

Everything comes from what the daemon already keeps: ``Health`` (state of every listener, broker
connection, inbound and outbound), the metrics' counters, the dispatchers (backlog, breaker), the outbox's
``stats()`` (on a worker thread) and the config's version. Names are the admin's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

from mediator import __version__
from mediator.observability.metrics import Metrics, Observed, broker_of
from mediator.outbox.base import Outbox, StorageError


class StatusSource(Observed, Protocol):
    """What ``status`` reads of the daemon, beyond what the metrics' collector does."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def last_reload(self) -> Mapping[str, object] | None:
        """The latest reload's outcome (None before the first): seq, at, outcome, problems, version."""
        ...


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _by(values: Mapping[tuple[str, ...], float], first: str) -> dict[str, int]:
    """``{second label: value}`` of the counter samples whose first label is ``first``."""
    return {labels[1]: int(v) for labels, v in sorted(values.items()) if labels[0] == first and v}


async def status(daemon: StatusSource) -> dict[str, object]:
    now = time.time()
    config = daemon.config
    root = config.root
    health = daemon.health
    states = health.snapshot()
    totals = daemon.metrics.totals()

    def total(name: str, *labels: str) -> int:
        return int(totals.get(name, {}).get(labels, 0.0))

    def state(component: str) -> dict[str, object]:
        s = states.get(component)
        if s is None:
            return {"ready": False, "detail": "not running"}
        return {"ready": bool(s["ready"]), "detail": s["detail"]}

    def intake(component: str) -> dict[str, object]:
        """An inbound's state: a draining daemon refuses every event (503, UNAVAILABLE, no ack), so none is
        ready then, whatever its connection or listener says."""
        s = state(component)
        if health.draining:
            return {"ready": False, "detail": f"draining: new events refused ({s['detail']})"}
        return s

    listeners = [
        {"name": name, "kind": body.get("kind"), **state(f"listener:{name}")} for name, body in root.listeners.items()
    ]
    connections = broker_of(config)
    brokers = []
    for name, body in root.brokers.items():
        users = []
        for component in sorted(c for c, b in connections.items() if b == name):
            users.append(
                {"component": component, **state(component), "reconnects": max(0, health.connects(component) - 1)}
            )
        brokers.append({"name": name, "kind": body.get("kind"), "connections": users})

    inbound_cfgs = {n: c for a in config.adapters.values() for n, c in a.inbounds.items()}
    inbounds = []
    for name, body in root.inbound.items():
        cfg = inbound_cfgs.get(name)
        inbounds.append(
            {
                "name": name,
                "kind": body.get("kind"),
                "via": cfg.connection() if cfg is not None else None,
                **intake(f"inbound:{name}"),
                "received": total("events_received", name),
                "accepted": total("events_accepted", name),
                "duplicates": total("events_duplicate", name),
                "refused": _by(totals.get("events_refused", {}), name),
                "deferred": _by(totals.get("events_deferred", {}), name),
                "unmatched": total("events_unmatched", name),
            }
        )

    outbound_cfgs = config.outbound_configs()
    dispatchers = daemon.dispatchers
    outbounds = []
    for name, body in root.outbound.items():
        ocfg = outbound_cfgs.get(name)
        dispatcher = dispatchers.get(name)
        outbounds.append(
            {
                "name": name,
                "kind": body.get("kind"),
                "via": ocfg.connection() if ocfg is not None else None,
                **state(f"outbound:{name}"),
                "sent": total("deliveries_sent", name),
                "failed": _by(totals.get("delivery_attempts_failed", {}), name),
                "retried": _by(totals.get("deliveries_retried", {}), name),
                "dead_lettered": _by(totals.get("dead_letters", {}), name),
                "backlog": dispatcher.backlog if dispatcher is not None else 0,
                "breaker": "open" if dispatcher is not None and dispatcher.breaker_open else "closed",
                "consecutive_failures": dispatcher.consecutive_failures if dispatcher is not None else 0,
            }
        )
        reporter = daemon.reports.by_component.get(f"outbound:{name}")
        if reporter is not None:
            outbounds[-1]["subscriptions"] = reporter.status()  # a push outbound's subscribers and ring
    routes = [{"name": r.name, "routed": total("events_routed", r.name)} for r in root.routes]

    outbox: dict[str, object] = {"kind": root.outbox.kind}
    try:
        stats = await daemon.outbox.stats()
    except StorageError as exc:
        outbox["error"] = str(exc)
    else:
        oldest = None
        if stats.oldest_id is not None:
            received = stats.oldest_received
            oldest = {
                "id": stats.oldest_id,
                "route": stats.oldest_route,
                "outbound": stats.oldest_outbound,
                "received": iso(received),
                "age_s": round(max(0.0, now - received), 3) if received is not None else None,
            }
        outbox.update(pending=stats.pending, dead_letters=stats.dead_letters, oldest_pending=oldest)

    return {
        "mediator": __version__,
        "pid": os.getpid(),
        "now": iso(now),
        "ready": health.ready,
        "draining": health.draining,
        "counting": daemon.metrics.counting,  # false ([metrics] enabled = false): every counter below reads 0
        "config": {
            "file": config.file,
            "version": daemon.config_version,
            "loaded_at": iso(daemon.config_loaded_at),
            "last_reload": _reload(daemon.last_reload),
        },
        "listeners": listeners,
        "brokers": brokers,
        "inbounds": inbounds,
        "outbounds": outbounds,
        "routes": routes,
        "dead_lettered_at_ingress": _by(totals.get("dead_letters", {}), ""),
        "outbox": outbox,
        **({"overload": overload.status()} if (overload := getattr(daemon, "overload", None)) is not None else {}),
    }


def _reload(doc: Mapping[str, object] | None) -> dict[str, object] | None:
    if doc is None:
        return None
    at = doc.get("at")
    return {
        "outcome": doc.get("outcome"),
        "at": iso(at) if isinstance(at, float) else None,
        "problems": doc.get("problems", []),
        "version": doc.get("version"),
    }


def _counts(value: object) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in value.items())


def render(doc: Mapping[str, object]) -> str:
    """``status``'s answer as text tables, for a terminal."""
    from mediator.client import table

    def state(item: Mapping[str, object]) -> str:
        return "ready" if item.get("ready") else "NOT READY"

    def rows(key: str) -> list[Mapping[str, object]]:
        value = doc.get(key)
        return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []

    config = doc.get("config")
    config = config if isinstance(config, Mapping) else {}
    out = [
        f"mediator {doc.get('mediator')} (pid {doc.get('pid')}): "
        + ("draining" if doc.get("draining") else "ready" if doc.get("ready") else "NOT READY")
        + ("" if doc.get("counting", True) else " (metrics off: no counters)"),
        f"config {config.get('file')} version {config.get('version')} loaded {config.get('loaded_at')}",
        "",
        table(
            [["LISTENER", "KIND", "STATE", "DETAIL"]]
            + [
                [str(x.get("name")), str(x.get("kind")), state(x), str(x.get("detail") or "")]
                for x in rows("listeners")
            ]
        ),
        "",
    ]
    broker_rows = [["BROKER", "KIND", "CONNECTION", "STATE", "RECONNECTS", "DETAIL"]]
    for b in rows("brokers"):
        conns = b.get("connections")
        for c in conns if isinstance(conns, list) else []:
            broker_rows.append(
                [
                    str(b.get("name")),
                    str(b.get("kind")),
                    str(c.get("component")),
                    state(c),
                    str(c.get("reconnects")),
                    str(c.get("detail") or ""),
                ]
            )
    if len(broker_rows) > 1:
        out += [table(broker_rows), ""]
    out += [
        table(
            [["INBOUND", "KIND", "VIA", "STATE", "RECEIVED", "ACCEPTED", "DUPLICATES", "REFUSED"]]
            + [
                [
                    str(x.get("name")),
                    str(x.get("kind")),
                    str(x.get("via") or "-"),
                    state(x),
                    str(x.get("received")),
                    str(x.get("accepted")),
                    str(x.get("duplicates")),
                    _counts(x.get("refused")),
                ]
                for x in rows("inbounds")
            ]
        ),
        "",
        table(
            [["OUTBOUND", "KIND", "STATE", "SENT", "BACKLOG", "BREAKER", "RETRIED", "DEAD-LETTERED"]]
            + [
                [
                    str(x.get("name")),
                    str(x.get("kind")),
                    state(x),
                    str(x.get("sent")),
                    str(x.get("backlog")),
                    str(x.get("breaker")),
                    _counts(x.get("retried")),
                    _counts(x.get("dead_lettered")),
                ]
                for x in rows("outbounds")
            ]
        ),
        "",
    ]
    push_rows = [["PUSH OUTBOUND", "SUBSCRIBERS", "RING", "CURSORS", "PUSHED", "DISCONNECTS", "RESUMES", "GAPS"]]
    for x in rows("outbounds"):
        sub = x.get("subscriptions")
        if isinstance(sub, Mapping):
            ring = sub.get("ring")
            ring = ring if isinstance(ring, Mapping) else {}
            push_rows.append(
                [
                    str(x.get("name")),
                    str(sub.get("subscribers")),
                    str(ring.get("events")),
                    f"{ring.get('oldest')}..{ring.get('newest')}",
                    _counts(sub.get("pushed")),
                    _counts(sub.get("disconnects")),
                    str(sub.get("resumes")),
                    str(sub.get("gaps")),
                ]
            )
    if len(push_rows) > 1:
        out += [table(push_rows), ""]
    out += [
        table([["ROUTE", "ROUTED"]] + [[str(x.get("name")), str(x.get("routed"))] for x in rows("routes")]),
        "",
    ]
    outbox = doc.get("outbox")
    outbox = outbox if isinstance(outbox, Mapping) else {}
    line = f"outbox ({outbox.get('kind')}): {outbox.get('pending')} pending, {outbox.get('dead_letters')} dead letters"
    oldest = outbox.get("oldest_pending")
    if isinstance(oldest, Mapping):
        line += (
            f"; oldest pending: delivery {oldest.get('id')} to {oldest.get('outbound')} (route {oldest.get('route')}),"
            f" received {oldest.get('received')} ({oldest.get('age_s')} s ago)"
        )
    if "error" in outbox:
        line += f"; {outbox['error']}"
    out.append(line)
    overload = doc.get("overload")
    if isinstance(overload, Mapping):
        line = f"overload: {overload.get('level')}"
        reasons = overload.get("reasons")
        if isinstance(reasons, list) and reasons:
            line += " (" + "; ".join(str(r.get("reason")) for r in reasons if isinstance(r, Mapping)) + ")"
        paused = overload.get("paused")
        if isinstance(paused, Mapping) and paused:
            line += "; paused: " + ", ".join(str(k) for k in paused)
        shed = overload.get("shed")
        if isinstance(shed, list) and shed:
            line += "; shed: " + ", ".join(
                f"{s.get('inbound')} ({s.get('priority')}, {s.get('monitor')}) {s.get('refused')}"
                for s in shed
                if isinstance(s, Mapping)
            )
        out.append(line)
    ingress = doc.get("dead_lettered_at_ingress")
    if isinstance(ingress, Mapping) and ingress:
        out.append("dead-lettered before any outbound: " + _counts(dict(ingress)))
    store = doc.get("store")
    if isinstance(store, Mapping):
        if not store.get("enabled"):
            out.append(f"event store: off ({store.get('reason')})")
        elif store.get("backend") == "postgresql":
            out.append(
                f"event store (postgresql, {store.get('retention')}): {store.get('shipped')} shipped,"
                f" {store.get('spooled')} spooled, {store.get('expired')} expired"
                + (f"; {store['error']}" if store.get("error") else "")
            )
        else:
            out.append(
                f"event store (sqlite, {store.get('retention')}): {store.get('events')} events,"
                f" {store.get('bytes')} bytes, {store.get('expired')} expired"
            )
    replays = rows("replays")
    if replays:
        out += [
            "",
            table(
                [["REPLAY", "STATE", "DONE", "TOTAL", "RATE", "TO"]]
                + [
                    [
                        str(x.get("id")),
                        str(x.get("state")),
                        str(x.get("done")),
                        str(x.get("total")),
                        f"{x.get('rate')}/s",
                        str(x.get("to") or f"route {x.get('route')}"),
                    ]
                    for x in replays
                ]
            ),
        ]
    return "\n".join(out)
