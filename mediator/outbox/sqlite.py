"""The durable outbox: SQLite in WAL mode, with group commit.

Why the statements run on the event loop thread and only the fsync does not: with the connection at
``synchronous=OFF`` a transaction only writes into the OS page cache (tens of microseconds for a batch),
so it is not blocking I/O; the blocking part, making the WAL durable, is one ``os.fsync`` of the WAL file
on a syncer thread, which holds no GIL while it waits. The first design ran every statement on a writer
thread instead, and lost three quarters of its throughput to the GIL: each statement released and
re-took the GIL, and each re-take waited for the busy loop thread (measured: 30 ms per batch, HTTP -> AMQP
at 800 req/s against 3,000 with the statements on the loop).

Group commit: operations queue up and run as ONE transaction; the callers wait until the syncer has
fsynced past it. With the syncer idle, the queue is written at the end of the loop iteration. With the
syncer busy, at most one more transaction is written ahead (the next fsync's); everything arriving after
that waits for the running fsync to finish and then goes into a single transaction. The callers would wait
for that fsync anyway, so holding them costs no latency, and it saves most of the per-transaction cost
(~0.3 ms of CPU on the loop): an inbound that hands over one message per loop iteration (MQTT does) would
otherwise write one transaction per message. Checkpoints (copying the WAL into the database file) also
run on the syncer thread, on a connection of its own, so the loop never waits for one.

``synchronous = "normal"`` skips the fsync: an acknowledged event then survives the daemon's crash (it is
in the OS page cache) but not the machine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from mediator.core.envelope import Envelope
from mediator.outbox.base import Accepted, AuditEntry, DeadLetter, OnCommit, OutboxStats, Pending, StorageError

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,  -- assigned by the outbox (one writer), so a batch inserts with executemany
    envelope BLOB NOT NULL,  -- the event, once per delivery: one row written and one deleted per delivery
    route TEXT NOT NULL,
    outbound TEXT NOT NULL,
    address TEXT NOT NULL,
    format TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS delivered (
    -- one row per completed delivery, for the delivery status (mediator/status.py), written in the same
    -- transaction that deletes the delivery row; rowid order is completion order, so expiry deletes a prefix
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    inbound TEXT NOT NULL,
    principal TEXT NOT NULL,
    route TEXT NOT NULL,
    outbound TEXT NOT NULL,
    address TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    at REAL NOT NULL
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
CREATE TABLE IF NOT EXISTS audit (
    -- what operators did to the dead letters (replay, edit, delete): who, when, what; never payloads
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
MIGRATE_FROM_1 = """
ALTER TABLE deliveries RENAME TO deliveries_v1;
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    envelope BLOB NOT NULL,
    route TEXT NOT NULL,
    outbound TEXT NOT NULL,
    address TEXT NOT NULL,
    format TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
INSERT INTO deliveries(id, envelope, route, outbound, address, format, attempts)
    SELECT d.id, e.envelope, d.route, d.outbound, d.address, d.format, d.attempts
    FROM deliveries_v1 d JOIN events e ON e.id = d.event;
