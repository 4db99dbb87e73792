"""The event store on PostgreSQL (asyncpg), shared by every daemon configured with the same DSN.

Nothing accepted is lost to an unreachable server, and the intake never waits for PostgreSQL: every commit
of the outbox first writes its events into the outbox's own ``events`` table, in the same transaction (the
SQLite backend's table and code, mediator/history/sqlite.py), which is then a spool: a shipper task reads
its oldest rows (a bounded batch, on a thread), inserts them into PostgreSQL in one transaction, and only
then deletes them from the spool (a bounded DELETE in the outbox's group commit). A crash in between
ships the batch again; ``(origin, origin_seq)`` is unique, so the repeat inserts nothing. While the server
is down the shipper backs off (up to ``MAX_BACKOFF_S``) and the spool grows on disk (no bound but the
disk: dropping would lose accepted events silently); ``/admin/status`` and ``/metrics`` show its size and
the last error (``mediator_store_connected`` 0). Not a health component: ``/readyz`` stays ready, because
intake and delivery do not need PostgreSQL, and a shared server's outage must not take every daemon
behind a load balancer out of it at once. Queries go to PostgreSQL, so an event is queryable once shipped
(a batch: milliseconds).

Expiry runs in every daemon, in bounded batches, ``FOR UPDATE SKIP LOCKED`` so that two daemons expiring
at once never wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from mediator.core.errors import ConfigError
from mediator.history.base import EventQuery, Page, StoredEvent, filters, matches, order_by, stored_event
from mediator.history.config import StoreConfig
from mediator.history.sqlite import SCAN_CHUNK, Totals, prepare, tee_into
from mediator.outbox.base import StorageError
from mediator.outbox.sqlite import SqliteOutbox

log = structlog.get_logger(__name__)

MAX_BACKOFF_S = 10.0
IDLE_S = 0.05
"""The shipper looks at the spool this often while it is empty."""

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS mediator_events (
    seq BIGSERIAL PRIMARY KEY,
    origin TEXT NOT NULL,  -- the daemon that accepted it (its outbox's store id)
    origin_seq BIGINT NOT NULL,  -- its seq in that daemon's spool: a batch shipped twice inserts once
    received DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    inbound TEXT NOT NULL,
    principal TEXT NOT NULL,
    size INTEGER NOT NULL,
    envelope BYTEA NOT NULL,
    UNIQUE (origin, origin_seq)
);
CREATE INDEX IF NOT EXISTS mediator_events_received ON mediator_events(received);
CREATE INDEX IF NOT EXISTS mediator_events_expires ON mediator_events(expires);
CREATE INDEX IF NOT EXISTS mediator_events_type ON mediator_events(type, received);
CREATE INDEX IF NOT EXISTS mediator_events_source ON mediator_events(source, received);
CREATE INDEX IF NOT EXISTS mediator_events_subject ON mediator_events(subject, received) WHERE subject IS NOT NULL;
CREATE INDEX IF NOT EXISTS mediator_events_id ON mediator_events(id);
"""
LOCK_KEY = 7_224_022
"""pg_advisory_xact_lock key: two daemons starting at once create the schema one after the other."""


