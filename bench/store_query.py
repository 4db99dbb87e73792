"""Query latency of the event store over 1,000,000 stored events (issue 22).

``.venv/bin/python -m bench.store_query [--events 1000000] [--repeat 50]``

Generates the events by script, directly into a fresh store (``bench/.work/store-query/outbox.sqlite``: the
outbox's database with the store's table, created by the daemon's own code): 20 types, 1,000 sources, 10,000
subjects, JSON data of about 300 bytes, receipt times spread evenly over the 7 days of the default retention,
written in transactions of 10,000 rows through the store's own row builder and INSERT. Then it runs a few
typical queries through ``SqliteEventStore`` (the code ``GET /admin/events`` runs: a worker thread, a
connection of its own) ``--repeat`` times each, every repetition at another place (another type, source,
subject, time window or id), and prints p50/p99/max in milliseconds, the file's size and bytes per event.
Results go to ``bench/.work/store-query.json``. Nothing else runs: the figures are the store's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mediator.core.envelope import new_event
from mediator.history.base import EventQuery, Retention, query_of, rows_of
from mediator.history.config import StoreConfig
from mediator.history.sqlite import INSERT, SqliteEventStore
from mediator.outbox.base import Accepted
from mediator.outbox.sqlite import SqliteOutbox
from mediator.v1.envelope_pb2 import Provenance

WORK = Path(__file__).resolve().parent / ".work" / "store-query"
TYPES, SOURCES, SUBJECTS = 20, 1000, 10_000
SPAN_S = 7 * 86400.0
CHUNK = 10_000


def generate(db: Path, count: int, now: float) -> float:
    """``count`` events into the store's table at ``db``; returns the seconds it took."""
    cfg = StoreConfig(retention="7d")
    retention = Retention(cfg)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    started = time.monotonic()
    pad = "x" * 260
    first = now - SPAN_S
    step = SPAN_S / count
    for base in range(0, count, CHUNK):
        items = []
        for i in range(base, min(count, base + CHUNK)):
            received = first + i * step
            prov = Provenance(inbound="bench", protocol="http")
            prov.received.seconds = int(received)
            prov.received.nanos = int((received % 1) * 1e9)
            env = new_event(
                type=f"com.example.t{i % TYPES}",
                source=f"/dev/{i % SOURCES}",
                subject=f"s{i % SUBJECTS}",
                id=f"e{i}",
                data=json.dumps({"amount": i % 1000, "n": i, "pad": pad}).encode(),
                content_type="application/json",
                provenance=prov,
            )
            items.append(Accepted(env, ()))
        rows = rows_of(items, (), retention)
        conn.execute("BEGIN")
        conn.executemany(INSERT, rows)
        conn.execute(
            "UPDATE event_totals SET events = events + ?, bytes = bytes + ?", (len(rows), sum(r[8] for r in rows))
        )
        conn.execute("COMMIT")
        if base % 100_000 == 0:
            print(f"  {base + len(rows):,} events ({time.monotonic() - started:.0f} s)", flush=True)
    conn.close()
    return time.monotonic() - started


def queries(now: float, count: int, rng: random.Random) -> dict[str, Callable[[], EventQuery | str]]:
    """Each a typical question, at a random place every time it is asked."""

    def q(**params: str) -> EventQuery:
        return query_of(params, now, StoreConfig().query_max_examined)

    def window() -> EventQuery:
        start = now - rng.uniform(600, SPAN_S)
        return q(since=str(start), until=str(start + 600), order="oldest", limit="100")

    return {
        "newest 100": lambda: q(limit="100"),
        "type, newest 100": lambda: q(type=f"com.example.t{rng.randrange(TYPES)}", limit="100"),
        "source, last 24 h, 100": lambda: q(source=f"/dev/{rng.randrange(SOURCES)}", since="24h", limit="100"),
        "subject, all 100 of it": lambda: q(subject=f"s{rng.randrange(SUBJECTS)}", limit="100"),
        "a 10 min window, oldest 100": window,
        "type + where data.amount > 900, 100": lambda: q(
            type=f"com.example.t{rng.randrange(TYPES)}", where="data.amount > 900", limit="100"
        ),
        "where only (a page: 5,000 rows examined)": lambda: q(where="data.amount == 1000"),
        "by id": lambda: f"e{rng.randrange(count)}",
    }


