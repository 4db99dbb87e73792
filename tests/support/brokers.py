"""Broker instances a test owns (and may stop, kill or restart). Never the shared ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.net import free_port, reachable


class MosquittoInstance:
    """A Mosquitto on a free loopback port, with a config that states the settings results depend on."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 100000\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.workdir / f"mosquitto-{self.port}.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                "mosquitto", "-c", str(self.conf), stdout=asyncio.subprocess.DEVNULL, stderr=log
            )
        async with asyncio.timeout(10):
            while not reachable("127.0.0.1", self.port, 0.2):
                if self.proc.returncode is not None:
                    raise AssertionError(f"mosquitto exited with {self.proc.returncode}")
                await asyncio.sleep(0.05)

    async def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
        async with asyncio.timeout(10):
            await self.proc.wait()
        self.proc = None

    async def restart(self, kill: bool = False, down_s: float = 0.5) -> None:
        await self.stop(kill=kill)
        await asyncio.sleep(down_s)
        await self.start()
