"""The event store in the outbox's SQLite database, written in the outbox's own transactions.

Why in the outbox's file and transaction: the group commit already pays one fsync per batch of accepted
events; rows written in that same transaction (``SqliteOutbox.tee``) are durable with it, so storing costs
the inserts (a few microseconds per event on the loop) and no fsync of its own. Expiry is a bounded DELETE
in a transaction of the same group commit (``expiry_batch`` rows at most: a few milliseconds), again at
once while a batch comes back full, so intake waits for at most one batch. Queries run on a worker thread,
each with a connection of its own: WAL readers never block the writer, and sqlite3 releases the GIL while
it reads.

The same table is the PostgreSQL backend's spool (mediator/history/postgres.py): what was accepted is
durable here first, and shipped from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from mediator.history.base import (
    COLUMNS,
    EventQuery,
    Page,
    Retention,
    StoredEvent,
    filters,
    matches,
    order_by,
    rows_of,
    stored_event,
)
from mediator.history.config import StoreConfig
from mediator.outbox.base import Accepted, StorageError
from mediator.outbox.sqlite import SqliteOutbox

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    -- insertion order: with received, a page's order and its cursor. AUTOINCREMENT: a seq is never used
    -- twice, even once every row expired or was shipped (PostgreSQL keys a shipped row by it)
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received REAL NOT NULL,  -- Unix seconds, the gateway's clock
    expires REAL NOT NULL,  -- received + the retention of the event's type
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    inbound TEXT NOT NULL,
    principal TEXT NOT NULL,
    size INTEGER NOT NULL,  -- of envelope, so that expiry keeps the byte count without reading blobs
    envelope BLOB NOT NULL  -- the canonical envelope (Protobuf), provenance included
);
CREATE INDEX IF NOT EXISTS events_received ON events(received);
CREATE INDEX IF NOT EXISTS events_type ON events(type, received);
CREATE INDEX IF NOT EXISTS events_source ON events(source, received);
CREATE INDEX IF NOT EXISTS events_subject ON events(subject, received) WHERE subject IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_id ON events(id);
CREATE TABLE IF NOT EXISTS event_totals (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    events INTEGER NOT NULL,  -- kept in the inserting transaction: no COUNT(*) over a million rows at start
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO event_totals VALUES (1, 0, 0);
"""
INSERT = "INSERT INTO events(received,expires,id,source,type,subject,inbound,principal,size,envelope)" + (
    " VALUES (?,?,?,?,?,?,?,?,?,?)"
)
FULL_BATCH_PAUSE_S = 0.05
"""After an expiry batch came back full, the next one runs this much later: intake goes on in between."""
SCAN_CHUNK = 500
"""Rows a ``where`` query fetches per step."""


class Totals:
    """What the store holds and has expired, as the transactions that wrote it left it."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0
        self.expired = 0
        self.written = 0
        self.expiry_batches = 0  # expiry statements that deleted something
        self.largest_batch = 0  # the most one of them deleted (at most expiry_batch)


def tee_into(outbox: SqliteOutbox, cfg: StoreConfig, totals: Totals) -> None:
    """Make every commit of ``outbox`` also store its accepted events (in the same transaction)."""
    retention = Retention(cfg)

    def tee(
        conn: sqlite3.Connection, items: Sequence[Accepted], skipped: Sequence[int], blobs: Sequence[bytes]
    ) -> None:
        rows = rows_of(items, skipped, retention, blobs)
        if not rows:
            return
        conn.executemany(INSERT, rows)
        size = sum(r[8] for r in rows)
        conn.execute("UPDATE event_totals SET events = events + ?, bytes = bytes + ?", (len(rows), size))
        # Counted before the COMMIT: one that then fails (disk full) leaves them high until the next start
        totals.events += len(rows)
        totals.bytes += size
        totals.written += len(rows)

    outbox.tee = tee


EXPIRES_INDEX = "CREATE INDEX IF NOT EXISTS events_expires ON events(expires)"
"""Only with [[store.overrides]]: without them ``expires`` is ``received`` + one retention, so expiry goes by
the ``received`` index, and every insert saves one B-tree (measured: about a tenth of what storing costs)."""


def prepare(conn: sqlite3.Connection, overrides: bool = False) -> tuple[int, int]:
    """Inside a transaction of the outbox's (``executescript`` would commit it: one statement at a time)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    if overrides:
        conn.execute(EXPIRES_INDEX)
    row = conn.execute("SELECT events, bytes FROM event_totals").fetchone()
    return int(row[0]), int(row[1])


