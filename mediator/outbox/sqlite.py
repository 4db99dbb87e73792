"""The durable outbox: SQLite in WAL mode on its own thread, with group commit.

Every call from the event loop becomes an operation on one queue. The writer thread takes whatever has
queued up (up to ``max_batch`` operations) and runs it as ONE transaction, so a burst of commits shares
one fsync; then it resolves the callers' futures on the loop in one hop. The loop never touches SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from mediator.core.envelope import Envelope
from mediator.outbox.base import Accepted, DeadLetter, OnCommit, Pending, StorageError

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    envelope BLOB NOT NULL,
    refs INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    event INTEGER NOT NULL,
    route TEXT NOT NULL,
    outbound TEXT NOT NULL,
    address TEXT NOT NULL,
    format TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids an admin saw never come back for another letter
    envelope BLOB NOT NULL,
    route TEXT NOT NULL,
    outbound TEXT NOT NULL,
    address TEXT NOT NULL,
    format TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    at REAL NOT NULL
);
"""

_Work = Callable[[sqlite3.Connection], Any]
_Results = list[tuple[asyncio.Future[Any] | None, Any, BaseException | None, Callable[[Any], None] | None]]


class _Op:
    __slots__ = ("after", "failures", "future", "work")

    def __init__(
        self, work: _Work, future: asyncio.Future[Any] | None, after: Callable[[Any], None] | None = None
    ) -> None:
        self.work = work
        self.future = future
        self.after = after  # run on the loop with the result, whether or not the caller still waits
        self.failures = 0


LAZY_RETRIES = 5
"""A lazy write (delivery done, attempt count) that fails is carried into the next transactions this many
times before it is dropped (dropping it costs at most a redelivery after a restart)."""


class SqliteOutbox:
    def __init__(
        self, path: str | Path, *, synchronous: str = "full", max_batch: int = 512, dedup_window_s: float = 0.0
    ) -> None:
        self._path = Path(path)
        self._window = dedup_window_s
        self._last_prune = 0.0
        self._synchronous = synchronous.upper()
        self._max_batch = max_batch
        # Unbounded on purpose: producers are bounded upstream (max_pending and in-flight limits), and a
        # bounded queue here would block the event loop thread on put.
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._carried: list[_Op] = []  # lazy writes whose transaction failed (writer thread only)
        self.on_commit: OnCommit | None = None

    # ------------------------------------------------------------------ loop side
    async def open(self) -> list[Pending]:
        self._loop = asyncio.get_running_loop()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot open outbox {self._path}: {exc}") from exc
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="outbox-sqlite", daemon=True)
        self._thread.start()
        try:
            await ready
        except StorageError:
            self._thread = None  # the writer has exited: later calls must fail, not wait forever
            raise
        rows: list[Pending] = await self._call(_load_pending)
        log.info("outbox.opened", path=str(self._path), pending=len(rows))
        return rows

    async def commit(self, items: Sequence[Accepted]) -> list[Pending]:
        window = self._window
        now = time.time()
        if window > 0 and now - self._last_prune > min(window, 30.0):
            self._last_prune = now
            self._queue.put(_Op(lambda conn: conn.execute("DELETE FROM seen WHERE at < ?", (now - window,)), None))
        result: list[Pending] = await self._call(lambda conn: _commit(conn, items, window), self._committed)
        return result

    def _committed(self, rows: list[Pending]) -> None:
        if rows and self.on_commit is not None:
            self.on_commit(rows)

    def done(self, delivery: Pending) -> None:
        self._queue.put(_Op(lambda conn: _done(conn, delivery), None))

    def failed(self, delivery: Pending) -> None:
        attempts, row = delivery.attempts, delivery.id
        self._queue.put(
            _Op(lambda conn: conn.execute("UPDATE deliveries SET attempts=? WHERE id=?", (attempts, row)), None)
        )

    async def dead_letter(self, delivery: Pending, reason: str) -> None:
        await self._call(lambda conn: _bury(conn, delivery, reason))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        result: list[DeadLetter] = await self._call(lambda conn: _list_dead(conn, limit))
        return result

    async def replay(self, ids: Sequence[int] | None = None) -> list[Pending]:
        result: list[Pending] = await self._call(lambda conn: _replay(conn, ids))
        return result

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def _call(self, work: _Work, after: Callable[[Any], None] | None = None) -> Any:
        if self._thread is None or self._loop is None:
            raise StorageError("outbox is not open")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_Op(work, fut, after))
        return await fut

    # ------------------------------------------------------------------ writer thread
    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            failed: _Results = [(ready, None, StorageError(f"cannot open outbox {self._path}: {exc}"), None)]
            loop.call_soon_threadsafe(_settle, failed)
            return
        opened: _Results = [(ready, None, None, None)]
        loop.call_soon_threadsafe(_settle, opened)
        try:
            while True:
                op = self._queue.get()
                if op is None:
                    return
                batch = [op]
                stop = False
                while len(batch) < self._max_batch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._execute(conn, batch, loop)
                if stop:
                    return
        finally:
            conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[_Op], loop: asyncio.AbstractEventLoop) -> None:
        if self._carried:
            batch = self._carried + batch
            self._carried = []
        results: _Results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                results.append((op.future, op.work(conn), None, op.after))
            conn.execute("COMMIT")
        except Exception as exc:  # sqlite3.Error, or a bug in a unit of work: never kill the thread
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended the transaction
                conn.execute("ROLLBACK")
            err = StorageError(f"outbox write failed: {exc}")
            log.error("outbox.write_failed", error=str(exc), operations=len(batch))
            results = [(op.future, None, err, None) for op in batch]
            # Callers of the failed commits are told; lazy writes have no caller, so they are carried over
            # (losing a "done" would only mean a redelivery, but there is no need to lose it).
            for op in batch:
                if op.future is None:
                    op.failures += 1
                    if op.failures < LAZY_RETRIES:
                        self._carried.append(op)
        settled = [r for r in results if r[0] is not None]
        if settled:
            loop.call_soon_threadsafe(_settle, settled)


