"""The push ring survives ``kill -9``: a subscriber that was away resumes after the restart with exactly
the events it missed, and cursors are never reused."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.push.clients import metric, open_sse
from tests.support.daemon import DaemonProcess, Quickstart

pytestmark = pytest.mark.timeout(120)


async def test_resume_after_kill_9_and_restart_gets_exactly_the_missed_events(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    qs = Quickstart(tmp_path)
    config = qs.write()
    daemon = DaemonProcess(config, qs.http_port, tmp_path / "daemon.log")
    base = f"http://127.0.0.1:{qs.http_port}"
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def order(seq: int) -> str:
                async with http.post(f"{base}/orders", json={"seq": seq}) as resp:
                    assert resp.status == 202, await resp.text()
                    event_id: str = (await resp.json())["id"]
                    return event_id

            sse = await open_sse(http, f"{base}/subscribe/orders")
            await order(-1)
            first = (await sse.take(1))[0]
            sse.response.close()
            ids = [await order(i) for i in range(100)]
            # Confirmed deliveries are in the ring's file: wait for all 101, then kill without warning.
            async with asyncio.timeout(30):
                while await metric(http, base, "mediator_deliveries_sent_total", outbound="browsers") < 101:
                    await asyncio.sleep(0.05)
            await daemon.kill()
            await daemon.start()
            resumed = await open_sse(http, f"{base}/subscribe/orders", headers={"Last-Event-ID": str(first.id)})
            msgs = await resumed.take(100)
            assert [m.json()["id"] for m in msgs] == ids
            assert [m.json()["data"]["seq"] for m in msgs] == list(range(100))
            cursors = [int(m.id or 0) for m in msgs]
            assert cursors == sorted(set(cursors))
            assert cursors[0] > int(first.id or 0)
            # New events after the restart get newer cursors (none reused).
            after_restart = await order(100)
            live = await resumed.next()
            assert live is not None
            assert live.json()["id"] == after_restart
            assert int(live.id or 0) > cursors[-1]
            assert not [c for c in resumed.comments if c.startswith("gap")]
            resumed.response.close()
    finally:
        code = await daemon.stop(signal.SIGTERM)
        assert code == 0, daemon.logs()
