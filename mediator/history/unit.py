"""History: the event store (``[store]``), its query and replays, as one unit the daemon opens after the
outbox, runs in its task group and closes before the outbox (docs/history.md).

The admin API is ``History.handle`` (method, path under /admin/, query, body) -> (status, JSON), so the
HTTP adapter only routes; the CLI (``mediator events``, ``mediator replay``) is a client of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mediator.core.health import Health
from mediator.core.router import Router
from mediator.core.seams import OutboundConfigBase
from mediator.history.base import EventStore, QueryError, encode_cursor, query_of
from mediator.history.config import StoreConfig
from mediator.history.replay import ReplayError, Replays, spec_of
from mediator.outbox.base import StorageError
from mediator.outbox.sqlite import SqliteOutbox

log = structlog.get_logger(__name__)

NAMESPACE = "mediator"


class History:
    def __init__(
        self,
        cfg: StoreConfig,
        outbox: Any,  # what replays commit through (the daemon's StatusOutbox)
        inner: Any,  # the outbox itself: a SqliteOutbox keeps the store (or its spool) and the replay jobs
        health: Health,
        *,
        router: Callable[[], Router],
        outbounds: Callable[[], Mapping[str, OutboundConfigBase]],
        routes: Callable[[], list[str]],
        room: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.store: EventStore | None = None
        self.off_reason: str | None = None
        if not cfg.enabled:
            self.off_reason = "[store] retention is '0'"
        elif not isinstance(inner, SqliteOutbox):
            self.off_reason = "the event store needs [outbox] kind = 'sqlite' (it writes in the outbox's transaction)"
        elif cfg.backend == "postgresql":
            from mediator.history.postgres import PostgresEventStore

            self.store = PostgresEventStore(inner, cfg)
        else:
            from mediator.history.sqlite import SqliteEventStore

            self.store = SqliteEventStore(inner, cfg)
        self.replays: Replays | None = None
        if self.store is not None:
            self.replays = Replays(
                self.store,
                outbox,
                durable=inner if isinstance(inner, SqliteOutbox) else None,
                router=router,
                outbounds=outbounds,
                routes=routes,
                room=room,
                max_examined=cfg.query_max_examined,
            )

    async def open(self) -> None:
        if self.store is None:
            if self.cfg.enabled:
                log.warning("store.disabled", reason=self.off_reason)
            return
        await self.store.open()
        assert self.replays is not None
        await self.replays.open()

    async def run(self) -> None:
        if self.store is None or self.replays is None:
            return
        import asyncio

        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.store.run(), name="store")
            tg.create_task(self.replays.run(), name="replays")

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    def status(self) -> dict[str, object]:
        """For ``/admin/status``: the store's numbers and every replay's progress."""
        if self.store is None:
            return {"store": {"enabled": False, "reason": self.off_reason}, "replays": []}
        assert self.replays is not None
        return {
            "store": {"enabled": True, "retention": self.cfg.retention, **self.store.stats()},
            "replays": self.replays.documents(),
        }

    # ------------------------------------------------------------------ the admin API
    async def handle(self, method: str, path: str, query: Mapping[str, str], body: object) -> tuple[int, object]:
        """``path`` is what follows ``/admin/``: ``events``, ``events/ID``, ``replays``, ``replays/ID``."""
        store, replays = self.store, self.replays
        if store is None or replays is None:
            return 404, _problem("not_found", f"the event store is off: {self.off_reason}")
        head, _, rest = path.partition("/")
        try:
            if head == "events" and not rest and method == "GET":
                q = query_of(dict(query), time.time(), self.cfg.query_max_examined)
                page = await store.query(q)
                return 200, {
                    "events": [e.document() for e in page.events],
                    "next": encode_cursor(page.next),
                    "examined": page.examined,
                }
            if head == "events" and rest and method == "GET":
                unknown = set(query) - {"source"}
                if unknown:
                    return 400, _problem("invalid", f"unknown parameter(s) {', '.join(sorted(unknown))}")
                found = await store.get(rest, query.get("source"))
                if found is None:
                    return 404, _problem("not_found", f"no stored event with id {rest!r}")
                return 200, found.document()
            if head == "replays" and not rest and method == "GET":
                return 200, {"replays": replays.documents()}
            if head == "replays" and not rest and method == "POST":
                doc = await replays.start(spec_of(body if isinstance(body, Mapping) else {}))
                return (200 if doc.get("dry_run") else 201), doc
            if head == "replays" and rest and method in ("GET", "DELETE"):
                job = replays.get(rest) if method == "GET" else await replays.cancel(rest)
                if job is None:
                    return 404, _problem("not_found", f"no replay {rest!r}")
                return 200, job
        except (QueryError, ReplayError) as exc:
            return 400, _problem("invalid", str(exc))
        except StorageError as exc:
            return 503, _problem("not_ready", str(exc))
        return 405, _problem("method_not_allowed", f"{method} /admin/{path} is not served")


def _problem(error: str, reason: str) -> dict[str, object]:
    return {"error": error, "reason": reason}


class HistoryCollector(Collector):
    """The store's and the replays' numbers at scrape time."""

    def __init__(self, history: History) -> None:
        self._history = history

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        h = self._history
        if h.store is None or h.replays is None:
            return
        stats = h.store.stats()
        if h.store.backend == "sqlite":
            yield GaugeMetricFamily(
                f"{NAMESPACE}_store_events", "Events in the event store.", value=_num(stats, "events")
            )
            yield GaugeMetricFamily(
                f"{NAMESPACE}_store_bytes", "Envelope bytes in the event store.", value=_num(stats, "bytes")
            )
        else:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_store_spooled_events",
                "Events accepted and not yet shipped to PostgreSQL (grows while it is unreachable).",
                value=_num(stats, "spooled"),
            )
            yield CounterMetricFamily(
                f"{NAMESPACE}_store_shipped_events", "Events shipped to PostgreSQL.", value=_num(stats, "shipped")
            )
            yield GaugeMetricFamily(
                f"{NAMESPACE}_store_connected",
                "1 while the event store's PostgreSQL answers the shipping, else 0.",
                value=1.0 if stats.get("connected") else 0.0,
            )
        yield CounterMetricFamily(
            f"{NAMESPACE}_store_expired_events", "Events the store's expiry deleted.", value=_num(stats, "expired")
        )
        done = GaugeMetricFamily(f"{NAMESPACE}_replay_done_events", "Events a replay has sent.", labels=["replay"])
        total = GaugeMetricFamily(f"{NAMESPACE}_replay_total_events", "Events a replay will send.", labels=["replay"])
        rate = GaugeMetricFamily(
            f"{NAMESPACE}_replay_rate", "Events a second a running replay sends.", labels=["replay"]
        )
        for doc in h.replays.documents():
            rid = str(doc["id"])
            done.add_metric([rid], float(_num(doc, "done")))
            total.add_metric([rid], float(_num(doc, "total")))
            if doc["state"] == "running":
                rate.add_metric([rid], float(_num(doc, "rate")))
        yield done
        yield total
        yield rate


def _num(doc: Mapping[str, object], key: str) -> float:
    value = doc.get(key)
    return float(value) if isinstance(value, int | float) else 0.0
