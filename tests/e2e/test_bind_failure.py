"""A listener that cannot bind at start-up stops the daemon, with a non-zero exit, instead of leaving it
running unready (its MQTT and AMQP clients must stop with it, even mid-connect)."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Quickstart

pytestmark = pytest.mark.timeout(60)


async def test_a_taken_port_at_start_up_stops_the_daemon(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        qs = Quickstart(tmp_path, http_port=taken.getsockname()[1])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mediator",
            "run",
            "--config",
            str(qs.write()),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            async with asyncio.timeout(30):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 4, text[-3000:]  # EXIT_STARTUP
    assert b"listener.bind_failed" in out
    # One line says why, not an ExceptionGroup traceback; the pid file it wrote is emptied, not left naming it.
    assert "Traceback" not in text, text[-3000:]
    reasons = [line for line in text.splitlines() if line.startswith("mediator:")]
    assert len(reasons) == 1, text[-3000:]
    assert reasons[0].startswith("mediator: listener:http cannot start:"), reasons
    assert "address already in use" in reasons[0], reasons
    assert (tmp_path / "mediator.pid").read_text() == ""
