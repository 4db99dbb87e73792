"""HTTP config models: the shipped config.toml sections validate; mistakes are refused with a clear message."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.http import ADAPTER, HttpInboundConfig, HttpListenerConfig, HttpOutboundConfig, build
from mediator.core.errors import ConfigError
from mediator.core.health import Health
from mediator.core.seams import AdapterConfig, Runtime
from tests.support.fakes import ListSink

CONFIG = Path(__file__).resolve().parents[2] / "config.toml"


def shipped() -> dict[str, Any]:
    return tomllib.loads(CONFIG.read_text())


def test_shipped_config_sections_validate() -> None:
    doc = shipped()
    listeners = {n: s for n, s in doc["listeners"].items() if s["kind"] == "http"}
    inbounds = {n: s for n, s in doc["inbound"].items() if s["kind"] == "http"}
    assert listeners
    assert inbounds
    lcfgs = {n: HttpListenerConfig.model_validate(s) for n, s in listeners.items()}
    assert lcfgs["http"].port == 8080
    assert lcfgs["http"].max_body_bytes == 1_048_576
    icfgs = {n: HttpInboundConfig.model_validate(s) for n, s in inbounds.items()}
    orders = icfgs["orders-http"]
    assert (orders.mode, orders.path, orders.connection()) == ("plain", "/orders", "http")
    assert orders.type is not None
    assert orders.type.text == "com.example.order.created"
    assert icfgs["cloudevents-http"].mode == "cloudevents"
    assert icfgs["cloudevents-http"].max_batch == 1000
    health = Health()
    built = build(AdapterConfig(listeners=lcfgs, inbounds=icfgs), Runtime(sink=ListSink(), health=health))
    assert [s.name for s in built.services] == ["listener:http", "listener:registry"]
    assert "listener:http" in health.snapshot()


def test_adapter_spec() -> None:
    assert ADAPTER.kind == "http"
    assert ADAPTER.listener_model is HttpListenerConfig
    assert ADAPTER.inbound_model is HttpInboundConfig
    assert ADAPTER.outbound_model is HttpOutboundConfig
    assert ADAPTER.broker_model is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"path": "/o", "type": "t"}, "needs source"),
        ({"path": "/o"}, "needs type and source"),
        ({"path": "/o", "mode": "cloudevents", "type": "t"}, "only used with mode = 'plain'"),
        ({"path": "o", "type": "t", "source": "s"}, "must start with '/'"),
        ({"path": "/readyz", "mode": "cloudevents"}, "reserved"),
        ({"path": "/o", "type": "t.{nope!}", "source": "s"}, "unknown placeholder"),
        ({"path": "/o", "type": "t.{topic", "source": "s"}, "unbalanced braces"),
        ({"path": "/o", "mode": "grpc"}, "mode"),
        ({"path": "/o", "mode": "cloudevents", "max_batch": 0}, "max_batch"),
        ({"path": "/o", "mode": "cloudevents", "colour": "red"}, "colour"),
    ],
)
def test_inbound_mistakes(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HttpInboundConfig.model_validate({"kind": "http", "listener": "http", **section})


def test_inbound_templates_compile() -> None:
    cfg = HttpInboundConfig(kind="http", listener="l", path="/d", type="t.{topic.0}", source="urn:{inbound}")
    assert cfg.type is not None
    assert cfg.type.parts == ("t.", "topic.0", "")
    assert cfg.model_dump()["type"] == "t.{topic.0}"


def test_outbound_config() -> None:
    cfg = HttpOutboundConfig.model_validate(
        {"kind": "http", "url": "https://hooks.example.com/", "headers": {"Authorization": "Bearer x"}}
    )
    assert (cfg.format, cfg.max_in_flight) == ("binary", 256)
    assert HttpOutboundConfig(kind="http").url is None
    with pytest.raises(ValidationError, match="absolute http"):
        HttpOutboundConfig.model_validate({"kind": "http", "url": "ftp://x"})
    with pytest.raises(ValidationError, match="invalid header name"):
        HttpOutboundConfig.model_validate({"kind": "http", "headers": {"Bad Name": "x"}})
    with pytest.raises(ValidationError, match="format"):
        HttpOutboundConfig.model_validate({"kind": "http", "format": "xml"})


def test_listener_mistakes() -> None:
    with pytest.raises(ValidationError, match="port"):
        HttpListenerConfig.model_validate({"kind": "http", "port": 70000})
    with pytest.raises(ValidationError, match="read_timeout_s"):
        HttpListenerConfig.model_validate({"kind": "http", "read_timeout_s": 0})
    with pytest.raises(ValidationError, match="kind"):
        HttpListenerConfig.model_validate({"kind": "grpc"})


def test_build_refuses_unknown_listener_and_duplicate_paths() -> None:
    lcfg = HttpListenerConfig()
    a = HttpInboundConfig(kind="http", listener="web", path="/x", mode="cloudevents")
    b = HttpInboundConfig(kind="http", listener="web", path="/x", mode="cloudevents")
    c = HttpInboundConfig(kind="http", listener="nope", path="/y", mode="cloudevents")
    rt = Runtime(sink=ListSink(), health=Health())
    with pytest.raises(ConfigError) as info:
        build(AdapterConfig(listeners={"web": lcfg}, inbounds={"a": a, "b": b, "c": c}), rt)
    assert any("inbound.c.listener" in p for p in info.value.problems)
    assert any("inbound.b.path" in p and "'a'" in p for p in info.value.problems)
