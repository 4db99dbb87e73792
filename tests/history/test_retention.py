"""Retention on a real daemon: while events are published without pause, the store expires those past
their retention in batches of at most ``expiry_batch``, and every publish is accepted meanwhile; a type
with a longer retention of its own ([[store.overrides]]) stays."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.history.support import admin, all_events, batch_of, publish_batch, start, wait_stored

pytestmark = pytest.mark.timeout(120)

BATCH = 40


async def test_retention_expires_in_bounded_batches_while_publishing_goes_on(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    kept_kind = "com.example.retention.kept"
    qs, daemon = start(
        tmp_path,
        overrides={"store": {"retention": "1s", "expiry_batch": BATCH, "expiry_interval_s": 0.2}},
        extra_toml=f'[[store.overrides]]\ntype = "{kept_kind}"\nretention = "1h"\n',
    )
    await daemon.start()
    port = qs.http_port
    kind = f"com.example.retention.{qs.uid}"
    try:
        async with aiohttp.ClientSession() as http:
            await publish_batch(http, port, batch_of(["/kept"], 5, kept_kind))
            published = 0
            expired_while_publishing = 0
            started = time.monotonic()
            while time.monotonic() - started < 4.0:  # about 300 events a second, for 4 s
                await publish_batch(http, port, batch_of(["/retention"], 30, kind, first=published))
                published += 30
                await asyncio.sleep(0.1)
                if time.monotonic() - started > 2.5 and not expired_while_publishing:
                    expired_while_publishing = (await admin(http, port, "GET", "status"))["store"]["expired"]
            assert expired_while_publishing > 0, "nothing expired while publishing"

            async def store() -> dict[str, int]:
                doc: dict[str, int] = (await admin(http, port, "GET", "status"))["store"]
                return doc

            last: dict[str, int] = {}

            async def all_expired() -> bool:
                last.update(await store())
                return last["events"] == 5

            deadline = time.monotonic() + 20
            while not await all_expired():
                assert time.monotonic() < deadline, f"still stored after 20 s: {last}"
                await asyncio.sleep(0.2)
            print(f"retention: {published} published, {last}")
            assert last["expired"] == published, last
            assert 0 < last["largest_expiry_batch"] <= BATCH, last
            assert last["expiry_batches"] >= published / BATCH, last
            assert await all_events(http, port, type=kind) == []
            await wait_stored(http, port, 5, type=kept_kind)
    finally:
        assert await daemon.stop() == 0, daemon.logs()
