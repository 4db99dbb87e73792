"""`mediator check` and `mediator run` refuse bad configs with exit 2 and the key path of each error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (ROOT / "config.toml").read_text()


def mediator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mediator", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_shipped_config_is_valid() -> None:
    result = mediator("check", "--config", str(ROOT / "config.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def edit(old: str, new: str) -> str:
    assert old in SHIPPED, f"config.toml no longer contains {old!r}"
    return SHIPPED.replace(old, new, 1)


CASES = {
    "toml-syntax": (edit("[daemon]", "[daemon"), ["TOML syntax error"]),
    "unknown-root-key": (SHIPPED + "\n[surprise]\nx = 1\n", ["surprise"]),
    "unknown-adapter-key": (
        edit('path = "/orders"', 'path = "/orders"\npaht = "/typo"'),
        ["inbound.orders-http.paht", "Extra inputs are not permitted; did you mean `path`?"],
    ),
    "misspelt-daemon-key": (
        edit("drain_timeout_s = 10.0", "drain_timout_s = 10.0"),
        ["daemon.drain_timout_s", "did you mean `drain_timeout_s`?"],
    ),
    "misspelt-route-key": (
        edit('name = "orders"\nmatch', 'name = "orders"\nmatc = {}\nmatch'),
        ['routes["orders"].matc', "did you mean `match`?"],
    ),
    "wrong-type": (edit("port = 1883", 'port = "eighteen"'), ["brokers.mosquitto.port"]),
    "wrong-type-daemon": (edit("drain_timeout_s = 10.0", 'drain_timeout_s = "soon"'), ["daemon.drain_timeout_s"]),
    "unknown-kind": (edit('kind = "amqp"\nurl', 'kind = "kafka"\nurl'), ["brokers.rabbit.kind", "kafka"]),
    "missing-outbound": (
        edit('{ outbound = "mqtt", address = "orders/created" }', '{ outbound = "nowhere", address = "x" }'),
        ['routes["orders"].to[1].outbound', "nowhere"],
    ),
    "missing-broker": (edit('broker = "mosquitto"\ntopics', 'broker = "nobroker"\ntopics'), ["inbound.devices.broker"]),
    "wrong-broker-kind": (
        edit('broker = "mosquitto"\ntopics', 'broker = "rabbit"\ntopics'),
        ["inbound.devices.broker", "'rabbit' is an amqp broker, not mqtt"],
    ),
    "missing-inbound-in-route": (
        edit('match = { inbound = ["devices"]', 'match = { inbound = ["ghost"]'),
        ['routes["telemetry"].match.inbound', "ghost"],
    ),
    "bad-template": (
        edit('address = "telemetry.{topic.1}"', 'address = "telemetry.{topic.1"'),
        ['routes["telemetry"].to[0]'],
    ),
    "two-grpc-inbounds-on-one-listener": (
        edit("[inbound.orders-http]", '[inbound.grpc2]\nkind = "grpc"\nlistener = "grpc"\n\n[inbound.orders-http]'),
        ["inbound.grpc", "at most one gRPC inbound"],
    ),
    "bad-format": (
        edit('address = "orders.created" }', 'address = "orders.created", format = "xml" }'),
        ['routes["orders"].to[0].format'],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_config_exits_2_naming_the_key(case: str, command: str, tmp_path: Path) -> None:
    text, expected = CASES[case]
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = mediator(command, "--config", str(path))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert str(path) in result.stderr


def test_every_error_is_listed_at_once(tmp_path: Path) -> None:
    text = edit("port = 1883", 'port = "x"').replace("qos = 1\ntype", "qos = 7\ntype", 1)
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = mediator("check", "--config", str(path))
    assert result.returncode == 2
    assert "brokers.mosquitto.port" in result.stderr, result.stderr
    assert "inbound.devices.qos" in result.stderr, result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = mediator("check", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml" in result.stderr
