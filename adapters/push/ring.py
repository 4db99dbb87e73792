"""The ring of one push outbound: its recent events, durable, each with a cursor that orders them.

The durable part is its own SQLite file beside the outbox (``outbox.sqlite`` -> ``outbox.push.NAME.sqlite``)
in WAL mode with ``synchronous=FULL``, every statement on one writer thread, with group commit as the
aggregation store does it: appends that arrive while a transaction runs go into the next one, so
concurrent deliveries share one fsync. A delivery to a push outbound is confirmed when its event is
committed here, and only then does it become visible to subscribers, so a cursor a subscriber has seen
survives ``kill -9``.

The readable part is in memory: the retained entries in cursor order (a deque bounded by ``max_events``),
loaded from the file at start. Subscribers and resumes read only the memory, never the file: a resume
costs no I/O and never waits behind appends. Memory is bounded by ``max_events`` times the event size.

Cursors are assigned in ``append`` order and never reused (the newest assigned is kept in the file even
when every event has expired). A failed transaction leaves a hole in the numbering (those deliveries are
retried with new cursors): cursors are increasing, not contiguous. ``floor`` is the newest cursor that
retention has removed: a subscriber resuming after a cursor below it has missed events.

An event the ring already holds (same source and id) is confirmed without a second copy: the outbox
redelivers what it had not marked done when the daemon died, and a subscriber resuming after a ``kill -9``
should see each event once, not the redelivered ones again at the end.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from mediator.core.envelope import Envelope, set_attribute
from mediator.core.errors import RetryableDeliveryError
from mediator.core.formats import to_json_dict

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS ring (
    cursor INTEGER PRIMARY KEY,
    address TEXT NOT NULL,
    at REAL NOT NULL,              -- Unix time it was committed (for max_age_s)
    envelope BLOB NOT NULL         -- CloudEvents Protobuf, without provenance
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,          -- 'last': newest cursor assigned; 'floor': newest cursor removed
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""

MAX_BATCH = 512
CURSOR_ATTRIBUTE = "mediatorcursor"
"""The extension attribute a WebSocket frame carries its cursor in (SSE has its ``id:`` field)."""


def ring_path(outbox_path: str, outbound: str) -> str:
    path = Path(outbox_path)
    return str(path.with_name(f"{path.stem}.push.{outbound}{path.suffix or '.sqlite'}"))


class Entry:
    """One retained event. Its encodings are made once, when a first subscriber needs them, and shared."""

    __slots__ = ("_json", "_proto", "_sse", "_sse_at", "_text", "address", "at", "cursor", "event")

    def __init__(self, cursor: int, address: str, at: float, event: Envelope) -> None:
        self.cursor = cursor
        self.address = address
        self.at = at
        self.event = event  # without provenance; never modified
        self._sse: bytes | None = None  # the SSE message framed as one HTTP/1.1 chunk
        self._sse_at = 0  # where the message starts in it
        self._text: str | None = None
        self._proto: bytes | None = None

    @property
    def type(self) -> str:
        return self.event.type

    def sse(self) -> memoryview:
        """One SSE message (WHATWG HTML 9.2): ``id:`` the cursor, ``event:`` the type, ``data:`` the event
        as CloudEvents structured JSON on one line (JSON escapes every line break inside strings)."""
        chunk = self.sse_chunk()
        return memoryview(chunk)[self._sse_at : len(chunk) - 2]

    def sse_chunk(self) -> bytes:
        """The SSE message as one HTTP/1.1 chunk (RFC 9112 7.1: size in hex, CRLF, the message, CRLF), for
        writing straight to the transport of a chunked response. One buffer holds both forms: ``sse`` is a
        view into it."""
        if self._sse is None:
            data = json.dumps(to_json_dict(self.event), separators=(",", ":"), ensure_ascii=False)
            kind = self.event.type.replace("\r", " ").replace("\n", " ")
            message = f"id: {self.cursor}\nevent: {kind}\ndata: {data}\n\n".encode()
            size = b"%x\r\n" % len(message)
            self._sse_at = len(size)
            self._sse = b"".join((size, message, b"\r\n"))
        return self._sse

    def text(self) -> str:
        """The ``cloudevents.json`` frame: structured JSON with the cursor as an extension attribute."""
        if self._text is None:
            doc = to_json_dict(self.event)
            doc[CURSOR_ATTRIBUTE] = str(self.cursor)
            self._text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
        return self._text

    def proto(self) -> bytes:
        """The ``cloudevents.proto`` frame: CloudEvents Protobuf with the cursor as an extension attribute."""
        if self._proto is None:
            copy = Envelope()
            copy.CopyFrom(self.event)
            set_attribute(copy, CURSOR_ATTRIBUTE, str(self.cursor))
            self._proto = copy.SerializeToString()
        return self._proto


_Work = Callable[[sqlite3.Connection], Any]


class _Store:
    """The SQLite file, written by one thread; ``call`` runs work in the next transaction."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self._name = name
        self._queue: queue.SimpleQueue[tuple[_Work, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"push-ring:{self._name}", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._open_error is not None:
            raise OSError(f"cannot open the push ring {self.path}: {self._open_error}")

    def submit(self, work: _Work) -> asyncio.Future[Any]:
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        if self._thread is None or not self._thread.is_alive():
            future.set_exception(RetryableDeliveryError(f"the push ring {self.path} is closed"))
            return future
        self._queue.put((work, future))
        return future

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(thread.join, 10.0)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # committed = fsynced: a confirmed delivery survives a crash
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
                if first is None:
                    break
                ops = [first]
                while len(ops) < MAX_BATCH:
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

    def _transaction(self, conn: sqlite3.Connection, ops: list[tuple[_Work, asyncio.Future[Any]]]) -> None:
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
            log.error("push.ring_write_failed", path=self.path, error=repr(exc), operations=len(ops))
        assert self._loop is not None
        # One callback for the whole transaction, so the loop settles its appends in cursor order.
        futures = [f for _, f in ops]
        self._loop.call_soon_threadsafe(_settle, futures, results, error)


def _settle(futures: list[asyncio.Future[Any]], results: list[Any], error: BaseException | None) -> None:
    for i, future in enumerate(futures):
        if future.done():
            continue
        if error is not None:
            future.set_exception(RetryableDeliveryError(f"push ring: {error}"))
        else:
            future.set_result(results[i])


def _load(max_events: int, horizon: float) -> _Work:
    def work(conn: sqlite3.Connection) -> tuple[int, int, list[tuple[int, str, float, bytes]]]:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        removed = conn.execute("SELECT max(cursor) FROM ring WHERE at < ?", (horizon,)).fetchone()[0]
        conn.execute("DELETE FROM ring WHERE at < ?", (horizon,))
        rows = conn.execute(
            "SELECT cursor, address, at, envelope FROM ring ORDER BY cursor DESC LIMIT ?", (max_events,)
        ).fetchall()
        rows.reverse()
        floor = int(meta.get("floor", 0))
        if removed is not None:
            floor = max(floor, int(removed))
        if rows:
            over = conn.execute("SELECT max(cursor) FROM ring WHERE cursor < ?", (rows[0][0],)).fetchone()[0]
            if over is not None:
                floor = max(floor, int(over))
                conn.execute("DELETE FROM ring WHERE cursor < ?", (rows[0][0],))
        newest = conn.execute("SELECT max(cursor) FROM ring").fetchone()[0]
        last = max(int(meta.get("last", 0)), int(newest or 0), floor)
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('floor', ?)", (floor,))
        return last, floor, rows

    return work


def _append(rows: list[tuple[int, str, float, bytes]], floor: int) -> _Work:
    def work(conn: sqlite3.Connection) -> None:
        conn.executemany("INSERT INTO ring(cursor, address, at, envelope) VALUES (?,?,?,?)", rows)
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last', ?)", (rows[-1][0],))
        _prune(conn, floor)

    return work


def _prune(conn: sqlite3.Connection, floor: int) -> None:
    conn.execute("DELETE FROM ring WHERE cursor <= ?", (floor,))
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('floor', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
        (floor,),
    )


class Ring:
    """The retained events of one push outbound (see the module docstring). Loop thread only.

    ``path`` None keeps the ring in memory only (an in-memory outbox: nothing survives a restart anyway).
    ``on_append`` is called with each committed entry, in cursor order (the subscriber hub's fan-out).
    """

    def __init__(
        self,
        name: str,
        path: str | None,
        max_events: int,
        max_age_s: float,
        on_append: Callable[[Entry], None] = lambda entry: None,
    ) -> None:
        self.name = name
        self.path = path
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.on_append = on_append
        self.entries: deque[Entry] = deque()
        self.last = 0  # the newest cursor assigned
        self.floor = 0  # the newest cursor retention removed
        self._keys: dict[tuple[str, str], Entry] = {}  # (source, id) of the retained and pending entries
        self._inflight: dict[int, asyncio.Future[None]] = {}  # cursor -> its commit, while being written
        self._store = _Store(path, name) if path is not None else None
        self._pending: list[tuple[Entry, asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self.opened = False

    @property
    def newest(self) -> int:
        """The newest cursor a subscriber can have seen."""
        return self.entries[-1].cursor if self.entries else self.floor

    async def open(self) -> None:
        if self._store is not None:
            await self._store.open()
            last, floor, rows = await self._store.submit(_load(self.max_events, time.time() - self.max_age_s))
            self.last, self.floor = last, floor
            for cursor, address, at, blob in rows:
                env = Envelope()
                env.ParseFromString(blob)
                entry = Entry(cursor, address, at, env)
                self.entries.append(entry)
                self._keys[env.source, env.id] = entry
        self.opened = True
        log.info("push.ring_opened", outbound=self.name, events=len(self.entries), last=self.last, floor=self.floor)

    async def close(self) -> None:
        self.opened = False
        if self._store is not None:
            await self._store.close()

    async def append(self, event: Envelope, address: str) -> Entry:
        """Commit ``event`` (without provenance) to the ring; returns once it is durable and has been handed
        to ``on_append``. Raises ``RetryableDeliveryError`` when the ring is closed or cannot write. A
        cancelled caller's event may still be committed (the dispatcher then retries: a duplicate with
        another cursor, which at-least-once allows)."""
        if not self.opened:
            raise RetryableDeliveryError(f"push outbound {self.name!r} is not running")
        key = (event.source, event.id)
        held = self._keys.get(key)
        if held is not None and held.address == address:
            first = self._inflight.get(held.cursor)
            if first is not None:
                await asyncio.shield(first)  # the first copy is still being written: confirmed with it
            return held  # a redelivery (see the module docstring)
        self.last += 1
        entry = Entry(self.last, address, time.time(), event)
        self._keys[key] = entry
        if self._store is None:
            self._visible(entry)
            return entry
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        self._inflight[entry.cursor] = future
        if not self._flush_scheduled:
            # Appends of one loop turn go to the writer together (one executemany, one fsync).
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        await future
        return entry

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch or self._store is None:
            return
        self._expire()
        rows = [(e.cursor, e.address, e.at, e.event.SerializeToString()) for e, _ in batch]
        done = self._store.submit(_append(rows, self.floor))
        done.add_done_callback(lambda f: self._written(batch, f))

    def _written(self, batch: list[tuple[Entry, asyncio.Future[None]]], done: asyncio.Future[Any]) -> None:
        error = done.exception()
        for entry, future in batch:
            self._inflight.pop(entry.cursor, None)
            if error is None:
                self._visible(entry)
            else:
                self._forget(entry)
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _visible(self, entry: Entry) -> None:
        self.entries.append(entry)
        if len(self.entries) > self.max_events:
            self._evict()
        self.on_append(entry)

    def _evict(self) -> None:
        gone = self.entries.popleft()
        self.floor = gone.cursor
        self._forget(gone)

    def _forget(self, entry: Entry) -> None:
        key = (entry.event.source, entry.event.id)
        if self._keys.get(key) is entry:
            del self._keys[key]

    def _expire(self) -> bool:
        """Drop entries older than ``max_age_s``; True when any was dropped."""
        horizon = time.time() - self.max_age_s
        entries = self.entries
        dropped = False
        while entries and entries[0].at < horizon:
            self._evict()
            dropped = True
        return dropped

    async def expire(self) -> None:
        """Apply the age limit now (the outbound's service calls it periodically, so an idle ring empties)."""
        if self._expire() and self._store is not None:
            floor = self.floor
            await self._store.submit(lambda conn: _prune(conn, floor))

    def after(self, cursor: int) -> list[Entry]:
        """The retained entries newer than ``cursor``, oldest first."""
        entries = self.entries
        if not entries or entries[-1].cursor <= cursor:
            return []
        start = bisect.bisect_right(entries, cursor, key=lambda e: e.cursor)
        return list(itertools.islice(entries, start, None))

    def oldest(self) -> int | None:
        return self.entries[0].cursor if self.entries else None
