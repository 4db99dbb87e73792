"""The event store's seam and the values it keeps: every accepted event, with the inbound that took it, its
verified publisher and when it was received, for a retention window (docs/history.md).

Time here is the receipt time (``provenance.received``, Unix seconds): the gateway's clock, so a range and
the order of a page never depend on what a producer wrote into ``time``. Order is (received, seq), seq
being the backend's insertion order; a cursor is the (received, seq) of the last row a page examined.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from mediator.core.content import parsed
from mediator.core.envelope import Envelope, attribute
from mediator.core.formats import to_json_dict
from mediator.core.predicate import Predicate, PredicateError
from mediator.core.router import event_variables
from mediator.history.config import StoreConfig
from mediator.outbox.base import Accepted

Order = Literal["newest", "oldest"]
MAX_LIMIT = 1000
"""Events one page answers at most."""

COLUMNS = "seq, received, expires, id, source, type, subject, inbound, principal, size, envelope"
"""Of every ``events`` table (SQLite and PostgreSQL alike); a row tuple is in this order."""
Row = tuple[float, float, str, str, str, str | None, str, str, int, bytes]
"""A row to insert (without seq): received, expires, id, source, type, subject, inbound, principal, size,
envelope."""


class QueryError(ValueError):
    """A query parameter that cannot be used (a bad cursor, time or ``where``): the caller's 400."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    received: float
    event: Envelope
    inbound: str
    principal: str

    def document(self) -> dict[str, object]:
        """The event as CloudEvents structured JSON (``event``) and what only the gateway knows."""
        return {
            "event": to_json_dict(self.event),
            "inbound": self.inbound,
            "principal": self.principal,
            "received": iso(self.received),
        }


@dataclass(frozen=True, slots=True)
class EventQuery:
    type: str | None = None  # exact, or a glob with * and ?
    source: str | None = None
    subject: str | None = None
    since: float | None = None  # received >= since
    until: float | None = None  # received < until
    order: Order = "newest"
    limit: int = 100
    cursor: tuple[float, int] | None = None  # exclusive: the rows after it in ``order``
    where: Predicate | None = None
    max_examined: int = 5000  # with ``where``: rows one page examines at most


@dataclass(slots=True)
class Page:
    events: list[StoredEvent] = field(default_factory=list)
    next: tuple[float, int] | None = None  # None: no more rows
    examined: int = 0


class EventStore(Protocol):
    """Where accepted events are kept. ``open`` before the outbox's first commit is answered, ``run`` in
    the daemon's task group (expiry, and for PostgreSQL the shipping), ``close`` after the outbox drained."""

    backend: str

    async def open(self) -> None: ...

    async def run(self) -> None:
        """Background work until cancelled: expiry in bounded batches (and shipping, for PostgreSQL)."""
        ...

    async def query(self, q: EventQuery) -> Page:
        """Matching events in ``q.order``, at most ``q.limit``; ``next`` resumes after the last row
        examined. Raises QueryError, StorageError."""
        ...

    async def get(self, event_id: str, source: str | None = None) -> StoredEvent | None:
        """The newest stored event with this id (and source)."""
        ...

    async def count(self, q: EventQuery) -> int:
        """How many events ``q`` matches in all (every page; ``limit`` ignored)."""
        ...

    def stats(self) -> dict[str, object]:
        """JSON-ready: events and bytes stored, expired, and (PostgreSQL) the spool; never blocks."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------- shared by the backends
class Retention:
    """Seconds an event of a type is kept, the overrides' globs matched once per type."""

    def __init__(self, cfg: StoreConfig) -> None:
        self._cfg = cfg
        self._by_type: dict[str, float] = {}

    def __call__(self, event_type: str) -> float:
        value = self._by_type.get(event_type)
        if value is None:
            if len(self._by_type) > 10_000:
                self._by_type.clear()
            value = self._by_type[event_type] = self._cfg.retention_for(event_type)
        return value


def rows_of(
    items: Sequence[Accepted], skipped: Sequence[int], retention: Retention, blobs: Sequence[bytes] = ()
) -> list[Row]:
    """The rows to store for one commit: every item but the duplicates and the copies (``stored`` False).
    ``blobs``: the events as the outbox serialized them (b"" where it did not), not serialized twice."""
    out: list[Row] = []
    skip = set(skipped) if skipped else ()
    for i, item in enumerate(items):
        if not item.stored or i in skip:
            continue
        env = item.event
        keep = retention(env.type)
        if keep <= 0:
            continue
        prov = env.provenance
        ts = prov.received
        received = ts.seconds + ts.nanos * 1e-9
        blob = (blobs[i] if blobs else b"") or env.SerializeToString()
        subject = attribute(env, "subject")
        out.append(
            (received, received + keep, env.id, env.source, env.type, subject, prov.inbound, prov.principal,
             len(blob), blob)
        )  # fmt: skip
    return out


