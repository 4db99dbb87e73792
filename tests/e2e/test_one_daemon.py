"""One daemon per outbox (mediator/lock.py), as real processes on one config: a second ``mediator run``
exits at once, naming the running daemon's pid, and leaves the first serving (its pid file, its ports,
its outbox); the same against the supervisor of ``workers = 2``. A port taken by another daemon stops the
newcomer with one line, and nobody's pid file goes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aio_pika
import aiohttp
import pytest

from tests.e2e.test_quickstart import bound_queue, get_one
from tests.scale.test_workers import all_answering, worker_pids
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = pytest.mark.timeout(120)

REFUSED_WITHIN_S = 2.0
EXIT_RUNNING = 3
EXIT_STARTUP = 4


async def mediator(*args: str, timeout_s: float = 30.0) -> tuple[int, str, str, float]:
    """``python -m mediator ARGS``: (exit status, stdout, stderr, seconds it took)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mediator",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - started


async def pid_in(path: Path, timeout_s: float = 30.0) -> int:
    """The pid the file names, once it names one."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(_read, path)
        if text.strip():
            return int(text)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} names no pid after {timeout_s} s: {text!r}")


async def assert_serves(qs: Quickstart, pid: int) -> None:
    """A real POST is accepted and delivered to AMQP, and ``mediator reload`` finds daemon ``pid``."""
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        queue = await bound_queue(await conn.channel(), qs.orders_exchange, "orders.created")
        body = json.dumps({"order": 7, "sku": "L-1"}).encode()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{qs.http_port}/orders", data=body, headers={"Content-Type": "application/json"}
            ) as resp,
        ):
            assert resp.status == 202, await resp.text()
            event_id = (await resp.json())["id"]
        got = await get_one(queue, timeout_s=20)
        assert (got.message_id, got.body) == (event_id, body)
    code, out, err, _ = await mediator("reload", "--config", str(qs.tmp / "config.toml"))
    assert code == 0, f"reload: {code}\n{out}\n{err}"
    assert json.loads(out)["pid"] == pid, out


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def one_line(err: str, starts: str) -> str:
    """The line of ``err`` (the daemon's stderr, which has its log too) that says why it stopped."""
    assert "Traceback" not in err, err[-4000:]
    lines = [line for line in err.splitlines() if line.startswith(starts)]
    assert len(lines) == 1, err[-4000:]
    return lines[0]


async def test_a_second_run_on_the_same_config_is_refused_and_the_first_keeps_serving(
    daemon: DaemonProcess, quickstart: Quickstart
) -> None:
    pid_file = quickstart.tmp / "mediator.pid"
    pid = await pid_in(pid_file)
    assert pid == daemon.pid
    code, _, err, took = await mediator("run", "--config", str(daemon.config))
    assert code == EXIT_RUNNING, err[-4000:]
    assert took < REFUSED_WITHIN_S, f"refused after {took:.2f} s"
    line = one_line(err, "mediator:")
    assert f"pid {pid}" in line, line
    assert str(pid_file) in line, line
    assert "listener" not in err, err[-4000:]  # it bound nothing
    assert "outbox.opened" not in err, err[-4000:]  # and did not open the outbox
    assert pid_file.read_text().strip() == str(pid)
    await assert_serves(quickstart, pid)


async def test_a_second_run_against_a_running_supervisor_is_refused(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    qs = Quickstart(tmp_path, overrides={"daemon": {"workers": 2}})
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start(timeout_s=60)
    try:
        pid_file = tmp_path / "mediator.pid"
        pid = await pid_in(pid_file)
        assert pid == proc.pid  # the supervisor's
        code, _, err, took = await mediator("run", "--config", str(proc.config))
        assert code == EXIT_RUNNING, err[-4000:]
        assert took < REFUSED_WITHIN_S, f"refused after {took:.2f} s"
        line = one_line(err, "mediator:")
        assert f"pid {pid}" in line, line
        assert str(pid_file) in line, line
        assert pid_file.read_text().strip() == str(pid)
        await assert_serves(qs, pid)
    finally:
        code = await proc.stop()
    assert code == 0, proc.logs()
    assert pid_file.read_text() == ""  # emptied by the supervisor that wrote it


async def test_a_port_taken_by_another_daemon_stops_the_newcomer_with_one_line(
    daemon: DaemonProcess, quickstart: Quickstart, tmp_path: Path
) -> None:
    """The newcomer has its own outbox directory (so the lock lets it start) and the running daemon's HTTP
    port: it exits non-zero with one line saying so, and the running daemon's pid file stays."""
    pid = await pid_in(quickstart.tmp / "mediator.pid")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Quickstart(other_dir, http_port=quickstart.http_port)
    code, _, err, _ = await mediator("run", "--config", str(other.write()))
    assert code == EXIT_STARTUP, err[-4000:]
    line = one_line(err, "mediator:")
    assert "listener:http cannot start" in line, line
    assert str(quickstart.http_port) in line, line
    assert (other_dir / "mediator.pid").read_text() == ""  # its own, emptied
    assert (quickstart.tmp / "mediator.pid").read_text().strip() == str(pid)
    await assert_serves(quickstart, pid)


async def test_workers_left_by_a_killed_supervisor_keep_a_new_daemon_off_their_outboxes(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    """The workers inherited the supervisor's lock: while one still runs (held here with SIGSTOP, as a
    slow drain would), a new ``run`` is refused, naming the dead supervisor; once it is gone, it starts."""
    qs = Quickstart(tmp_path, overrides={"daemon": {"workers": 2}})
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start(timeout_s=60)
    workers: list[int] = []
    try:
        async with asyncio.timeout(60):
            while not await all_answering(qs.http_port):
                await asyncio.sleep(0.2)
        workers = list((await worker_pids(qs.http_port)).values())
        supervisor = proc.pid
        assert supervisor is not None
        os.kill(workers[0], signal.SIGSTOP)
        await proc.kill()  # SIGKILL: the workers are sent SIGTERM (PR_SET_PDEATHSIG); one cannot act on it
        code, _, err, _ = await mediator("run", "--config", str(proc.config))  # (the other worker drains beside it)
        assert code == EXIT_RUNNING, err[-4000:]
        line = one_line(err, "mediator:")
        assert f"the workers of daemon pid {supervisor} (which has exited)" in line, line
        os.kill(workers[0], signal.SIGCONT)  # it drains and exits, and with it the last hold on the lock
        async with asyncio.timeout(30):
            while any(_alive(pid) for pid in workers):
                await asyncio.sleep(0.1)
        again = DaemonProcess(proc.config, qs.http_port, tmp_path / "again.log")
        await again.start(timeout_s=60)
        assert await pid_in(tmp_path / "mediator.pid") == again.pid
        async with asyncio.timeout(60):  # (a worker stopped while it still imports exits with -15)
            while not await all_answering(qs.http_port):
                await asyncio.sleep(0.2)
        assert await again.stop() == 0, again.logs()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


async def test_a_worker_that_cannot_bind_stops_the_supervisor_with_its_line(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    """``workers = 2`` and the HTTP port taken (without SO_REUSEPORT): the supervisor exits non-zero with
    the workers' reason instead of restarting them forever; no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        qs = Quickstart(tmp_path, http_port=taken.getsockname()[1], overrides={"daemon": {"workers": 2}})
        code, _, err, _ = await mediator("run", "--config", str(qs.write()), timeout_s=60)
    assert code == EXIT_STARTUP, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    reasons = {line for line in err.splitlines() if line.startswith("mediator:")}
    assert len(reasons) == 1, err[-4000:]  # each worker that got so far says the same
    assert reasons.pop().startswith("mediator: listener:http cannot start:"), err[-4000:]
    assert "worker.start_failed" in err
    assert (tmp_path / "mediator.pid").read_text() == ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def test_what_the_cli_names_before_its_imports_matches_the_daemon() -> None:
    """``mediator run`` locks before importing the daemon: its pid file and exit status are its own copies."""
    from mediator import cli, daemon, supervisor

    assert cli._pid_file("x/outbox.sqlite") == Path("x") / daemon.PID_FILE
    assert cli.EXIT_STARTUP == supervisor.EXIT_STARTUP == EXIT_STARTUP
    assert cli.EXIT_RUNNING == EXIT_RUNNING


async def test_dead_letters_does_not_open_a_running_daemons_outbox(
    daemon: DaemonProcess, quickstart: Quickstart, tmp_path: Path
) -> None:
    """``mediator dead-letters`` works on the outbox file only when no daemon answers; one whose admin
    endpoint does not answer (here: a config naming another port) but which runs there keeps it."""
    pid = await pid_in(quickstart.tmp / "mediator.pid")
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(quickstart.render().replace(f"port = {quickstart.http_port}", f"port = {free_port()}"))
    code, out, err, _ = await mediator("dead-letters", "list", "--config", str(elsewhere))
    assert code == 1, out + err
    line = one_line(err, "mediator:")
    assert f"pid {pid}" in line, line
    assert "no admin endpoint answers" in line, line
    await assert_serves(quickstart, pid)
