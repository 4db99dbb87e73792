"""Issue 14 without a daemon: library logs through structlog, log_format shipped, $MEDIATOR_CONFIG, the README
walking the quickstart with the virtualenv's commands and its consumers bound first, sd_notify's datagram,
the unit file."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mediator.systemd import Notifier

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_library_loggers_are_rendered_by_structlog() -> None:
    script = (
        "import logging; from mediator.logs import configure; configure('info', 'json');"
        "logging.getLogger('aiormq.connection').warning('Connection attempt to %s failed', 'amqp://x');"
        "logging.getLogger('asyncio').info('too chatty to show')"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=30)
    [line] = result.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["event"] == "Connection attempt to amqp://x failed"
    assert record["logger"] == "aiormq.connection"
    assert record["level"] == "warning"
    assert "timestamp" in record


def test_shipped_config_and_readme_name_log_format() -> None:
    config = tomllib.loads((ROOT / "config.toml").read_text())
    assert config["daemon"]["log_format"] == "auto"
    assert 'log_format = "console"' in README


def test_config_path_from_the_environment() -> None:
    env = {**os.environ, "MEDIATOR_CONFIG": str(ROOT / "config.toml")}
    result = subprocess.run(
        [sys.executable, "-m", "mediator", "check"], capture_output=True, text=True, cwd="/", env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(ROOT / "config.toml"))


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_commands_use_the_virtualenv() -> None:
    for line in shell_lines():
        assert not re.match(r"(mediator|python3? -m mediator)\b", line), line
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    for bare in re.findall(r"`mediator (?:run|check|dead-letters|publish|tail|hash-key)[^`]*`", prose):
        pytest.fail(f"README names {bare} as if it were on the PATH")


def test_readme_quickstart_binds_before_it_publishes() -> None:
    start = README.index("## The quickstart flows")
    quickstart = README[start : README.index("\n## ", start)]
    assert "dead letter" in quickstart
    lines = [ln for ln in shell_lines() if ln in quickstart]
    orders_bound = next(i for i, ln in enumerate(lines) if ln.startswith("amqp-consume -e orders"))
    telemetry_bound = next(i for i, ln in enumerate(lines) if ln.startswith("amqp-consume -e telemetry"))
    for i, line in enumerate(lines):
        if (line.startswith("curl") and "/orders" in line) or "mediator publish --type com.example.order" in line:
            assert i > orders_bound, line
        if line.startswith("mosquitto_pub") and "telemetry" in line:
            assert i > telemetry_bound, line
    assert ".venv/bin/mediator tail" in quickstart
    assert ".venv/bin/mediator publish" in quickstart


def test_sd_notify_datagram_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
        assert notifier.watchdog_s == 1.5
        notifier.notify("READY=1", "STATUS=listening")
        assert server.recv(4096) == b"READY=1\nSTATUS=listening"
        notifier.close()
    finally:
        server.close()
    missing = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    missing.notify("READY=1")  # a socket that is gone is logged once, never raised
    assert not Notifier({}).enabled
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_unit_file_is_type_notify_with_the_config_from_the_environment() -> None:
    unit = (ROOT / "deploy" / "mediator.service").read_text()
    assert "Type=notify" in unit
    assert "Environment=MEDIATOR_CONFIG=" in unit
    assert "WatchdogSec=" in unit
    assert re.search(r"^ExecStart=\S*mediator run$", unit, flags=re.M)
