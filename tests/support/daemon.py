"""Run the real daemon as a subprocess, the way an operator does: ``python -m mediator run --config``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.net import free_port, unique

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Quickstart:
    """The shipped config.toml, moved onto free ports and unique broker names so tests never collide."""

    tmp: Path
    uid: str = field(default_factory=lambda: unique("t"))
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    mqtt_port: int = 1883
    amqp_port: int = 5672
    outbox: str = "sqlite"

    def __post_init__(self) -> None:
        u = self.uid
        self.orders_exchange = f"orders-{u}"
        self.telemetry_exchange = f"telemetry-{u}"
        self.commands_exchange = f"commands-{u}"
        self.commands_queue = f"mediator.commands-{u}"
        self.topic_prefix = f"{u}/"

    def render(self) -> str:
        text = (ROOT / "config.toml").read_text()
        u = self.uid
        replacements = [
            ("port = 8080", f"port = {self.http_port}"),
            ("port = 50051", f"port = {self.grpc_port}"),
            ("port = 1883", f"port = {self.mqtt_port}"),
            ("127.0.0.1:5672/", f"127.0.0.1:{self.amqp_port}/"),
            ('path = "var/outbox.sqlite"', f'path = "{self.tmp / "outbox.sqlite"}"'),
            ('kind = "sqlite"', f'kind = "{self.outbox}"'),
            ('client_id = "mediator"', f'client_id = "mediator-{u}"'),
            ('exchange = "orders"', f'exchange = "{self.orders_exchange}"'),
            ('exchange = "telemetry"', f'exchange = "{self.telemetry_exchange}"'),
            ('exchange = "commands"', f'exchange = "{self.commands_exchange}"'),
            ('queue = "mediator.commands"', f'queue = "{self.commands_queue}"'),
            ('"devices/+/telemetry"', f'"{self.topic_prefix}devices/+/telemetry"'),
            ("{topic.1}", "{topic.2}"),
            ('address = "orders/created"', f'address = "{self.topic_prefix}orders/created"'),
            ('address = "devices/{topic}/commands"', f'address = "{self.topic_prefix}devices/{{topic}}/commands"'),
        ]
        for old, new in replacements:
            if old not in text:
                raise AssertionError(f"config.toml no longer contains {old!r}; update tests/support/daemon.py")
            text = text.replace(old, new)
        return text

    def write(self) -> Path:
        path = self.tmp / "config.toml"
        path.write_text(self.render())
        return path


class DaemonProcess:
    def __init__(self, config: Path, http_port: int, log: Path) -> None:
        self.config = config
        self.http_port = http_port
        self.log_path = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, wait_ready: bool = True, timeout_s: float = 30.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mediator",
                "run",
                "--config",
                str(self.config),
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        if wait_ready:
            await self.wait_ready(timeout_s)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()

    async def kill(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]