def stored_event(seq: int, received: float, blob: bytes) -> StoredEvent:
    env = Envelope.FromString(blob)
    return StoredEvent(seq, received, env, env.provenance.inbound, env.provenance.principal)


def matches(pred: Predicate, env: Envelope) -> bool:
    """``where`` for one stored event; one that cannot be evaluated for it (a missing field) does not match."""
    try:
        return pred.evaluate(event_variables(env, parsed, pred))
    except PredicateError:
        return False


_GLOB = re.compile(r"[*?\[]")


def is_glob(value: str) -> bool:
    return _GLOB.search(value) is not None


def filters(q: EventQuery, glob: str) -> tuple[list[str], list[Any]]:
    """SQL conditions (``?`` placeholders) and their values for the indexed fields and the cursor. ``glob``
    is the backend's: "GLOB" for SQLite; PostgreSQL's caller passes "LIKE" and gets the pattern translated."""
    where: list[str] = []
    args: list[Any] = []
    if q.type is not None:
        if is_glob(q.type):
            where.append(f"type {glob} ?")
            args.append(q.type if glob == "GLOB" else like_pattern(q.type))
        else:
            where.append("type = ?")
            args.append(q.type)
    for name, value in (("source", q.source), ("subject", q.subject)):
        if value is not None:
            where.append(f"{name} = ?")
            args.append(value)
    if q.since is not None:
        where.append("received >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("received < ?")
        args.append(q.until)
    if q.cursor is not None:
        op = "<" if q.order == "newest" else ">"
        where.append(f"(received {op} ? OR (received = ? AND seq {op} ?))")
        args += [q.cursor[0], q.cursor[0], q.cursor[1]]
    return where, args


def like_pattern(glob: str) -> str:
    out = []
    for ch in glob:
        out.append("%" if ch == "*" else "_" if ch == "?" else "\\" + ch if ch in "%_\\" else ch)
    return "".join(out)


def order_by(q: EventQuery) -> str:
    direction = "DESC" if q.order == "newest" else "ASC"
    return f"ORDER BY received {direction}, seq {direction}"


# ---------------------------------------------------------------------- the admin API's parameters
def encode_cursor(pos: tuple[float, int] | None) -> str | None:
    if pos is None:
        return None
    raw = json.dumps([pos[0], pos[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[float, int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        received, seq = json.loads(raw)
        return float(received), int(seq)
    except (ValueError, TypeError) as exc:
        raise QueryError(f"cursor {text!r} is not one this daemon gave") from exc


def parse_time(text: str, now: float) -> float:
    """``since``/``until``: an RFC 3339 date-time, Unix seconds, or a duration ago ("10m", "2h", "7d")."""
    from mediator.history.config import parse_duration

    text = text.strip()
    try:
        return now - parse_duration(text) if text[-1:].isalpha() else float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"{text!r} is neither an RFC 3339 date-time, Unix seconds, nor a duration ago ('10m')"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def query_of(params: dict[str, str], now: float, max_examined: int, default_limit: int = 100) -> EventQuery:
    """An ``EventQuery`` from the query string of ``GET /admin/events`` (or a replay's body); raises QueryError."""
    known = {"type", "source", "subject", "since", "until", "limit", "cursor", "order", "where"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise QueryError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    order = params.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise QueryError("order must be newest or oldest")
    try:
        limit = int(params.get("limit", str(default_limit)))
    except ValueError:
        raise QueryError("limit must be a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}")
    where = None
    if params.get("where"):
        try:
            where = Predicate.compile(params["where"])
        except ValueError as exc:
            raise QueryError(f"where: {exc}") from None
    return EventQuery(
        type=params.get("type") or None,
        source=params.get("source") or None,
        subject=params.get("subject") or None,
        since=parse_time(params["since"], now) if params.get("since") else None,
        until=parse_time(params["until"], now) if params.get("until") else None,
        order="oldest" if order == "oldest" else "newest",
        limit=limit,
        cursor=decode_cursor(params["cursor"]) if params.get("cursor") else None,
        where=where,
        max_examined=max_examined,
    )


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