def dollar(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (the shared filters are written with ``?``)."""
    parts = sql.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


def dsn_of(cfg: StoreConfig) -> str:
    if not cfg.dsn_env:
        raise ConfigError("config", ["store.dsn_env: backend = 'postgresql' needs the DSN's environment variable"])
    dsn = os.environ.get(cfg.dsn_env)
    if not dsn:
        raise ConfigError("environment", [f"store.dsn_env: environment variable {cfg.dsn_env} is not set"])
    return dsn


class PostgresEventStore:
    backend = "postgresql"

    def __init__(self, outbox: SqliteOutbox, cfg: StoreConfig) -> None:
        self._outbox = outbox
        self._cfg = cfg
        self._dsn = dsn_of(cfg)
        self.connected = False  # the last shipping attempt reached PostgreSQL
        self._pool: asyncpg.Pool | None = None
        self.spool = Totals()  # what the outbox's table holds: not shipped yet
        self.shipped = 0
        self.expired = 0
        self.last_error: str | None = None
        self.origin = ""

    async def open(self) -> None:
        """The spool first (intake may start at once); PostgreSQL is connected by ``run`` with backoff, so a
        server that is down at start delays only the shipping."""
        try:
            self.spool.events, self.spool.bytes = await self._outbox.transact(prepare)
            self.origin = await self._outbox.transact(_origin)
        except StorageError as exc:
            raise StorageError(f"cannot open the event store's spool: {exc}") from exc
        tee_into(self._outbox, self._cfg, self.spool)
        log.info("store.opened", backend=self.backend, origin=self.origin, spooled=self.spool.events)

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is None:
            pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4, command_timeout=30)
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
                    await conn.execute(PG_SCHEMA)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
        return self._pool

    async def close(self) -> None:
        self._outbox.tee = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._pool.close()
            self._pool = None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._ship_loop(), name="store:ship")
            tg.create_task(self._expiry_loop(), name="store:expiry")

    def _failed(self, what: str, exc: BaseException) -> None:
        self.last_error = f"{what}: {exc}"
        log.warning("store.postgres_failed", action=what, error=str(exc), spooled=self.spool.events)
        self.connected = False

    async def _ship_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                shipped = await self.ship_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, StorageError) as exc:
                self._failed("ship", exc)
                if self._pool is not None:  # a fresh pool after an outage: the old connections are dead
                    pool, self._pool = self._pool, None
                    with contextlib.suppress(Exception):
                        pool.terminate()
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            backoff = 0.5
            if not self.connected:
                log.info("store.postgres_connected", spooled=self.spool.events)
                self.connected, self.last_error = True, None
            if not shipped:
                await asyncio.sleep(IDLE_S)

    async def ship_once(self) -> int:
        """Ship the oldest spooled batch; returns how many rows it held."""
        pool = await self._connect()
        rows = await asyncio.to_thread(_spooled, self._outbox.path, self._cfg.pg_batch)
        if not rows:
            return 0
        origin = self.origin
        async with asyncio.timeout(30), pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO mediator_events(origin, origin_seq, received, expires, id, source, type, subject,"
                " inbound, principal, size, envelope) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
                " ON CONFLICT (origin, origin_seq) DO NOTHING",
                [(origin, *row) for row in rows],
            )
        last = rows[-1][0]
        size = sum(r[9] for r in rows)

        def unspool(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM events WHERE seq <= ?", (last,))
            conn.execute("UPDATE event_totals SET events = events - ?, bytes = bytes - ?", (len(rows), size))

        await self._outbox.transact(unspool)
        self.spool.events -= len(rows)
        self.spool.bytes -= size
        self.shipped += len(rows)
        return len(rows)

    async def _expiry_loop(self) -> None:
        while True:
            full = False
            try:
                full = await self.expire_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self._failed("expire", exc)
            await asyncio.sleep(0.05 if full else self._cfg.expiry_interval_s)

    async def expire_once(self, now: float | None = None) -> bool:
        if self._pool is None:
            return False
        cfg = self._cfg
        batch = cfg.expiry_batch
        when = time.time() if now is None else now
        async with asyncio.timeout(30), self._pool.acquire() as conn:
            deleted = await conn.fetchval(
                "WITH gone AS (DELETE FROM mediator_events WHERE seq IN (SELECT seq FROM mediator_events"
                " WHERE expires < $1 ORDER BY expires LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1)"
                " SELECT count(*) FROM gone",
                when,
                batch,
            )
            count = int(deleted or 0)
            if cfg.max_events is not None and count < batch:
                # The size bound: an estimate is enough to decide, the DELETE is bounded anyway.
                total = int(await conn.fetchval("SELECT count(*) FROM mediator_events"))
                over = min(batch - count, total - cfg.max_events)
                if over > 0:
                    more = await conn.fetchval(
                        "WITH gone AS (DELETE FROM mediator_events WHERE seq IN (SELECT seq FROM mediator_events"
                        " ORDER BY received, seq LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING 1)"
                        " SELECT count(*) FROM gone",
                        over,
                    )
                    count += int(more or 0)
        self.expired += count
        return count >= batch

    async def _pg(self) -> asyncpg.Pool:
        try:
            return await self._connect()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StorageError(f"the event store (PostgreSQL) cannot be reached: {exc}") from exc

    async def query(self, q: EventQuery) -> Page:
        pool = await self._pg()
        where, args = filters(q, "LIKE")
        sql = dollar(
            f"SELECT seq, received, envelope FROM mediator_events {'WHERE ' + ' AND '.join(where) if where else ''}"
            f" {order_by(q)}"
        )
        page = Page()
        try:
            async with asyncio.timeout(30), pool.acquire() as conn:
                if q.where is None:
                    rows = await conn.fetch(sql + f" LIMIT {q.limit + 1}", *args)
                    page.events = [stored_event(r[0], r[1], r[2]) for r in rows[: q.limit]]
                    page.examined = len(page.events)
                    if len(rows) > q.limit:
                        page.next = (page.events[-1].received, page.events[-1].seq)
                    return page
                budget = q.max_examined
                async with conn.transaction():
                    cur = await conn.cursor(sql + f" LIMIT {budget + 1}", *args)
                    last: tuple[float, int] | None = None
                    exhausted = False
                    while len(page.events) < q.limit and page.examined < budget:
                        chunk = await cur.fetch(min(SCAN_CHUNK, budget - page.examined))
                        if not chunk:
                            exhausted = True
                            break
                        for i, r in enumerate(chunk):
                            page.examined += 1
                            last = (r[1], r[0])
                            event = stored_event(r[0], r[1], r[2])
                            if matches(q.where, event.event):
                                page.events.append(event)
                                if len(page.events) >= q.limit:
                                    exhausted = i == len(chunk) - 1 and not await cur.fetch(1)
                                    break
                    page.next = None if exhausted or last is None else last
                    return page
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StorageError(f"the event store (PostgreSQL) failed: {exc}") from exc

    async def count(self, q: EventQuery) -> int:
        pool = await self._pg()
        where, args = filters(q, "LIKE")
        cond = f"{'WHERE ' + ' AND '.join(where) if where else ''}"
        try:
            async with pool.acquire() as conn:
                if q.where is None:
                    return int(await conn.fetchval(dollar(f"SELECT count(*) FROM mediator_events {cond}"), *args))
                total = 0
                async with conn.transaction():
                    async for r in conn.cursor(dollar(f"SELECT envelope FROM mediator_events {cond}"), *args):
                        if matches(q.where, stored_event(0, 0.0, r[0]).event):
                            total += 1
                return total
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StorageError(f"the event store (PostgreSQL) failed: {exc}") from exc

    async def get(self, event_id: str, source: str | None = None) -> StoredEvent | None:
        pool = await self._pg()
        sql = "SELECT seq, received, envelope FROM mediator_events WHERE id = $1"
        args: list[Any] = [event_id]
        if source is not None:
            sql += " AND source = $2"
            args.append(source)
        try:
            async with pool.acquire() as conn:
                row = await conn.fetchrow(sql + " ORDER BY received DESC, seq DESC LIMIT 1", *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StorageError(f"the event store (PostgreSQL) failed: {exc}") from exc
        return None if row is None else stored_event(row[0], row[1], row[2])

    def stats(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "connected": self.connected,
            "spooled": self.spool.events,
            "spooled_bytes": self.spool.bytes,
            "shipped": self.shipped,
            "written": self.spool.written,
            "expired": self.expired,
            "error": self.last_error,
        }


def _origin(conn: sqlite3.Connection) -> str:
    """This outbox's id in the shared store, made once and kept in the outbox's database."""
    conn.execute("CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = conn.execute("SELECT value FROM store_meta WHERE key = 'origin'").fetchone()
    if row is not None:
        return str(row[0])
    origin = uuid.uuid4().hex
    conn.execute("INSERT INTO store_meta VALUES ('origin', ?)", (origin,))
    return origin


def _spooled(path: Path, limit: int) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        return conn.execute(
            "SELECT seq, received, expires, id, source, type, subject, inbound, principal, size, envelope"
            " FROM events ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
    finally:
        conn.close()
