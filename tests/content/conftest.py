"""Redis for the content tests: an instance a test owns (it may stop it), or the shared one on 6379."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.support.net import free_port, reachable

SHARED_REDIS = "redis://127.0.0.1:6379/0"


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence: never the shared one."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server); these tests need it")
        self.proc = await asyncio.create_subprocess_exec(
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            while not reachable("127.0.0.1", self.port, 0.2):
                if self.proc.returncode is not None:
                    raise AssertionError(f"redis-server exited with {self.proc.returncode}")
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            async with asyncio.timeout(10):
                await self.proc.wait()
        self.proc = None

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def shared_redis() -> str:
    """The shared Redis. A test that needs it fails (never skips) when it is not reachable."""
    if not reachable("127.0.0.1", 6379):
        pytest.fail("Redis is not reachable on 127.0.0.1:6379; `make test` starts it (scripts/services.sh)")
    return SHARED_REDIS
