"""An open dashboard, as the bench sees it: ``python -m bench.watch http://127.0.0.1:PORT`` reads the overview's
live stream (``/admin/ui/overview/stream``, redrawn every 2 s) and an unfiltered live tail (``/admin/tail``,
every event) the way a browser's EventSource does, until SIGTERM; then prints one JSON line: how many
overview updates and tail events it got, and its own CPU (so a reader that could not keep up is seen)."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys

import aiohttp


async def _count(http: aiohttp.ClientSession, url: str, counts: dict[str, int], key: str) -> None:
    async with http.get(url, headers={"Accept": "text/event-stream"}) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"event: "):
                counts[key] += 1


async def main(base: str) -> int:
    counts = {"overview_updates": 0, "tail_events": 0, "tail_ready": 0}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as http:
        tasks = [
            asyncio.create_task(_count(http, f"{base}/admin/ui/overview/stream", counts, "overview_updates")),
            asyncio.create_task(_count(http, f"{base}/admin/tail", counts, "tail_events")),
        ]
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        for task in [*tasks, waiter]:
            task.cancel()
        errors = [repr(t.exception()) for t in done if t is not waiter and not t.cancelled() and t.exception()]
    counts["tail_events"] -= 1  # its "ready" event
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({**counts, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "errors": errors}), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1])))