async def measure(store: SqliteEventStore, ask: Callable[[], EventQuery | str], repeat: int) -> dict[str, Any]:
    times: list[float] = []
    found: list[int] = []
    for _ in range(repeat):
        question = ask()
        started = time.perf_counter()
        if isinstance(question, str):
            hit = await store.get(question)
            found.append(0 if hit is None else 1)
        else:
            page = await store.query(question)
            found.append(len(page.events))
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "max_ms": round(times[-1], 2),
        "events_per_answer": round(statistics.mean(found), 1),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    db = WORK / "outbox.sqlite"
    for f in WORK.glob("outbox.sqlite*"):
        f.unlink()
    outbox = SqliteOutbox(db)
    await outbox.open()
    store = SqliteEventStore(outbox, StoreConfig(retention="7d"))
    await store.open()  # the daemon's own schema
    await store.close()
    await outbox.close()
    now = time.time()
    print(f"generating {args.events:,} events into {db}", flush=True)
    took = await asyncio.to_thread(generate, db, args.events, now)
    size = sum(f.stat().st_size for f in WORK.glob("outbox.sqlite*"))
    conn = sqlite3.connect(db)
    table_bytes = conn.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'events'").fetchone()[0]
    index_bytes = conn.execute("SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'events_%'").fetchone()[0]
    envelope_bytes = conn.execute("SELECT bytes FROM event_totals").fetchone()[0]
    conn.close()
    outbox = SqliteOutbox(db)
    await outbox.open()
    store = SqliteEventStore(outbox, StoreConfig(retention="7d"))
    await store.open()
    rng = random.Random(22)
    results: dict[str, Any] = {}
    try:
        for name, ask in queries(now, args.events, rng).items():
            await measure(store, ask, 3)  # warm the page cache for this kind of question
            results[name] = await measure(store, ask, args.repeat)
            r = results[name]
            print(
                f"  {name:40s} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  ({r['events_per_answer']} events)"
            )
        # Expiry: a tenth of the events past their retention, then batches of expiry_batch rows timed, each one
        # transaction of the outbox's group commit (its fsync included): what intake may wait for at most.
        batches = []
        for _ in range(5):
            started = time.perf_counter()
            await store.expire_once(now=now + 0.1 * SPAN_S)
            batches.append((time.perf_counter() - started) * 1000)
        expiry = {
            "batch": StoreConfig().expiry_batch,
            "ms_per_batch": [round(b, 1) for b in batches],
            "expired": store.totals.expired,
        }
        print(f"  expiry: {expiry['batch']} rows a batch, {expiry['ms_per_batch']} ms")
    finally:
        await store.close()
        await outbox.close()
    n = args.events
    doc = {
        "events": n,
        "generate_s": round(took, 1),
        "file_bytes": size,
        "bytes_per_event": {
            "envelope": round(envelope_bytes / n, 1),
            "table": round(table_bytes / n, 1),
            "indexes": round(index_bytes / n, 1),
            "file": round(size / n, 1),
        },
        "queries": results,
        "expiry": expiry,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
    }
    out = WORK.parent / "store-query.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    bpe = doc["bytes_per_event"]
    print(
        f"{n:,} events in {size / 2**20:.0f} MiB: per event {bpe['envelope']} B envelope, {bpe['table']} B table,"
        f" {bpe['indexes']} B indexes, {bpe['file']} B file; generated in {took:.0f} s; wrote {out}"
    )
    return doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.store_query", description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=50)
    asyncio.run(main(ap.parse_args()))
