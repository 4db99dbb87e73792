"""The delivery status book (mediator/status.py) over the real outboxes: states, expiry by window and by
count, tombstones, waiters (resolved, timed out, cancelled, the caller gone, too many), and the SQLite
outbox's delivered rows rebuilding the book after a restart."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mediator.core.envelope import Envelope, new_event
from mediator.core.router import Delivery, Unroutable
from mediator.outbox import MemoryOutbox, Outbox, SqliteOutbox
from mediator.outbox.base import Accepted
from mediator.status import StatusBook, StatusOutbox


def ev(n: int, principal: str = "") -> Envelope:
    env = new_event(type="t", source="/s", data=b"x", id=f"ev-{n}")
    env.provenance.inbound = "orders-http"
    env.provenance.principal = principal
    return env


def accepted(n: int, *outbounds: str, principal: str = "") -> Accepted:
    return Accepted(ev(n, principal), [Delivery("r", o, f"{o}-addr-{n}", "binary") for o in outbounds])


def doc(book: StatusBook, n: int) -> dict[str, object]:
    found = book.lookup(f"ev-{n}")
    assert found.found == "known", found
    assert found.document is not None
    return found.document


def states(book: StatusBook, n: int) -> dict[str, str]:
    dests = doc(book, n)["destinations"]
    assert isinstance(dests, list)
    return {d["outbound"]: d["state"] for d in dests}


@pytest.fixture(params=["memory", "sqlite"])
async def tracked(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StatusOutbox]:
    inner: Outbox = MemoryOutbox() if request.param == "memory" else SqliteOutbox(tmp_path / "outbox.db")
    box = StatusOutbox(inner, StatusBook(window_s=60, max_events=100))
    await box.open()
    yield box
    await box.close()


async def test_pending_delivered_partially_dead_and_dead(tracked: StatusOutbox) -> None:
    book = tracked.book
    rows = await tracked.commit([accepted(1, "a", "b"), accepted(2, "a", "b"), accepted(3, "a")])
    assert doc(book, 1)["state"] == "pending"
    assert states(book, 1) == {"a": "pending", "b": "pending"}
    r1a, r1b, r2a, r2b, r3a = rows
    tracked.done(r1a)
    assert doc(book, 1)["state"] == "pending"
    tracked.done(r1b)
    assert doc(book, 1)["state"] == "delivered"
    assert doc(book, 1)["settled"] is True
    r2b.attempts = 3
    tracked.failed(r2b)
    assert doc(book, 2)["destinations"][1]["attempts"] == 3  # type: ignore[index]
    tracked.done(r2a)
    await tracked.dead_letter(r2b, "gave up after 3 attempts: refused")
    assert doc(book, 2)["state"] == "partially-dead"
    dead = doc(book, 2)["destinations"][1]  # type: ignore[index]
    assert dead["reason"] == "gave up after 3 attempts: refused"
    assert "dead_at" in dead
    await tracked.dead_letter(r3a, "unroutable")
    assert doc(book, 3)["state"] == "dead"
    # The same transitions the metrics count: the dispatcher calls done and dead_letter where it counts them.
    assert book.lookup("ev-9").found == "unknown"


async def test_ingress_failures_and_unmatched_events_are_dead(tracked: StatusOutbox) -> None:
    book = tracked.book
    unrenderable = Accepted(ev(4), [Delivery("r", "a", "a-addr", "binary")], [Unroutable("r", "b", "no {x}")])
    unmatched = Accepted(ev(5), (), (), dead_reason="no route matched")
    rows = await tracked.commit([unrenderable, unmatched])
    assert doc(book, 4)["state"] == "partially-dead"
    assert states(book, 4) == {"a": "pending", "b": "dead"}
    assert doc(book, 5)["state"] == "dead"
    assert doc(book, 5)["reason"] == "no route matched"
    tracked.done(rows[0])
    assert doc(book, 4)["state"] == "partially-dead"
    assert doc(book, 4)["settled"] is True


async def test_a_replayed_dead_letter_takes_its_destination_back(tracked: StatusOutbox) -> None:
    book = tracked.book
    [row] = await tracked.commit([accepted(6, "a")])
    await tracked.dead_letter(row, "unroutable")
    assert doc(book, 6)["state"] == "dead"
    [again] = await tracked.replay()
    assert doc(book, 6)["state"] == "pending"
    assert len(states(book, 6)) == 1
    tracked.done(again)
    assert doc(book, 6)["state"] == "delivered"


async def test_expiry_by_window_with_a_tombstone() -> None:
    box = StatusOutbox(MemoryOutbox(), StatusBook(window_s=0.2, max_events=100))
    await box.open()
    [row] = await box.commit([accepted(1, "a")])
    box.done(row)
    assert box.book.lookup("ev-1").found == "known"
    deadline = time.monotonic() + 5
    while box.book.lookup("ev-1").found == "known":
        assert time.monotonic() < deadline, "never expired"
        await asyncio.sleep(0.05)
    assert box.book.lookup("ev-1").found == "expired"
    assert box.book.lookup("ev-2").found == "unknown"
    assert box.book.expired == 1
    assert len(box.book) == 0


async def test_expiry_by_count_keeps_pending_events() -> None:
    box = StatusOutbox(MemoryOutbox(), StatusBook(window_s=3600, max_events=3))
    await box.open()
    rows = await box.commit([accepted(n, "a") for n in range(10)])
    for row in rows[:8]:
        box.done(row)
    # Eight settled, three kept (the newest); the two pending ones stay whatever the count.
    known = {n for n in range(10) if box.book.lookup(f"ev-{n}").found == "known"}
    assert known == {5, 6, 7, 8, 9}
    # Tombstones are bounded by the same count: the three newest expired ids.
    assert [box.book.lookup(f"ev-{n}").found for n in range(5)] == ["unknown"] * 2 + ["expired"] * 3


async def test_tombstones_are_bounded() -> None:
    book = StatusBook(window_s=3600, max_events=2)
    box = StatusOutbox(MemoryOutbox(), book)
    await box.open()
    for row in await box.commit([accepted(n, "a") for n in range(10)]):
        box.done(row)
    # 8 expired, at most 2 tombstones: the oldest expired ids read as unknown.
    found = [book.lookup(f"ev-{n}").found for n in range(10)]
    assert found == ["unknown"] * 6 + ["expired"] * 2 + ["known"] * 2


async def test_waiters_resolve_time_out_and_leave_nothing_behind() -> None:
    book = StatusBook(max_waiters=3)
    box = StatusOutbox(MemoryOutbox(), book)
    await box.open()
    rows = await box.commit([accepted(1, "a", "b"), accepted(2, "a"), accepted(3, "a"), accepted(4, "a")])
    first = asyncio.create_task(book.wait("ev-1", 10))
    second = asyncio.create_task(book.wait("ev-1", 10))
    timed = asyncio.create_task(book.wait("ev-2", 0.1))
    await asyncio.sleep(0.01)
    assert book.waiting == 3
    assert await book.wait("ev-3", 10) == "busy"  # a fourth is turned away at once
    assert await timed == "timeout"
    box.done(rows[0])
    await asyncio.sleep(0.01)
    assert not first.done()  # one destination still pending
    await box.dead_letter(rows[1], "refused")  # one dead: final, though nothing else is pending
    assert await first == "final"
    assert await second == "final"
    assert await book.wait("ev-1", 10) == "final"  # final already: no wait
    assert await book.wait("ev-nope", 10) == "unknown"
    cancelled = asyncio.create_task(book.wait("ev-3", 10))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = asyncio.create_task(book.wait("ev-4", 10, gone))
    await asyncio.sleep(0.01)
    gone.set_result(None)
    assert await left == "gone"
    assert book.waiting == 0
    assert book.waiter_entries == 0


async def test_sqlite_keeps_delivered_rows_and_the_book_is_rebuilt_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"

    def tracked() -> StatusOutbox:
        inner = SqliteOutbox(path)
        inner.status_window_s, inner.status_max_events = 60.0, 100
        return StatusOutbox(inner, StatusBook(window_s=60, max_events=100))

    box = tracked()
    await box.open()
    r1a, r1b, r2a, _r3a = await box.commit(
        [accepted(1, "a", "b", principal="alice"), accepted(2, "a"), accepted(3, "a")]
    )
    box.done(r1a)
    box.done(r1b)
    await box.dead_letter(r2a, "unroutable")
    await box.close()  # flushes the lazy writes: the delivered rows ride the transaction that deletes r1a, r1b
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT event_id, principal, outbound FROM delivered ORDER BY rowid").fetchall() == [
        ("ev-1", "alice", "a"),
        ("ev-1", "alice", "b"),
    ]
    conn.close()

    box = tracked()
    pending = await box.open()
    try:
        assert [p.event.id for p in pending] == ["ev-3"]
        book = box.book
        assert doc(book, 1)["state"] == "delivered"
        assert book.lookup("ev-1").principal == "alice"
        assert doc(book, 2)["state"] == "dead"
        assert doc(book, 3)["state"] == "pending"
        box.done(pending[0])
        assert doc(book, 3)["state"] == "delivered"
    finally:
        await box.close()


async def test_sqlite_prunes_delivered_rows_past_the_count(tmp_path: Path) -> None:
    inner = SqliteOutbox(tmp_path / "outbox.db")
    inner.status_window_s, inner.status_max_events = 3600.0, 5
    box = StatusOutbox(inner, StatusBook(window_s=3600, max_events=5))
    await box.open()
    try:
        for round_ in range(3):
            for row in await box.commit([accepted(100 * round_ + n, "a") for n in range(10)]):
                box.done(row)
            inner._last_delivered_prune = 0.0  # the prune runs at most once a second: now
            await box.commit([])  # a transaction for the lazy writes to ride
            deadline = time.monotonic() + 5
            while inner._delivered or inner._done_ids:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        conn = sqlite3.connect(tmp_path / "outbox.db")
        count = conn.execute("SELECT COUNT(*) FROM delivered").fetchone()[0]
        conn.close()
        assert count <= 5 + 10  # the bound, plus what the last transaction added after its prune
    finally:
        await box.close()