DROP TABLE deliveries_v1;
DROP TABLE events;
"""
"""Version 1 kept each event once in ``events`` with a reference count, and its deliveries apart: five
statements per single-destination delivery instead of two."""

_Work = Callable[[sqlite3.Connection], Any]
Tee = Callable[[sqlite3.Connection, Sequence[Accepted], Sequence[int], Sequence[bytes]], None]
"""Run inside every commit's transaction with its items, the positions the dedup window skipped and each
item's serialized event where the commit made it (b"" where not): the event store (mediator/history/sqlite.py)
writes its rows there, so storing costs no fsync of its own, and no second serialization."""
DeliveredRow = tuple[str, str, str, str, str, str, str, int, float]
"""A ``delivered`` row: event id, source, inbound, principal, route, outbound, address, attempts, when."""

LAZY_FLUSH_S = 0.2
"""The longest a lazy write (a delivery done, an attempt counted) waits for a commit to ride along with."""
LAZY_RETRIES = 5
"""A lazy write whose transaction failed is carried into the next ones this many times, then dropped
(dropping one costs at most a redelivery after a restart)."""
CHECKPOINT_INTERVAL_S = 1.0
"""The syncer checkpoints (copies the WAL into the database) at most this often while writes go on."""
MAX_UNSYNCED = 2
"""Transactions written and not yet fsynced: the one being synced and the one the next fsync covers.
Past that, new operations are held until an fsync completes (see the module docstring)."""
WAL_SIZE_LIMIT = 16 * 1024 * 1024
DELIVERED_PRUNE_INTERVAL_S = 1.0
"""How often the ``delivered`` rows past the status window (or past its count) are deleted, at most."""
DELIVERED_PRUNE_BATCH = 4096
"""Rows one prune looks at (the oldest): a bounded statement, riding a lazy transaction."""
"""The WAL file is truncated back to this size when a checkpoint lets it restart."""


class _Op:
    __slots__ = ("after", "failures", "future", "work")

    def __init__(
        self, work: _Work, future: asyncio.Future[Any] | None, after: Callable[[Any], None] | None = None
    ) -> None:
        self.work = work
        self.future = future
        self.after = after  # run with the result once written (before the fsync), even if the caller left
        self.failures = 0


class _Syncer(threading.Thread):
    """fsyncs the WAL up to the newest committed generation, then checkpoints when the WAL is large.

    Owns ``fd`` (the WAL file) and ``checkpointer`` (a connection of its own), both opened by the caller
    so that a failure to open them is an error of ``open()``, not a silent thread death.
    """

    def __init__(
        self,
        fd: int,
        checkpointer: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        release: Callable[[int, str | None], None],
    ) -> None:
        super().__init__(name="outbox-syncer", daemon=True)
        self._fd = fd
        self._checkpointer = checkpointer
        self._loop = loop
        self._release = release
        self._cv = threading.Condition()
        self._wanted = 0
        self._stopping = False
        self.failed: str | None = None

    def want(self, generation: int) -> None:
        with self._cv:
            self._wanted = generation
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def run(self) -> None:
        synced = 0
        last_checkpoint = time.monotonic()
        try:
            while True:
                with self._cv:
                    while self._wanted <= synced and not self._stopping:
                        self._cv.wait()
                    target, stop = self._wanted, self._stopping
                if target > synced:
                    error: str | None = None
                    try:
                        os.fsync(self._fd)
                    except OSError as exc:
                        # After a failed fsync the kernel may have dropped the dirty pages: nothing written
                        # since can be called durable, so every later commit is refused until a restart
                        # (as PostgreSQL does), rather than trusting a retry of the same fsync.
                        error = f"fsync of the outbox WAL failed: {exc}; restart the daemon"
                        self.failed = error
                    last_sync = time.monotonic()
                    synced = target
                    self._loop.call_soon_threadsafe(self._release, target, error)
                    # The WAL file keeps its size after a checkpoint resets it, so checkpoints go by time:
                    # the WAL holds at most CHECKPOINT_INTERVAL_S of writes.
                    if error is None and last_sync - last_checkpoint > CHECKPOINT_INTERVAL_S:
                        last_checkpoint = last_sync
                        try:
                            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
                        except sqlite3.Error as exc:
                            log.warning("outbox.checkpoint_failed", error=str(exc))
                if stop and self._wanted <= synced:
                    with contextlib.suppress(sqlite3.Error):
                        self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    return
        except Exception as exc:  # never leave committers waiting on a dead thread
            self.failed = f"outbox syncer stopped: {exc!r}"
            log.error("outbox.syncer_failed", error=self.failed)
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.call_soon_threadsafe(self._release, 2**62, self.failed)
        finally:
            self._checkpointer.close()
            os.close(self._fd)


class SqliteOutbox:
    def __init__(
        self, path: str | Path, *, synchronous: str = "full", max_batch: int = 512, dedup_window_s: float = 0.0
    ) -> None:
        self._path = Path(path)
        self._fsync = synchronous.lower() == "full"
        self._max_batch = max_batch
        self._window = dedup_window_s
        self._last_prune = 0.0
        self.on_commit: OnCommit | None = None
        self.tee: Tee | None = None
        # Called on the loop after each transaction with its operations and the seconds it took to write
        # (BEGIN to COMMIT, not the fsync): how well commits group, for the metrics.
        self.on_transaction: Callable[[int, float], None] | None = None
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._syncer: _Syncer | None = None
        self._ops: list[_Op] = []  # waiting for the next transaction
        self._lazy: list[_Op] = []  # lazy writes waiting to ride along
        self._flush_handle: asyncio.Handle | None = None
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._generation = 0
        self._unsynced: deque[tuple[int, list[tuple[_Op, Any]]]] = deque()
        self._transactions = 0  # reported at close: operations per transaction shows how well commits group
        self._operations = 0
        self._next_id = 1  # the next delivery id (set by open: one past the largest stored)
        self._done_ids: list[tuple[int]] = []  # deliveries done, deleted with the next transaction
        # Set (by the daemon) to keep a ``delivered`` row per completed delivery for status_window_s, at most
        # status_max_events rows; 0: none kept.
        self.status_window_s = 0.0
        self.status_max_events = 0
        self._delivered: list[DeliveredRow] = []  # beside _done_ids
        self._last_delivered_prune = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> list[Pending]:
        self._loop = asyncio.get_running_loop()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=0.1)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # durability comes from the syncer's fsync
            conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints belong to the syncer thread
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # Startup only, before anything else uses the connection: may read many rows.
            rows, self._next_id = await asyncio.to_thread(_prepare, conn)
            fd = os.open(f"{self._path}-wal", os.O_RDONLY)  # WAL mode created it with the first write
            checkpointer = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            checkpointer.execute("PRAGMA synchronous=FULL")  # a checkpoint fsyncs the WAL and the database
            await asyncio.to_thread(_fsync_dir, self._path.parent)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open outbox {self._path}: {exc}") from exc
        self._conn = conn
        self._syncer = _Syncer(fd, checkpointer, self._loop, self._release)
        self._syncer.start()
        log.info("outbox.opened", path=str(self._path), pending=len(rows), fsync=self._fsync)
        return rows

    async def close(self) -> None:
        if self._conn is None:
            return
        if self._ops or self._lazy or self._done_ids or self._delivered:
            self._flush()
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
        syncer = self._syncer
        if syncer is not None:
            syncer.stop()
            await asyncio.to_thread(syncer.join)
        self._conn.close()
        self._conn = None
        self._syncer = None
        log.info("outbox.closed", transactions=self._transactions, operations=self._operations)

    # ------------------------------------------------------------------ the Outbox API
    async def commit(self, items: Sequence[Accepted], duplicates: list[int] | None = None) -> list[Pending]:
        window = self._window
        if window > 0:
            now = time.time()
            if now - self._last_prune > min(window, 30.0):
                self._last_prune = now
                horizon = now - window
                self._lazy_write(lambda conn: conn.execute("DELETE FROM seen WHERE at < ?", (horizon,)))
        result: list[Pending] = await self._call(
            lambda conn: _commit(conn, items, window, self._ids, duplicates, self.tee), self._committed
        )
        return result

    async def commit_with(self, items: Sequence[Accepted], also: Callable[[sqlite3.Connection], None]) -> list[Pending]:
        """``commit`` (no deduplication) with ``also`` run in the same transaction: a replay writes its
        cursor with the deliveries it made, so a crash loses or repeats neither."""

        def work(conn: sqlite3.Connection) -> list[Pending]:
            rows = _commit(conn, items, 0.0, self._ids, None, self.tee)
            also(conn)
            return rows

        result: list[Pending] = await self._call(work, self._committed)
        return result

    def ride_along(self, work: Callable[[sqlite3.Connection], object]) -> None:
        """Run ``work`` in the next transaction (within LAZY_FLUSH_S), for writes nobody waits for (the
        event store's expiry): a failure is retried with the next transactions, then dropped."""
        self._lazy_write(work)

    async def transact(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` in a transaction of the group commit; returns its result once durable."""
        return await self._call(work)

    @property
    def path(self) -> Path:
        return self._path

    def _ids(self, count: int) -> range:
        """Reserve ``count`` delivery ids (a rolled-back transaction leaves a harmless gap)."""
        first = self._next_id
        self._next_id += count
        return range(first, first + count)

    def _committed(self, rows: list[Pending]) -> None:
        if rows and self.on_commit is not None:
            self.on_commit(rows)

    def done(self, delivery: Pending) -> None:
        """Lazy: the next transaction deletes every delivery done since the last one, in one statement.
        An id stays listed until a transaction that deleted it committed."""
        self._done_ids.append((delivery.id,))
        if self.status_window_s > 0:
            e = delivery.event
            prov = e.provenance
            self._delivered.append(
                (e.id, e.source, prov.inbound, prov.principal, delivery.route, delivery.outbound, delivery.address,
                 delivery.attempts, time.time())
            )  # fmt: skip
        self._arm_lazy_timer()

    def _prune_delivered(self, conn: sqlite3.Connection) -> None:
        """Delete the ``delivered`` rows past the status window or count, among the oldest
        DELIVERED_PRUNE_BATCH (rowid order is completion order: the expired rows are a prefix), at most
        once a DELIVERED_PRUNE_INTERVAL_S, inside the transaction being written."""
        now = time.monotonic()
        if now - self._last_delivered_prune < DELIVERED_PRUNE_INTERVAL_S:
            return
        self._last_delivered_prune = now
        conn.execute(
            "DELETE FROM delivered WHERE rowid IN (SELECT rowid FROM delivered ORDER BY rowid LIMIT ?)"
            " AND (at < ? OR rowid <= (SELECT MAX(rowid) FROM delivered) - ?)",
            (DELIVERED_PRUNE_BATCH, time.time() - self.status_window_s, self.status_max_events),
        )

    async def recent(self, window_s: float, limit: int) -> tuple[list[DeliveredRow], list[DeadLetter]]:
        """The completed deliveries and the dead letters of the last ``window_s`` (at most ``limit`` of each,
        the newest), oldest first: what the delivery status is rebuilt from at start. On a thread, with a
        connection of its own."""
        if self._conn is None:
            raise StorageError("outbox is not open")
        try:
            return await asyncio.to_thread(_recent, self._path, time.time() - window_s, limit)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc

    def failed(self, delivery: Pending) -> None:
        attempts, row = delivery.attempts, delivery.id
        self._lazy_write(lambda conn: conn.execute("UPDATE deliveries SET attempts=? WHERE id=?", (attempts, row)))

    async def dead_letter(self, delivery: Pending, reason: str) -> None:
        await self._call(lambda conn: _bury(conn, delivery, reason))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        result: list[DeadLetter] = await self._call(lambda conn: _list_dead(conn, limit))
        return result

    async def replay(self, ids: Sequence[int] | None = None) -> list[Pending]:
        result: list[Pending] = await self._call(lambda conn: _replay(conn, ids, self._ids))
        return result

    async def dead_letter_by_id(self, id: int) -> DeadLetter | None:
        result: DeadLetter | None = await self._call(lambda conn: _dead_by_id(conn, id))
        return result

    async def edit_dead_letter(self, id: int, event: Envelope) -> bool:
        blob = event.SerializeToString()

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("UPDATE dead_letters SET envelope=? WHERE id=?", (blob, id)).rowcount

        return bool(await self._call(work))

    async def delete_dead_letters(self, ids: Sequence[int]) -> int:
        rows = [(i,) for i in set(ids)]

        def work(conn: sqlite3.Connection) -> int:
            return conn.executemany("DELETE FROM dead_letters WHERE id=?", rows).rowcount

        return int(await self._call(work))

    async def audit(self, who: str, action: str, detail: str) -> None:
        row = (time.time(), who, action, detail)
        await self._call(lambda conn: conn.execute("INSERT INTO audit(at,who,action,detail) VALUES (?,?,?,?)", row))

    async def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        query = "SELECT id, at, who, action, detail FROM audit ORDER BY id DESC LIMIT ?"

        def work(conn: sqlite3.Connection) -> list[AuditEntry]:
            return [AuditEntry(*row) for row in conn.execute(query, (limit,))]

        result: list[AuditEntry] = await self._call(work)
        return result

    async def stats(self) -> OutboxStats:
        """On a worker thread, with a connection of its own (the counts scan the tables: a few
        milliseconds at max_pending, which the loop must not wait for); sqlite3 releases the GIL while it
        reads. Deliveries done within the last LAZY_FLUSH_S may still be counted."""
        if self._conn is None:
            raise StorageError("outbox is not open")
        try:
            return await asyncio.to_thread(_stats, self._path)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc

    # ------------------------------------------------------------------ batching
    async def _call(self, work: _Work, after: Callable[[Any], None] | None = None) -> Any:
        if self._conn is None or self._loop is None:
            raise StorageError("outbox is not open")
        if self._syncer is not None and self._syncer.failed is not None:
            raise StorageError(self._syncer.failed)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._ops.append(_Op(work, fut, after))
        self._schedule_flush()
        return await fut

    def _schedule_flush(self) -> None:
        """Write the queued operations at the end of this loop iteration, unless they are held until the
        running fsync completes (``_release`` then schedules them)."""
        if self._flush_handle is not None or not self._ops or self._loop is None:
            return
        if self._fsync and len(self._unsynced) >= MAX_UNSYNCED and len(self._ops) < self._max_batch:
            return
        self._flush_handle = self._loop.call_soon(self._flush)

    def _lazy_write(self, work: _Work) -> None:
        self._lazy.append(_Op(work, None))
        self._arm_lazy_timer()

    def _arm_lazy_timer(self) -> None:
        if self._lazy_timer is None and self._loop is not None:
            self._lazy_timer = self._loop.call_later(LAZY_FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        batch = self._lazy + self._ops[: self._max_batch]
        self._lazy = []
        del self._ops[: self._max_batch]
        if batch or self._done_ids or self._delivered:
            self._execute(batch)
        self._schedule_flush()

    def _execute(self, batch: list[_Op]) -> None:
        conn = self._conn
        if conn is None:
            err = StorageError("outbox is closed")
            for op in batch:
                if op.future is not None and not op.future.done():
                    op.future.set_exception(err)
            return
        results: list[tuple[_Op, Any]] = []
        done = len(self._done_ids)
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            if done:
                conn.executemany("DELETE FROM deliveries WHERE id=?", self._done_ids)
            kept = len(self._delivered)
            if kept:
                conn.executemany("INSERT INTO delivered VALUES (?,?,?,?,?,?,?,?,?)", self._delivered)
                self._prune_delivered(conn)
            for op in batch:
                results.append((op, op.work(conn)))
            conn.execute("COMMIT")
            self._transactions += 1
            self._operations += len(batch) + done
            del self._done_ids[:done]  # deleted for good; on a failure they stay for the next transaction
            del self._delivered[:kept]
            if self.on_transaction is not None:
                self.on_transaction(len(batch) + done, time.perf_counter() - started)
        except Exception as exc:  # sqlite3.Error (disk full, I/O), or a bug in a unit of work
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended the transaction
                conn.execute("ROLLBACK")
            err = StorageError(f"outbox write failed: {exc}")
            log.error("outbox.write_failed", error=str(exc), operations=len(batch))
            for op in batch:
                if op.future is not None:
                    if not op.future.done():
                        op.future.set_exception(err)
                else:
                    # Lazy writes have no caller to tell: carry them into the next transaction.
                    op.failures += 1
                    if op.failures < LAZY_RETRIES:
                        self._lazy.append(op)
            if self._lazy or self._done_ids or self._delivered:
                self._arm_lazy_timer()
            return
        waiting = [(op, value) for op, value in results if op.future is not None]
        if not waiting:
            return
        if self._syncer is None or self._syncer.failed is None:
            # Dispatch now, while the fsync runs: the transaction is written, and in WAL order, so a done
            # or dead letter recorded later can never outlive it in a crash. The callers are still answered
            # only once it is durable. The cost: if the daemon crashes (or the fsync fails) before then, the
            # caller was not answered and sends again, and the consumer gets the event twice; without this,
            # every delivery would wait for the fsync (1-2 ms here) before it even starts.
            for op, value in waiting:
                if op.after is not None:
                    op.after(value)
        if not self._fsync or self._syncer is None:
            self._settle(waiting, None)
            if self._syncer is not None:  # "normal": nobody waits, but the WAL is still synced and checkpointed
                self._generation += 1
                self._syncer.want(self._generation)
            return
        if self._syncer.failed is not None:
            self._settle(waiting, self._syncer.failed)
            return
        self._generation += 1
        self._unsynced.append((self._generation, waiting))
        self._syncer.want(self._generation)

    def _release(self, generation: int, error: str | None) -> None:
        """On the loop: the syncer made everything up to ``generation`` durable (or failed to)."""
        while self._unsynced and self._unsynced[0][0] <= generation:
            _, waiting = self._unsynced.popleft()
            self._settle(waiting, error)
        self._schedule_flush()

    @staticmethod
    def _settle(waiting: list[tuple[_Op, Any]], error: str | None) -> None:
        if error is not None:
            log.error("outbox.fsync_failed", error=error)
        for op, value in waiting:
            fut = op.future
            assert fut is not None
            if fut.done():
                continue  # the caller was cancelled: its commit stands, it just no longer waits
            if error is not None:
                fut.set_exception(StorageError(error))
            else:
                fut.set_result(value)


def _fsync_dir(path: Path) -> None:
    """Make the database and WAL files' directory entries durable (POSIX needs the directory fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- SQL, run on the loop inside a transaction
def _commit(
    conn: sqlite3.Connection,
    items: Sequence[Accepted],
    window: float,
    ids: Callable[[int], range],
    duplicates: list[int] | None = None,
    tee: Tee | None = None,
) -> list[Pending]:
    out: list[Pending] = []
    skipped: list[int] = []
    blobs: list[bytes] = [b""] * len(items) if tee is not None else []
    rows: list[tuple[int, bytes, str, str, str, str]] = []
    now = time.time()
    if duplicates is not None:
        del duplicates[:]  # a transaction rolled back and run again must not report twice
    for i, item in enumerate(items):
        if item.dedup_key is not None and window > 0:
            # New key, or one last seen before the window: (re)claim it. Otherwise a duplicate: skip.
            claimed = conn.execute(
                "INSERT INTO seen(key, at) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET at = excluded.at"
                " WHERE seen.at < ?",
                (item.dedup_key, now, now - window),
            ).rowcount
            if not claimed:
                skipped.append(i)
                if duplicates is not None:
                    duplicates.append(i)
                continue
        # Serialized only if stored as it is: a destination with its own transformed copy stores that.
        blob = item.event.SerializeToString() if item.dead_reason or item.failures or _shares(item) else b""
        if tee is not None:
            blobs[i] = blob
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
                (blob, fail.route, fail.outbound, fail.address, "", fail.reason, 0, now),
            )
        for did, d in zip(ids(len(item.deliveries)), item.deliveries, strict=True):
            # A destination that transformed the event stores (and is sent) its own copy.
            event, row_blob = (item.event, blob) if d.event is None else (d.event, d.event.SerializeToString())
            rows.append((did, row_blob, d.route, d.outbound, d.address, d.format))
            out.append(Pending(did, event, d.route, d.outbound, d.address, d.format, 0))
    if rows:
        conn.executemany("INSERT INTO deliveries(id,envelope,route,outbound,address,format) VALUES (?,?,?,?,?,?)", rows)
    if tee is not None:
        tee(conn, items, skipped, blobs)
    return out


def _shares(item: Accepted) -> bool:
    return any(d.event is None for d in item.deliveries)


def _bury(conn: sqlite3.Connection, d: Pending, reason: str) -> None:
    conn.execute(
        "INSERT INTO dead_letters(envelope,route,outbound,address,format,reason,attempts,at) VALUES (?,?,?,?,?,?,?,?)",
        (d.event.SerializeToString(), d.route, d.outbound, d.address, d.format, reason, d.attempts, time.time()),
    )
    conn.execute("DELETE FROM deliveries WHERE id=?", (d.id,))


def _prepare(conn: sqlite3.Connection) -> tuple[list[Pending], int]:
    """Create or migrate the schema; return the undelivered deliveries and the next free delivery id."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    old = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='events'").fetchone()
    if version < SCHEMA_VERSION and old is not None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATE_FROM_1.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("outbox.migrated", from_version=1, to_version=SCHEMA_VERSION)
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    last = conn.execute("SELECT MAX(id) FROM deliveries").fetchone()[0]
    return _load_pending(conn), (last or 0) + 1


def _load_pending(conn: sqlite3.Connection) -> list[Pending]:
    out = []
    envelopes: dict[bytes, Envelope] = {}  # a fanned-out event is parsed once
    rows = conn.execute("SELECT id, envelope, route, outbound, address, format, attempts FROM deliveries ORDER BY id")
    for did, blob, route, outbound, address, fmt, attempts in rows:
        env = envelopes.get(blob)
        if env is None:
            env = envelopes[blob] = Envelope.FromString(blob)
        out.append(Pending(did, env, route, outbound, address, fmt, attempts))
    return out


def _stats(path: Path) -> OutboxStats:
    conn = sqlite3.connect(path, isolation_level=None, timeout=1.0)
    try:
        pending = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        row = conn.execute("SELECT id, envelope, route, outbound FROM deliveries ORDER BY id LIMIT 1").fetchone()
    finally:
        conn.close()
    if row is None:
        return OutboxStats(pending, dead)
    did, blob, route, outbound = row
    return OutboxStats(pending, dead, did, route, outbound, _received(Envelope.FromString(blob)))


def _recent(path: Path, horizon: float, limit: int) -> tuple[list[DeliveredRow], list[DeadLetter]]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=1.0)
    try:
        delivered = conn.execute(
            "SELECT event_id, source, inbound, principal, route, outbound, address, attempts, at FROM delivered"
            " WHERE rowid > (SELECT IFNULL(MAX(rowid), 0) FROM delivered) - ? AND at >= ? ORDER BY rowid",
            (limit, horizon),
        ).fetchall()
        rows = conn.execute(
            "SELECT id, envelope, route, outbound, address, format, reason, attempts, at FROM dead_letters"
            " WHERE id > (SELECT IFNULL(MAX(id), 0) FROM dead_letters) - ? AND at >= ? ORDER BY id",
            (limit, horizon),
        ).fetchall()
    finally:
        conn.close()
    dead = [
        DeadLetter(i, Envelope.FromString(blob), route, outbound, address, fmt, reason, attempts, at)
        for i, blob, route, outbound, address, fmt, reason, attempts, at in rows
    ]
    return delivered, dead


def _received(event: Envelope) -> float | None:
    ts = event.provenance.received
    return ts.seconds + ts.nanos * 1e-9 if ts.seconds else None


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


def _dead_by_id(conn: sqlite3.Connection, id: int) -> DeadLetter | None:
    row = conn.execute(
        "SELECT id, envelope, route, outbound, address, format, reason, attempts, at FROM dead_letters WHERE id=?",
        (id,),
    ).fetchone()
    if row is None:
        return None
    i, blob, route, outbound, address, fmt, reason, attempts, at = row
    return DeadLetter(i, Envelope.FromString(blob), route, outbound, address, fmt, reason, attempts, at)


def _replay(conn: sqlite3.Connection, ids: Sequence[int] | None, new_ids: Callable[[int], range]) -> list[Pending]:
    # format '' marks a dead letter that never had a rendered destination: re-publish it instead.
    query = "SELECT id, envelope, route, outbound, address, format FROM dead_letters WHERE format != ''"
    rows = conn.execute(query + " ORDER BY id").fetchall()
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if r[0] in wanted]
    out = []
    for did, (i, blob, route, outbound, address, fmt) in zip(new_ids(len(rows)), rows, strict=True):
        conn.execute(
            "INSERT INTO deliveries(id,envelope,route,outbound,address,format) VALUES (?,?,?,?,?,?)",
            (did, blob, route, outbound, address, fmt),
        )
        conn.execute("DELETE FROM dead_letters WHERE id=?", (i,))
        out.append(Pending(did, Envelope.FromString(blob), route, outbound, address, fmt, 0))
    return out
