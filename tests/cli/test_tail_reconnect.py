"""Issue 19, item 8: ``mediator tail`` started before the daemon says it is subscribed only once the daemon
registered the subscription, keeps trying while there is none (instead of exiting on Connection refused),
and subscribes again when the daemon restarts: it prints events from both lifetimes of the daemon. Ctrl-C
stops it cleanly. Everything over real sockets: the daemon is the real one, as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.support.daemon import ROOT, DaemonProcess, Quickstart

pytestmark = pytest.mark.timeout(120)


class Lines:
    """The lines of a subprocess's stream, read as they come, each with when it arrived."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.seen: list[tuple[float, str]] = []
        self._task = asyncio.get_running_loop().create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.seen.append((time.monotonic(), line.decode().rstrip("\n")))

    async def wait_for(self, fragment: str, timeout_s: float = 30.0, after: int = 0) -> tuple[int, float]:
        """The index and arrival time of the first line from index ``after`` on that contains ``fragment``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, (at, line) in enumerate(self.seen[after:], after):
                if fragment in line:
                    return i, at
            await asyncio.sleep(0.02)
        raise AssertionError(f"no line with {fragment!r} within {timeout_s} s; saw {[t for _, t in self.seen]}")

    def texts(self) -> list[str]:
        return [t for _, t in self.seen]

    async def close(self) -> None:
        async with asyncio.timeout(10):
            await self._task


async def start_tail(*args: str) -> tuple[asyncio.subprocess.Process, Lines, Lines]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "tail", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    return proc, Lines(proc.stdout), Lines(proc.stderr)


async def publish(port: int, event_id: str) -> None:
    env = envelope_pb2.Envelope(id=event_id, source="/tail-test", spec_version="1.0", type="com.example.order.created")
    env.binary_data = b'{"order": 1}'
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await service_pb2_grpc.MediatorStub(channel).Publish(env, timeout=10)
    assert reply.id == event_id


async def test_tail_waits_for_the_daemon_and_follows_it_across_a_restart(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    quickstart = Quickstart(tmp_path)
    config = quickstart.write()
    tail, out, err = await start_tail("--config", str(config), "--type", "com.example.order.*", "--count", "2")
    daemon = DaemonProcess(config, quickstart.http_port, tmp_path / "daemon.log")
    try:
        # No daemon yet: tail says so and keeps trying; it does not claim a subscription.
        await err.wait_for("no daemon answers on", 20)
        await err.wait_for("still no daemon on", 20)
        assert tail.returncode is None, err.texts()
        assert not [t for t in err.texts() if "subscribed" in t.split(";")[0]], err.texts()

        started = time.monotonic()
        await daemon.start()
        ready = time.monotonic()
        first, subscribed_at = await err.wait_for("tail: subscribed on 127.0.0.1:", 20)
        assert subscribed_at > started, err.texts()  # reported only once there is a daemon to subscribe to
        assert not [t for t in err.texts()[:first] if "subscribed" in t.split(";")[0]], err.texts()
        await publish(quickstart.grpc_port, "before-restart")
        await out.wait_for("before-restart", 20)

        assert await daemon.stop(signal.SIGTERM) == 0, daemon.logs()
        lost, _ = await err.wait_for("tail: disconnected from", 20, after=first + 1)
        assert tail.returncode is None, err.texts()
        await daemon.start()
        again, _ = await err.wait_for("tail: subscribed again on", 30, after=lost)
        assert "events routed while disconnected are not shown (Subscribe cannot resume)" in err.texts()[again]
        await publish(quickstart.grpc_port, "after-restart")
        async with asyncio.timeout(20):
            assert await tail.wait() == 0, err.texts()
        await out.close()
        shown = out.texts()
        assert len(shown) == 2, shown
        assert "before-restart" in shown[0]
        assert "after-restart" in shown[1]
        print(f"daemon ready {ready - started:.2f} s after start; subscribed {subscribed_at - ready:+.2f} s from ready")
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
        if daemon.proc is not None and daemon.proc.returncode is None:
            assert await daemon.stop(signal.SIGTERM) == 0, daemon.logs()


async def test_ctrl_c_stops_a_waiting_tail_cleanly() -> None:
    tail, _out, err = await start_tail("--target", "127.0.0.1:9")  # the discard port: nothing listens there
    try:
        await err.wait_for("no daemon answers on 127.0.0.1:9 yet", 20)
        tail.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            code = await tail.wait()
        await err.close()
        assert code == 130, err.texts()
        assert not [t for t in err.texts() if "Traceback" in t], err.texts()
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()


async def test_a_refused_credential_ends_tail_instead_of_retrying(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAIL_TEST_KEYS", "")
    quickstart = Quickstart(
        tmp_path,
        overrides={"listeners.grpc": {"auth": ["keys"]}},
        extra_toml='[auth.keys]\nkind = "api_key"\nkeys_env = "TAIL_TEST_KEYS"\n',
    )
    daemon = DaemonProcess(quickstart.write(), quickstart.http_port, tmp_path / "daemon.log")
    await daemon.start()
    try:
        tail, _out, err = await start_tail("--target", f"127.0.0.1:{quickstart.grpc_port}", "--token", "nope")
        async with asyncio.timeout(20):
            code = await tail.wait()
        await err.close()
        assert code == 1, err.texts()
        [line] = err.texts()
        assert line.startswith("mediator: tail: the daemon refused the credential from --token (UNAUTHENTICATED"), line
    finally:
        assert await daemon.stop(signal.SIGTERM) == 0, daemon.logs()
