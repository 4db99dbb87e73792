"""The worker's view of the config and the merges of what the workers answer, without processes."""

from __future__ import annotations

from pathlib import Path

import pytest

import mediator.config
from mediator.config import load
from mediator.core.errors import ConfigError
from mediator.registry import load_specs
from mediator.supervisor import outbox_path, problems, worker_count, worker_view
from mediator.worker import merge_metrics, merge_status
from tests.support.daemon import Quickstart


def test_worker_view_of_the_shipped_config(tmp_path: Path) -> None:
    """Worker 2: its own outbox file, HTTP listeners with SO_REUSEPORT, its own MQTT client ids, the MQTT
    inbound's filters as a shared subscription; worker 1 keeps the outbox path; nothing else changes."""
    qs = Quickstart(tmp_path, overrides={"daemon": {"workers": 2}})
    path = qs.write()
    specs = load_specs()
    plain = load(path, specs)
    try:
        mediator.config.raw_view = lambda raw: worker_view(raw, 2)
        two = load(path, specs)
        mediator.config.raw_view = lambda raw: worker_view(raw, 1)
        one = load(path, specs)
    finally:
        mediator.config.raw_view = None
    assert worker_count(plain) == 2
    assert one.outbox.path == plain.outbox.path
    assert two.outbox.path == plain.outbox.path + ".w2"
    assert two.root.listeners["http"]["reuse_port"] is True
    broker = plain.root.brokers["mosquitto"]["client_id"]
    assert two.root.brokers["mosquitto"]["client_id"] == f"{broker}-w2"
    assert two.root.inbound["devices"]["topics"] == [f"$share/{broker}-devices/{qs.topic_prefix}devices/+/telemetry"]
    assert two.root.inbound["commands"] == plain.root.inbound["commands"]  # AMQP: competing consumers as is
    assert two.root.routes == plain.root.routes  # routes match the real topic, which the PUBLISH carries


def test_workers_auto_and_what_they_cannot_do(tmp_path: Path) -> None:
    qs = Quickstart(tmp_path, overrides={"daemon": {"workers": "auto"}, "listeners.http": {"port": 0}})
    config = load(qs.write(), load_specs())
    assert worker_count(config) >= 1
    assert problems(config, 1) == []
    assert any("listeners.http.port" in p for p in problems(config, 2))
    assert outbox_path("var/o.sqlite", 3) == "var/o.sqlite.w3"


@pytest.mark.parametrize("bad", [0, 1000, "many"])
def test_workers_out_of_range_is_a_config_error(tmp_path: Path, bad: object) -> None:
    qs = Quickstart(tmp_path, overrides={"daemon": {"workers": bad}})
    with pytest.raises(ConfigError) as info:
        load(qs.write(), load_specs())
    assert any(p.startswith("daemon.workers") for p in info.value.problems), info.value.problems


def test_merge_status_sums_counters_and_keeps_each_worker() -> None:
    one = {"pid": 11, "ready": True, "inbounds": [{"name": "a", "accepted": 2, "ready": True}], "config": {"v": "x"}}
    two = {"pid": 12, "ready": False, "inbounds": [{"name": "a", "accepted": 3, "ready": True}], "config": {"v": "x"}}
    merged = merge_status({1: one, 2: two})
    assert merged["ready"] is False
    assert merged["inbounds"] == [{"name": "a", "accepted": 5, "ready": True}]
    assert merged["config"] == {"v": "x"}
    assert merged["workers"]["2"]["pid"] == 12


def test_merge_metrics_labels_every_sample_with_its_worker() -> None:
    text = b'# HELP m_total n\n# TYPE m_total counter\nm_total{inbound="a"} 2.0\n'
    merged = merge_metrics({1: text, 2: text.replace(b"2.0", b"3.0")}).decode()
    assert 'm_total{inbound="a",worker="1"} 2.0' in merged
    assert 'm_total{inbound="a",worker="2"} 3.0' in merged
    assert merged.count("# TYPE m_total counter") == 1