class SqliteEventStore:
    backend = "sqlite"

    def __init__(self, outbox: SqliteOutbox, cfg: StoreConfig) -> None:
        self._outbox = outbox
        self._cfg = cfg
        self.totals = Totals()
        self._max_bytes = cfg.max_bytes_value

    @property
    def path(self) -> Path:
        return self._outbox.path

    async def open(self) -> None:
        """After the outbox opened: create the table (in a transaction of the outbox's) and read the totals,
        then tee every commit into it."""
        try:
            overrides = bool(self._cfg.overrides)
            self.totals.events, self.totals.bytes = await self._outbox.transact(lambda c: prepare(c, overrides))
        except StorageError as exc:
            raise StorageError(f"cannot open the event store: {exc}") from exc
        tee_into(self._outbox, self._cfg, self.totals)
        log.info("store.opened", backend=self.backend, events=self.totals.events, bytes=self.totals.bytes)

    async def close(self) -> None:
        self._outbox.tee = None

    async def run(self) -> None:
        while True:
            try:
                full = await self.expire_once()
            except StorageError as exc:
                log.warning("store.expiry_failed", error=str(exc))
                full = False
            await asyncio.sleep(FULL_BATCH_PAUSE_S if full else self._cfg.expiry_interval_s)

    async def expire_once(self, now: float | None = None) -> bool:
        """One bounded expiry batch; True when it came back full (more to expire)."""
        cfg = self._cfg
        batch = cfg.expiry_batch
        totals = self.totals
        when = time.time() if now is None else now
        over = 0
        if cfg.max_events is not None and totals.events > cfg.max_events:
            over = totals.events - cfg.max_events
        if self._max_bytes is not None and totals.bytes > self._max_bytes and totals.events:
            per = max(1, totals.bytes // totals.events)
            over = max(over, (totals.bytes - self._max_bytes + per - 1) // per)

        # Without overrides, expires = received + retention: the received index finds the expired rows.
        by, horizon = ("expires", when) if cfg.overrides else ("received", when - cfg.retention_s)

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            sizes = conn.execute(
                f"DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE {by} < ? ORDER BY {by} LIMIT ?)"
                " RETURNING size",
                (horizon, batch),
            ).fetchall()
            room = batch - len(sizes)
            if over and room > 0:  # the size bounds: the oldest go first
                sizes += conn.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?) RETURNING size",
                    (min(room, over),),
                ).fetchall()
            count, size = len(sizes), sum(s for (s,) in sizes)
            if count:
                conn.execute("UPDATE event_totals SET events = events - ?, bytes = bytes - ?", (count, size))
            return count, size

        count: int
        size: int
        count, size = await self._outbox.transact(work)
        if count:
            totals.events -= count
            totals.bytes -= size
            totals.expired += count
            totals.expiry_batches += 1
            totals.largest_batch = max(totals.largest_batch, count)
            log.debug("store.expired", events=count, bytes=size)
        return count >= batch

    async def query(self, q: EventQuery) -> Page:
        page: Page = await self._read(lambda conn: _query(conn, q))
        return page

    async def count(self, q: EventQuery) -> int:
        count: int = await self._read(lambda conn: _count(conn, q))
        return count

    async def get(self, event_id: str, source: str | None = None) -> StoredEvent | None:
        found: StoredEvent | None = await self._read(lambda conn: _get(conn, event_id, source))
        return found

    async def _read(self, work: Any) -> Any:
        try:
            return await asyncio.to_thread(_reading, self.path, work)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the event store: {exc}") from exc

    def stats(self) -> dict[str, object]:
        t = self.totals
        return {
            "backend": self.backend,
            "events": t.events,
            "bytes": t.bytes,
            "expired": t.expired,
            "expiry_batches": t.expiry_batches,
            "largest_expiry_batch": t.largest_batch,
        }


def _reading(path: Path, work: Any) -> Any:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        return work(conn)
    finally:
        conn.close()


def _query(conn: sqlite3.Connection, q: EventQuery) -> Page:
    where, args = filters(q, "GLOB")
    sql = f"SELECT seq, received, envelope FROM events {'WHERE ' + ' AND '.join(where) if where else ''} {order_by(q)}"
    page = Page()
    if q.where is None:
        rows = conn.execute(sql + " LIMIT ?", (*args, q.limit + 1)).fetchall()
        page.events = [stored_event(seq, received, blob) for seq, received, blob in rows[: q.limit]]
        page.examined = len(page.events)
        if len(rows) > q.limit:
            page.next = (page.events[-1].received, page.events[-1].seq)
        return page
    # A ``where``: rows are examined in order until the page is full or its budget of rows is spent; the
    # cursor is then the last row examined, so the next page goes on from there.
    budget = q.max_examined
    cursor = conn.execute(sql, args)
    last: tuple[float, int] | None = None
    exhausted = False
    with contextlib.closing(cursor):
        while len(page.events) < q.limit and page.examined < budget:
            chunk = cursor.fetchmany(min(SCAN_CHUNK, budget - page.examined))
            if not chunk:
                exhausted = True
                break
            for i, (seq, received, blob) in enumerate(chunk):
                page.examined += 1
                last = (received, seq)
                event = stored_event(seq, received, blob)
                if matches(q.where, event.event):
                    page.events.append(event)
                    if len(page.events) >= q.limit:
                        exhausted = i == len(chunk) - 1 and cursor.fetchone() is None
                        break
    page.next = None if exhausted or last is None else last
    return page


def _count(conn: sqlite3.Connection, q: EventQuery) -> int:
    if q.where is None:
        where, args = filters(q, "GLOB")
        sql = f"SELECT COUNT(*) FROM events {'WHERE ' + ' AND '.join(where) if where else ''}"
        return int(conn.execute(sql, args).fetchone()[0])
    where, args = filters(q, "GLOB")
    sql = f"SELECT envelope FROM events {'WHERE ' + ' AND '.join(where) if where else ''}"
    pred = q.where
    total = 0
    for (blob,) in conn.execute(sql, args):
        if matches(pred, stored_event(0, 0.0, blob).event):
            total += 1
    return total


def _get(conn: sqlite3.Connection, event_id: str, source: str | None) -> StoredEvent | None:
    sql = "SELECT seq, received, envelope FROM events WHERE id = ?"
    args: list[object] = [event_id]
    if source is not None:
        sql += " AND source = ?"
        args.append(source)
    row = conn.execute(sql + " ORDER BY seq DESC LIMIT 1", args).fetchone()
    return None if row is None else stored_event(*row)


__all__ = ["COLUMNS", "SqliteEventStore", "tee_into"]
