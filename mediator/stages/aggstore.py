"""The aggregation store: open groups and their members, durable before a member's sender is acknowledged.

Its own SQLite file (beside the outbox: ``outbox.sqlite`` -> ``outbox.aggregate.sqlite``) in WAL mode with
``synchronous=FULL``, every statement on one writer thread. Why not a table in the outbox's database: the
outbox runs its statements on the loop thread at ``synchronous=OFF`` and fsyncs on a syncer thread of its
own, with group commit tuned to its one workload; a second writer on the same file would contend for
its write lock inside those transactions, and riding its op queue would bind this module to the
outbox's internals. The price of two files is that "composite committed to the outbox" and "group
deleted here" are two transactions: a crash between them produces the composite again after the restart,
with the same id (the group's uid, stored with it), which the outbox's deduplication window drops.

Group commit as the outbox does it: operations queued while a transaction runs go into the next one, so
concurrent callers share one fsync. Callers wait for the commit; a cancelled caller's operation still
commits (the sender was not acknowledged and will send again: members are deduplicated by source + id).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mediator.core.envelope import Envelope
from mediator.outbox.base import StorageError

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    uid TEXT PRIMARY KEY,          -- also the composite's id: the same after a restart
    aggregation TEXT NOT NULL,
    key TEXT NOT NULL,
    opened REAL NOT NULL           -- Unix time of the first member
);
CREATE TABLE IF NOT EXISTS members (
    uid TEXT NOT NULL,
    seq INTEGER NOT NULL,          -- arrival order within the group
    member_key TEXT,               -- source NUL id; NULL for an id the gateway made up
    envelope BLOB NOT NULL,
    at REAL NOT NULL,              -- Unix time it was stored
    PRIMARY KEY (uid, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (   -- members of completed groups, for the deduplication window
    aggregation TEXT NOT NULL,
    member_key TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (aggregation, member_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS closed (  -- completed group keys, for the late-member window
    aggregation TEXT NOT NULL,
    key TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (aggregation, key)
) WITHOUT ROWID;
"""


def store_path(outbox_path: str) -> str:
    path = Path(outbox_path)
    return str(path.with_name(path.stem + ".aggregate" + (path.suffix or ".sqlite")))


@dataclass(slots=True)
class StoredMember:
    seq: int
    member_key: str | None
    event: Envelope
    at: float


@dataclass(slots=True)
class StoredGroup:
    uid: str
    aggregation: str
    key: str
    opened: float
    members: list[StoredMember]


@dataclass(slots=True)
class Loaded:
    groups: list[StoredGroup]
    seen: list[tuple[str, str, float]]
    closed: list[tuple[str, str, float]]


_Work = Callable[[sqlite3.Connection], Any]
_Op = tuple[_Work, asyncio.Future[Any] | None]


class AggregateStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None

    async def open(self) -> Loaded:
        self._loop = asyncio.get_running_loop()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="aggregate-store", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._open_error is not None:
            raise StorageError(f"cannot open the aggregation store {self.path}: {self._open_error}")
        loaded: Loaded = await self.call(_load)
        return loaded

    async def call(self, work: _Work) -> Any:
        """Run ``work(conn)`` in the next transaction; returns its result once committed (fsynced)."""
        if self._thread is None or not self._thread.is_alive():
            raise StorageError("the aggregation store is closed")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((work, future))
        return await future

    def add(self, groups: list[tuple[str, str, str, float]], members: list[tuple[str, StoredMember]]) -> _Work:
        group_rows = list(groups)
        member_rows = [(uid, m.seq, m.member_key, m.event.SerializeToString(), m.at) for uid, m in members]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO groups(uid, aggregation, key, opened) VALUES (?,?,?,?)", group_rows)
            conn.executemany("INSERT INTO members(uid, seq, member_key, envelope, at) VALUES (?,?,?,?,?)", member_rows)

        return work

    @staticmethod
    def complete(uid: str, aggregation: str, key: str, member_keys: list[str], at: float) -> _Work:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM members WHERE uid = ?", (uid,))
            conn.execute("DELETE FROM groups WHERE uid = ?", (uid,))
            conn.executemany(
                "INSERT OR REPLACE INTO seen(aggregation, member_key, at) VALUES (?,?,?)",
                [(aggregation, k, at) for k in member_keys],
            )
            conn.execute("INSERT OR REPLACE INTO closed(aggregation, key, at) VALUES (?,?,?)", (aggregation, key, at))

        return work

    @staticmethod
    def prune(seen_before: dict[str, float], closed_before: dict[str, float]) -> _Work:
        def work(conn: sqlite3.Connection) -> None:
            for name, horizon in seen_before.items():
                conn.execute("DELETE FROM seen WHERE aggregation = ? AND at < ?", (name, horizon))
            for name, horizon in closed_before.items():
                conn.execute("DELETE FROM closed WHERE aggregation = ? AND at < ?", (name, horizon))

        return work

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 10.0)
        self._thread = None

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a commit is fsynced before a sender hears "accepted"
            conn.executescript(SCHEMA)
        except Exception as exc:  # reported by open()
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                ops: list[_Op] = []
                if first is None:
                    break
                ops.append(first)
                while len(ops) < 512:
                    try:
                        op = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if op is None:
                        stopping = True
                        break
                    ops.append(op)
                self._transaction(conn, ops)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()

    def _transaction(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        results: list[Any] = []
        error: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for work, _ in ops:
                results.append(work(conn))
            conn.execute("COMMIT")
        except Exception as exc:
            error = exc
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.error("aggregate.store_failed", error=repr(exc), operations=len(ops))
        assert self._loop is not None
        for i, (_, future) in enumerate(ops):
            if future is None:
                continue
            if error is None:
                self._loop.call_soon_threadsafe(_resolve, future, results[i], None)
            else:
                self._loop.call_soon_threadsafe(_resolve, future, None, StorageError(f"aggregation store: {error}"))


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # the caller was cancelled; the work is committed (or not) all the same
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _load(conn: sqlite3.Connection) -> Loaded:
    groups: dict[str, StoredGroup] = {}
    for uid, aggregation, key, opened in conn.execute("SELECT uid, aggregation, key, opened FROM groups"):
        groups[uid] = StoredGroup(uid, aggregation, key, opened, [])
    for uid, seq, member_key, blob, at in conn.execute(
        "SELECT uid, seq, member_key, envelope, at FROM members ORDER BY uid, seq"
    ):
        group = groups.get(uid)
        if group is None:
            continue  # cannot happen: a group row is written with its first member
        env = Envelope()
        env.ParseFromString(blob)
        group.members.append(StoredMember(seq, member_key, env, at))
    seen = list(conn.execute("SELECT aggregation, member_key, at FROM seen"))
    closed = list(conn.execute("SELECT aggregation, key, at FROM closed"))
    return Loaded([g for g in groups.values() if g.members], seen, closed)
