"""`mediator check` refuses request-reply configs that cannot work, naming the key: MQTT 3.1.1 (no Response
Topic or Correlation Data), a request route with more than one destination or one that cannot carry a
reply address."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli_config import SHIPPED, edit, mediator

pytestmark = pytest.mark.timeout(60)


def check(text: str, tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = mediator("check", "--config", str(path))
    return result.returncode, result.stdout + result.stderr


def test_mqtt_311_refused_for_requests(tmp_path: Path) -> None:
    code, out = check(edit('protocol = "5"', 'protocol = "3.1.1"'), tmp_path)
    assert code == 2, out
    assert "outbound.mqtt-rpc.requests: MQTT 3.1.1" in out
    assert "inbound.rpc-mqtt.request: MQTT 3.1.1" in out


def test_request_route_needs_exactly_one_destination(tmp_path: Path) -> None:
    text = edit(
        'to = [{ outbound = "rpc", address = "rpc.echo" }]',
        'to = [{ outbound = "rpc", address = "rpc.echo" }, { outbound = "rpc", address = "rpc.other" }]',
    )
    code, out = check(text, tmp_path)
    assert code == 2, out
    assert "routes[\"rpc-echo\"].to: a route from the request-mode inbound 'rpc-echo' needs exactly one" in out


def test_request_route_needs_a_request_capable_outbound(tmp_path: Path) -> None:
    code, out = check(
        edit('{ outbound = "mqtt-rpc", address = "rpc/price" }', '{ outbound = "subscribers", address = "x" }'),
        tmp_path,
    )
    assert code == 2, out
    assert "routes[\"rpc-price\"].to[0].outbound: 'subscribers' serves requests from 'rpc-price'" in out
    assert "a grpc outbound cannot carry requests" in out
    code, out = check(edit("requests = true ", "requests = false "), tmp_path)
    assert code == 2, out
    assert "it has requests = false" in out


def test_shipped_config_has_the_request_examples() -> None:
    assert 'path = "/rpc/echo"' in SHIPPED
    assert 'queues = ["rpc.echo"]' in SHIPPED
