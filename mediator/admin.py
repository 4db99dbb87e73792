"""The operator's actions on a running daemon (``mediator.core.seams.Admin``): what ``/admin/*`` serves to the
CLI and the dashboard alike, so both read the same facts and act through the same calls.

Every change to the dead letters (replay, edit-and-replay, delete) is written to the outbox's audit log
(who, when, what; never the data) before it is answered, so the log and the dead letters share one store.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from mediator.core.deadletter import REMOVED_PREFIX, classify
from mediator.core.envelope import Envelope, attribute, data_bytes, set_attribute
from mediator.core.errors import Rejected
from mediator.core.formats import is_json, is_text
from mediator.core.tap import Passed, TailFilter, Watcher
from mediator.observability.status import iso, status
from mediator.outbox import DeadLetter

if TYPE_CHECKING:
    from mediator.daemon import Daemon

log = structlog.get_logger(__name__)


AUTHCONTEXT = ("authtype", "authid", "authclaims")
"""Set only from a verified principal (DESIGN section 5): an edit cannot forge who sent an event."""


def describe(dl: DeadLetter) -> dict[str, object]:
    return {
        "id": dl.id,
        "event_id": dl.event.id,
        "type": dl.event.type,
        "source": dl.event.source,
        "inbound": dl.event.provenance.inbound,
        "route": dl.route,
        "outbound": dl.outbound,
        "address": dl.address,
        "reason": dl.reason,
        "class": classify(dl.reason, dl.outbound),  # the reason label of mediator_dead_letters_total
        "attempts": dl.attempts,
        "at": datetime.fromtimestamp(dl.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "replayable": bool(dl.format),
    }


def data_view(event: Envelope) -> dict[str, object]:
    """An event's data for an operator: ``data`` as text (JSON pretty-printed) when it is text, else
    ``data_base64``; with its ``datacontenttype`` and size."""
    data = data_bytes(event)
    ct = attribute(event, "datacontenttype")
    out: dict[str, object] = {"datacontenttype": ct, "size": len(data)}
    if not data:
        out["data"] = ""
        return out
    if ct is None or is_json(ct) or is_text(ct):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            out["data_base64"] = base64.b64encode(data).decode("ascii")
            return out
        if ct is None or is_json(ct):
            try:
                text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
                out["json"] = True
            except ValueError:
                pass
        out["data"] = text
        return out
    out["data_base64"] = base64.b64encode(data).decode("ascii")
    return out


def envelope_view(dl: DeadLetter) -> dict[str, object]:
    """One dead letter whole: ``describe`` plus its attributes and data (``data_view``)."""
    event = dl.event
    attributes = {name: attribute(event, name) or "" for name in sorted(event.attributes)}
    return {**describe(dl), "attributes": attributes, **data_view(event)}


def passed_view(p: Passed, with_data: bool) -> dict[str, object]:
    """One event of the live tail; its data only ``with_data`` (the caller holds a payload role)."""
    event = p.event
    out: dict[str, object] = {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "inbound": event.provenance.inbound,
        "time": attribute(event, "time"),
        "routes": list(p.routes),
        "outbounds": list(p.outbounds),
        "duplicate": p.duplicate,
        "dead_reason": p.dead_reason,
        "size": len(data_bytes(event)),
    }
    if p.dropped:
        out["dropped_before"] = p.dropped
    if with_data:
        out.update(data_view(event))
    return out


def edited(event: Envelope, data: bytes | None, attributes: Mapping[str, str] | None) -> tuple[Envelope, list[str]]:
    """A copy of ``event`` with new data and/or attributes (an empty value removes an attribute; ``source``
    and ``type`` set the envelope's own fields; ``id`` cannot change: it is the deduplication key) and
    what changed, for the audit log. Raises ValueError for an attribute that cannot be set."""
    out = Envelope()
    out.CopyFrom(event)
    changes: list[str] = []
    if data is not None:
        out.binary_data = data  # a oneof: the text or Protobuf data it held is cleared
        changes.append(f"data ({len(data)} bytes)")
    for name, value in (attributes or {}).items():
        if name in ("id", "specversion"):
            raise ValueError(f"the attribute {name!r} cannot be edited")
        if name in AUTHCONTEXT:
            raise ValueError(f"the attribute {name!r} says who sent the event: only the gateway sets it")
        if not value and name not in ("source", "type"):
            if name in out.attributes:
                del out.attributes[name]
        else:
            try:
                set_attribute(out, name, value)
            except Rejected as exc:
                raise ValueError(exc.reason) from None
        changes.append(name)
    return out, changes


class DeadLetterAdmin:
    """The operator's view of a running daemon (see ``mediator.core.seams.Admin``)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def payload_roles(self) -> frozenset[str]:
        return frozenset(self._daemon.config.root.security.payload_roles)

    async def dead_letters(self, limit: int) -> list[dict[str, object]]:
        return [describe(dl) for dl in await self._daemon.outbox.dead_letters(limit)]

    async def dead_letter(self, id: int) -> dict[str, object] | None:
        dl = await self._daemon.outbox.dead_letter_by_id(id)
        return envelope_view(dl) if dl is not None else None

    async def replay(self, ids: Sequence[int] | None, who: str = "") -> int:
        daemon = self._daemon
        rows = await daemon.outbox.replay(ids)
        for p in rows:
            dispatcher = daemon.dispatchers.get(p.outbound)
            if dispatcher is None:
                reason = f"{REMOVED_PREFIX}outbound {p.outbound!r} is no longer configured"
                await daemon.outbox.dead_letter(p, reason)
                daemon.metrics.dead_letter(p.outbound, reason)
                continue
            daemon.backlog.add(1)
            dispatcher.submit(p)
        if rows:
            await self._audit(who, "replay", {"ids": "all" if ids is None else list(ids), "count": len(rows)})
        log.info("dead_letters.replayed", count=len(rows), who=who or None)
        return len(rows)

    async def edit_replay(
        self, id: int, data: bytes | None, attributes: Mapping[str, str] | None, who: str = ""
    ) -> int:
        """Replace a dead letter's data and/or attributes, then replay it; returns 1, or 0 when there is no
        such dead letter. Raises ValueError for an edit that cannot be made (the id, or a letter that never
        had a destination and so cannot be replayed)."""
        outbox = self._daemon.outbox
        dl = await outbox.dead_letter_by_id(id)
        if dl is None:
            return 0
        if not dl.format:
            raise ValueError("this dead letter never had a destination (dead-lettered at ingress): publish it again")
        event, changes = edited(dl.event, data, attributes)
        if changes and not await outbox.edit_dead_letter(id, event):
            return 0
        await self._audit(who, "edit", {"id": id, "event_id": dl.event.id, "changed": changes})
        return await self.replay([id], who)

    async def delete(self, ids: Sequence[int], who: str = "") -> int:
        count = await self._daemon.outbox.delete_dead_letters(ids)
        if count:
            await self._audit(who, "delete", {"ids": list(ids), "count": count})
        log.info("dead_letters.deleted", count=count, who=who or None)
        return count

    async def audit(self, limit: int) -> list[dict[str, object]]:
        return [
            {"id": e.id, "at": iso(e.at), "who": e.who, "action": e.action, "detail": json.loads(e.detail)}
            for e in await self._daemon.outbox.audit_log(limit)
        ]

    async def _audit(self, who: str, action: str, detail: dict[str, Any]) -> None:
        await self._daemon.outbox.audit(who or "anonymous", action, json.dumps(detail, separators=(",", ":")))

    async def status(self) -> dict[str, object]:
        doc = await status(self._daemon)
        doc.update(self._daemon.history.status())
        return doc

    async def history(self, method: str, path: str, query: Mapping[str, str], body: object) -> tuple[int, object]:
        """The event store's and the replays' admin API (``mediator.history.unit.History.handle``)."""
        return await self._daemon.history.handle(method, path, query, body)

    async def routes(self) -> dict[str, object]:
        return routes_view(self._daemon)

    async def rates(self) -> dict[str, object]:
        return self._daemon.rates.snapshot()

    def tail(self, wanted: TailFilter) -> Watcher:
        return self._daemon.pipeline.tap.watch(wanted)

    def untail(self, watcher: Watcher) -> None:
        self._daemon.pipeline.tap.close(watcher)


def routes_view(daemon: Daemon) -> dict[str, object]:
    """The translation table as the admin wrote it (``written``: each [[routes]] as in config.toml) and as
    the router resolved it (``resolved``: effective ``final``, each destination's format and whether it
    has an egress step), with how many events each route matched."""
    root = daemon.config.root
    totals = daemon.metrics.totals().get("events_routed", {})
    written = [r.model_dump(mode="json", exclude_defaults=True) for r in root.routes]
    resolved: list[dict[str, object]] = []
    for spec in daemon.pipeline.router.specs:
        resolved.append(
            {
                "name": spec.name,
                "inbounds": sorted(spec.inbounds),
                "types": list(spec.types),
                "sources": list(spec.sources),
                "topics": [t.text for t in spec.topics],
                "attributes": dict(spec.attributes),
                "when": spec.when.source if spec.when is not None else None,
                "final": spec.final,
                "destinations": [
                    {
                        "outbound": d.outbound,
                        "address": d.address.text,
                        "format": d.format,
                        "egress": d.egress is not None,
                    }
                    for d in spec.destinations
                ],
                "routed": int(totals.get((spec.name,), 0.0)),
            }
        )
    return {"mode": root.routing.mode, "written": written, "resolved": resolved}