def _settle(results: _Results) -> None:
    for fut, value, err, after in results:
        if after is not None:
            after(value)
        if fut is None or fut.done():
            continue  # the caller was cancelled: its commit stands, it just no longer waits
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)


# ---------------------------------------------------------------------- SQL, run on the writer thread
def _commit(conn: sqlite3.Connection, items: Sequence[Accepted], window: float) -> list[Pending]:
    out: list[Pending] = []
    now = time.time()
    for item in items:
        if item.dedup_key is not None and window > 0:
            # New key, or one last seen before the window: (re)claim it. Otherwise a duplicate: skip.
            claimed = conn.execute(
                "INSERT INTO seen(key, at) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET at = excluded.at"
                " WHERE seen.at < ?",
                (item.dedup_key, now, now - window),
            ).rowcount
            if not claimed:
                continue
        blob = item.event.SerializeToString()
        if item.dead_reason is not None:
            conn.execute(
                "INSERT INTO dead_letters(envelope,route,outbound,address,format,reason,attempts,at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (blob, "", "", "", "", item.dead_reason, 0, now),
            )
            continue
        for fail in item.failures:
            conn.execute(
                "INSERT INTO dead_letters(envelope,route,outbound,address,format,reason,attempts,at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (blob, fail.route, fail.outbound, "", "", fail.reason, 0, now),
            )
        if not item.deliveries:
            continue
        row = conn.execute("INSERT INTO events(envelope, refs) VALUES (?, ?)", (blob, len(item.deliveries))).lastrowid
        assert row is not None
        for d in item.deliveries:
            did = conn.execute(
                "INSERT INTO deliveries(event,route,outbound,address,format) VALUES (?,?,?,?,?)",
                (row, d.route, d.outbound, d.address, d.format),
            ).lastrowid
            assert did is not None
            out.append(Pending(did, item.event, d.route, d.outbound, d.address, d.format, 0, row))
    return out


def _done(conn: sqlite3.Connection, d: Pending) -> None:
    if conn.execute("DELETE FROM deliveries WHERE id=?", (d.id,)).rowcount:
        conn.execute("UPDATE events SET refs=refs-1 WHERE id=?", (d.event_row,))
        conn.execute("DELETE FROM events WHERE id=? AND refs<=0", (d.event_row,))


def _bury(conn: sqlite3.Connection, d: Pending, reason: str) -> None:
    conn.execute(
        "INSERT INTO dead_letters(envelope,route,outbound,address,format,reason,attempts,at) VALUES (?,?,?,?,?,?,?,?)",
        (d.event.SerializeToString(), d.route, d.outbound, d.address, d.format, reason, d.attempts, time.time()),
    )
    _done(conn, d)


def _load_pending(conn: sqlite3.Connection) -> list[Pending]:
    out = []
    cache: dict[int, Envelope] = {}
    rows = conn.execute(
        "SELECT d.id, d.event, d.route, d.outbound, d.address, d.format, d.attempts, e.envelope"
        " FROM deliveries d JOIN events e ON e.id = d.event ORDER BY d.id"
    )
    for did, row, route, outbound, address, fmt, attempts, blob in rows:
        env = cache.get(row)
        if env is None:
            env = cache[row] = Envelope.FromString(blob)
        out.append(Pending(did, env, route, outbound, address, fmt, attempts, row))
    return out


def _list_dead(conn: sqlite3.Connection, limit: int) -> list[DeadLetter]:
    rows = conn.execute(
        "SELECT id, envelope, route, outbound, address, format, reason, attempts, at"
        " FROM dead_letters ORDER BY id LIMIT ?",
        (limit,),
    )
    return [
        DeadLetter(i, Envelope.FromString(blob), route, outbound, address, fmt, reason, attempts, at)
        for i, blob, route, outbound, address, fmt, reason, attempts, at in rows
    ]


def _replay(conn: sqlite3.Connection, ids: Sequence[int] | None) -> list[Pending]:
    # format '' marks a dead letter that never had a rendered destination: re-publish it instead.
    query = "SELECT id, envelope, route, outbound, address, format FROM dead_letters WHERE format != ''"
    rows = conn.execute(query + " ORDER BY id").fetchall()
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if r[0] in wanted]
    out = []
    for i, blob, route, outbound, address, fmt in rows:
        row = conn.execute("INSERT INTO events(envelope, refs) VALUES (?, 1)", (blob,)).lastrowid
        assert row is not None
        did = conn.execute(
            "INSERT INTO deliveries(event,route,outbound,address,format) VALUES (?,?,?,?,?)",
            (row, route, outbound, address, fmt),
        ).lastrowid
        assert did is not None
        conn.execute("DELETE FROM dead_letters WHERE id=?", (i,))
        out.append(Pending(did, Envelope.FromString(blob), route, outbound, address, fmt, 0, row))
    return out
