from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, Quickstart


@pytest.fixture
def quickstart(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> Quickstart:
    return Quickstart(tmp_path)


@pytest.fixture
async def daemon(quickstart: Quickstart, tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    proc = DaemonProcess(quickstart.write(), quickstart.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield proc
    finally:
        code = await proc.stop(signal.SIGTERM)
        assert code == 0, f"daemon exited with {code} on SIGTERM:\n{proc.logs()}"
