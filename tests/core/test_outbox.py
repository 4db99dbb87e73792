"""The outbox contract, for the in-memory and the SQLite store; durability and group commit for SQLite."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mediator.core.envelope import Envelope, new_event
from mediator.core.router import Delivery, Unroutable
from mediator.outbox import MemoryOutbox, Outbox, Pending, SqliteOutbox, StorageError
from mediator.outbox.base import Accepted
from mediator.outbox.sqlite import _load_pending


def ev(n: int) -> Envelope:
    return new_event(type="t", source="/s", data=f"payload-{n}".encode(), id=f"ev-{n}")


def accepted(n: int, *outbounds: str) -> Accepted:
    return Accepted(ev(n), [Delivery("r", o, f"addr-{n}", "binary") for o in outbounds])


async def pending(box: Outbox) -> list[Pending]:
    """What the store holds as pending right now (lazy writes included: the SQLite queue is FIFO)."""
    if isinstance(box, MemoryOutbox):
        return sorted(box._pending.values(), key=lambda p: p.id)
    assert isinstance(box, SqliteOutbox)
    rows: list[Pending] = await box._call(_load_pending)
    return rows


def ids(rows: Sequence[Pending]) -> list[int]:
    return [p.id for p in rows]


@pytest.fixture(params=["memory", "sqlite"])
async def box(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    outbox: Outbox = MemoryOutbox() if request.param == "memory" else SqliteOutbox(tmp_path / "outbox.db")
    assert await outbox.open() == []
    yield outbox
    await outbox.close()


# ---------------------------------------------------------------------------------------------- both stores
async def test_commit_returns_pending_rows(box: Outbox) -> None:
    rows = await box.commit([accepted(1, "a", "b"), accepted(2, "a")])
    assert [(p.event.id, p.route, p.outbound, p.address, p.format, p.attempts) for p in rows] == [
        ("ev-1", "r", "a", "addr-1", "binary", 0),
        ("ev-1", "r", "b", "addr-1", "binary", 0),
        ("ev-2", "r", "a", "addr-2", "binary", 0),
    ]
    assert len(set(ids(rows))) == 3
    assert ids(await pending(box)) == ids(rows)
    assert (await pending(box))[0].event.binary_data == b"payload-1"


async def test_commit_of_nothing(box: Outbox) -> None:
    assert await box.commit([]) == []
    assert await pending(box) == []


async def test_done_removes(box: Outbox) -> None:
    first, second, third = await box.commit([accepted(1, "a", "b"), accepted(2, "a")])
    box.done(second)
    assert ids(await pending(box)) == [first.id, third.id]
    box.done(second)  # a second done is harmless
    box.done(first)
    box.done(third)
    assert await pending(box) == []
    assert await box.dead_letters() == []


async def test_dead_letter_moves_with_reason_and_attempts(box: Outbox) -> None:
    keep, bury = await box.commit([accepted(1, "a"), accepted(2, "b")])
    bury.attempts = 4
    await box.dead_letter(bury, "gave up: 503")
    assert ids(await pending(box)) == [keep.id]
    [dead] = await box.dead_letters()
    assert (dead.event.id, dead.route, dead.outbound, dead.address, dead.format) == (
        "ev-2",
        "r",
        "b",
        "addr-2",
        "binary",
    )
    assert (dead.reason, dead.attempts) == ("gave up: 503", 4)
    assert dead.at > 0


async def test_unroutable_and_unmatched_events_are_dead_letters_at_commit(box: Outbox) -> None:
    rows = await box.commit(
        [
            Accepted(
                ev(1), [Delivery("r", "a", "x", "binary")], [Unroutable("r", "b", "event has no attribute 'subject'")]
            ),
            Accepted(ev(2), (), dead_reason="no route matched"),
        ]
    )
    assert [p.outbound for p in rows] == ["a"]
    dead = await box.dead_letters()
    assert [(d.event.id, d.route, d.outbound, d.format, d.reason) for d in dead] == [
        ("ev-1", "r", "b", "", "event has no attribute 'subject'"),
        ("ev-2", "", "", "", "no route matched"),
    ]
    # Neither ever had a rendered destination: replay leaves them where they are.
    assert await box.replay() == []
    assert len(await box.dead_letters()) == 2


async def test_dead_letters_lists_in_order_with_a_limit(box: Outbox) -> None:
    rows = await box.commit([accepted(n, "a") for n in range(5)])
    for p in rows:
        await box.dead_letter(p, f"reason {p.event.id}")
    assert [d.event.id for d in await box.dead_letters()] == [f"ev-{n}" for n in range(5)]
    assert [d.event.id for d in await box.dead_letters(limit=2)] == ["ev-0", "ev-1"]


async def test_replay_turns_dead_letters_back_into_pending(box: Outbox) -> None:
    rows = await box.commit([accepted(1, "a"), accepted(2, "b"), accepted(3, "c")])
    for p in rows:
        p.attempts = 3
        await box.dead_letter(p, "down")
    first, second, third = await box.dead_letters()

    again = await box.replay([second.id, 999_999])
    assert [(p.event.id, p.route, p.outbound, p.address, p.format, p.attempts) for p in again] == [
        ("ev-2", "r", "b", "addr-2", "binary", 0)
    ]
    assert [d.id for d in await box.dead_letters()] == [first.id, third.id]
    assert ids(await pending(box)) == ids(again)

    rest = await box.replay()
    assert [p.event.id for p in rest] == ["ev-1", "ev-3"]
    assert await box.dead_letters() == []
    assert sorted(ids(await pending(box))) == sorted(ids(again) + ids(rest))
    assert await box.replay() == []

    # A replayed delivery behaves like any other.
    for p in again + rest:
        box.done(p)
    assert await pending(box) == []


# ---------------------------------------------------------------------------------------------- SQLite only
async def test_sqlite_reopen_returns_exactly_the_undelivered(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = SqliteOutbox(path)
    await box.open()
    rows = await box.commit([accepted(1, "a", "b"), accepted(2, "a"), accepted(3, "c"), accepted(4, "d")])
    e1a, e1b, e2a, e3c, e4d = rows
    box.done(e1a)
    box.done(e4d)
    e2a.attempts = 2
    box.failed(e2a)  # lazy: flushed by close
    await box.dead_letter(e3c, "terminal")
    await box.close()

    again = SqliteOutbox(path)
    try:
        survivors = await again.open()
        assert [(p.id, p.event.id, p.outbound, p.address, p.attempts) for p in survivors] == [
            (e1b.id, "ev-1", "b", "addr-1", 0),
            (e2a.id, "ev-2", "a", "addr-2", 2),
        ]
        assert survivors[0].event.binary_data == b"payload-1"
        assert [(d.event.id, d.reason) for d in await again.dead_letters()] == [("ev-3", "terminal")]
        # Finishing the survivors after the restart releases their stored events.
        for p in survivors:
            again.done(p)
    finally:
        await again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)


async def test_sqlite_a_fanned_out_event_is_stored_until_its_last_delivery_is_done(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = SqliteOutbox(path)
    await box.open()
    first, second = await box.commit([accepted(1, "a", "b")])
    box.done(first)
    await box.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT id, outbound FROM deliveries").fetchall() == [(second.id, "b")]
    again = SqliteOutbox(path)
    try:
        [left] = await again.open()
        assert (left.id, left.event.id, left.event.binary_data) == (second.id, "ev-1", b"payload-1")
    finally:
        await again.close()


SCHEMA_V1 = """
CREATE TABLE events (id INTEGER PRIMARY KEY, envelope BLOB NOT NULL, refs INTEGER NOT NULL);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY, event INTEGER NOT NULL, route TEXT NOT NULL, outbound TEXT NOT NULL,
    address TEXT NOT NULL, format TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE seen (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, envelope BLOB NOT NULL, route TEXT NOT NULL, outbound TEXT NOT NULL,
    address TEXT NOT NULL, format TEXT NOT NULL, reason TEXT NOT NULL, attempts INTEGER NOT NULL, at REAL NOT NULL
);
"""


async def test_sqlite_an_outbox_of_the_first_schema_is_migrated_with_its_undelivered(tmp_path: Path) -> None:
    """An outbox written by the previous release (events stored once, deliveries apart) opens with every
    undelivered delivery, its attempts and the dead letters intact, and new ids do not collide."""
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_V1)
        blob = ev(1).SerializeToString()
        conn.execute("INSERT INTO events VALUES (7, ?, 2)", (blob,))
        conn.execute("INSERT INTO deliveries VALUES (40, 7, 'r', 'a', 'addr-1', 'binary', 2)")
        conn.execute("INSERT INTO deliveries VALUES (41, 7, 'r', 'b', 'addr-1', 'structured', 0)")
        conn.execute(
            "INSERT INTO dead_letters(envelope,route,outbound,address,format,reason,attempts,at)"
            " VALUES (?, 'r', 'c', 'x', 'binary', 'gave up', 4, 1.0)",
            (blob,),
        )
    box = SqliteOutbox(path)
    try:
        rows = await box.open()
        assert [(p.id, p.event.id, p.outbound, p.format, p.attempts) for p in rows] == [
            (40, "ev-1", "a", "binary", 2),
            (41, "ev-1", "b", "structured", 0),
        ]
        assert [(d.event.id, d.reason, d.attempts) for d in await box.dead_letters()] == [("ev-1", "gave up", 4)]
        [new] = await box.commit([accepted(2, "a")])
        assert new.id == 42
        box.done(rows[0])
    finally:
        await box.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT id FROM deliveries ORDER BY id").fetchall() == [(41,), (42,)]
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "events" not in tables
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)


class CountingOutbox(SqliteOutbox):
    """Counts transactions (one per batch of queued operations)."""

    transactions = 0

    def _execute(self, batch: list[Any]) -> None:
        type(self).transactions += 1
        super()._execute(batch)


async def test_sqlite_concurrent_commits_are_grouped(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = CountingOutbox(path)
    await box.open()
    CountingOutbox.transactions = 0
    commits = 2000
    try:
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(box.commit([accepted(n, "a")]) for n in range(commits)))
        grouped = CountingOutbox.transactions
    finally:
        await box.close()
    assert [r[0].event.id for r in results] == [f"ev-{n}" for n in range(commits)]
    assert len({r[0].id for r in results}) == commits
    assert grouped < commits / 4, f"{commits} commits took {grouped} transactions"

    again = SqliteOutbox(path)
    try:
        assert len(await again.open()) == commits
    finally:
        await again.close()


async def test_sqlite_commits_arriving_during_an_fsync_share_the_next_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit per loop iteration (as an inbound handing over one message at a time does) while the
    disk is slow: those arriving during an fsync wait for it and then go as one transaction, instead of
    one transaction each."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # runs on the syncer thread
        time.sleep(0.05)
        real_fsync(fd)

    box = CountingOutbox(tmp_path / "outbox.db")
    await box.open()
    monkeypatch.setattr(os, "fsync", slow_fsync)
    CountingOutbox.transactions = 0
    commits = 200
    try:
        tasks = []
        for n in range(commits):
            tasks.append(asyncio.create_task(box.commit([accepted(n, "a")])))
            await asyncio.sleep(0)  # the next commit comes in a later loop iteration
        async with asyncio.timeout(30):
            results = await asyncio.gather(*tasks)
        grouped = CountingOutbox.transactions
    finally:
        await box.close()
    assert [r[0].event.id for r in results] == [f"ev-{n}" for n in range(commits)]
    assert grouped <= 10, f"{commits} commits took {grouped} transactions"


async def test_sqlite_deliveries_are_dispatched_while_their_fsync_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_commit fires once the transaction is written; the committer is answered only once it is durable."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        real_fsync(fd)

    box = SqliteOutbox(tmp_path / "outbox.db")
    await box.open()
    monkeypatch.setattr(os, "fsync", slow_fsync)
    dispatched: list[tuple[float, list[str]]] = []
    box.on_commit = lambda rows: dispatched.append((time.monotonic(), [r.event.id for r in rows]))
    try:
        started = time.monotonic()
        await box.commit([accepted(1, "a")])
        answered = time.monotonic()
    finally:
        await box.close()
    [(at, ids)] = dispatched
    assert ids == ["ev-1"]
    assert answered - started >= 0.3
    assert at - started < 0.1


async def test_sqlite_unwritable_path_raises_storage_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    box = SqliteOutbox(not_a_dir / "outbox.db")
    with pytest.raises(StorageError):
        await box.open()
    async with asyncio.timeout(5):  # a dead store must refuse at once, never leave the caller waiting
        with pytest.raises(StorageError):
            await box.commit([accepted(1, "a")])
    await box.close()


async def test_sqlite_unopenable_database_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "outbox.db").mkdir()  # a directory where the database file should be
    box = SqliteOutbox(tmp_path / "outbox.db")
    with pytest.raises(StorageError, match="cannot open outbox"):
        await box.open()
    async with asyncio.timeout(5):
        with pytest.raises(StorageError):
            await box.commit([accepted(1, "a")])
    await box.close()


async def test_sqlite_commit_before_open_raises_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not open"):
        await SqliteOutbox(tmp_path / "outbox.db").commit([accepted(1, "a")])


async def test_sqlite_failed_commit_raises_storage_error_and_the_store_recovers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = SqliteOutbox(path)
    await box.open()
    locker = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # the writer's BEGIN IMMEDIATE times out (sqlite busy, 5 s)
        async with asyncio.timeout(30):
            with pytest.raises(StorageError, match="outbox write failed"):
                await box.commit([accepted(1, "a")])
        locker.execute("ROLLBACK")
        async with asyncio.timeout(10):
            [row] = await box.commit([accepted(2, "a")])
            assert ids(await pending(box)) == [row.id]  # the failed commit left nothing behind
    finally:
        locker.close()
        await box.close()


async def test_a_done_in_a_failed_transaction_is_carried_into_the_next(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = SqliteOutbox(path)
    await box.open()
    [delivered] = await box.commit([accepted(1, "a")])
    locker = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        box.done(delivered)  # lazy: shares the transaction of the commit below, which fails
        async with asyncio.timeout(30):
            with pytest.raises(StorageError):
                await box.commit([accepted(2, "a")])
        locker.execute("ROLLBACK")
        async with asyncio.timeout(10):
            [row] = await box.commit([accepted(3, "a")])
            assert ids(await pending(box)) == [row.id]  # the earlier "done" was written after all
    finally:
        locker.close()
        await box.close()


# ---------------------------------------------------------------------------------------------- deduplication
def keyed(n: int, key: str) -> Accepted:
    return Accepted(ev(n), [Delivery("r", "a", f"addr-{n}", "binary")], dedup_key=key)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_repeat_within_window_is_committed_once(kind: str, tmp_path: Path) -> None:
    box: Outbox = (
        MemoryOutbox(dedup_window_s=60) if kind == "memory" else SqliteOutbox(tmp_path / "o.db", dedup_window_s=60)
    )
    await box.open()
    try:
        first = await box.commit([keyed(1, "k1")])
        again = await box.commit([keyed(1, "k1")])
        same_batch = await box.commit([keyed(2, "k2"), keyed(2, "k2")])
        unkeyed = await box.commit([accepted(1, "a"), accepted(1, "a")])
    finally:
        await box.close()
    assert len(first) == 1
    assert again == []
    assert len(same_batch) == 1
    assert len(unkeyed) == 2  # no key, no deduplication


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_repeat_after_window_is_committed_again(kind: str, tmp_path: Path) -> None:
    window = 0.2
    box: Outbox = (
        MemoryOutbox(dedup_window_s=window)
        if kind == "memory"
        else SqliteOutbox(tmp_path / "o.db", dedup_window_s=window)
    )
    await box.open()
    try:
        assert len(await box.commit([keyed(1, "k")])) == 1
        await asyncio.sleep(window * 2)  # the window itself is what is under test
        assert len(await box.commit([keyed(1, "k")])) == 1
    finally:
        await box.close()


async def test_dedup_survives_a_restart(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.db", dedup_window_s=60)
    await box.open()
    assert len(await box.commit([keyed(1, "k")])) == 1
    await box.close()
    box = SqliteOutbox(tmp_path / "o.db", dedup_window_s=60)
    await box.open()
    try:
        assert await box.commit([keyed(1, "k")]) == []
    finally:
        await box.close()


async def test_a_failed_fsync_refuses_every_later_commit(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "outbox.db")
    await box.open()
    try:
        assert len(await box.commit([accepted(1, "a")])) == 1
        syncer = box._syncer
        assert syncer is not None
        # Swap the WAL descriptor for a pipe: fsync on it fails (EINVAL) as an I/O error on the disk would.
        read_end, write_end = os.pipe()
        wal_fd, syncer._fd = syncer._fd, read_end
        os.close(wal_fd)
        os.close(write_end)
        with pytest.raises(StorageError, match="fsync"):
            await box.commit([accepted(2, "a")])
        with pytest.raises(StorageError, match="fsync"):  # sticky: no later commit is called durable
            await box.commit([accepted(3, "a")])
    finally:
        await box.close()


async def test_synchronous_normal_still_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mediator.outbox.sqlite.CHECKPOINT_INTERVAL_S", 0.0)
    path = tmp_path / "outbox.db"
    box = SqliteOutbox(path, synchronous="normal")
    await box.open()
    try:
        for n in range(50):
            [row] = await box.commit([accepted(n, "a")])
            box.done(row)
        async with asyncio.timeout(10):  # the syncer checkpoints in the background: the database file grows
            while path.stat().st_size <= 4096 * 2:
                await asyncio.sleep(0.05)
    finally:
        await box.close()
    assert path.stat().st_size > 4096 * 2
