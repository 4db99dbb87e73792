"""The worker's view of the config and the merges of what the workers answer, without processes."""

from __future__ import annotations

import asyncio
import copy
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import mediator.config
from mediator.config import load
from mediator.core.errors import ConfigError
from mediator.daemon import dry_build
from mediator.registry import load_specs
from mediator.supervisor import (
    WORKERS_FILE,
    drain_view,
    outbox_path,
    problems,
    record_workers,
    seen_workers,
    worker_count,
    worker_view,
)
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


def test_a_start_with_another_worker_count_drains_the_sessions_of_the_counts_it_ran_with(tmp_path: Path) -> None:
    """One daemon after 2 workers drains both workers' sessions (shared filters); worker 1 of 2 after one
    daemon drains the single daemon's (plain filters); worker 2 drains nothing; nothing without a record."""
    qs = Quickstart(tmp_path)
    raw = tomllib.loads(qs.write().read_text())
    base = raw["brokers"]["mosquitto"]["client_id"]
    plain = [f"{qs.topic_prefix}devices/+/telemetry"]
    shared = [f"$share/{base}-devices/{plain[0]}"]
    single = drain_view(raw, 1, [1, 2], copy_of(raw))["inbound"]["devices"]["drain_sessions"]
    assert single == [
        {"client_id": f"{base}-w1-devices", "topics": shared},
        {"client_id": f"{base}-w2-devices", "topics": shared},
    ]
    first = drain_view(raw, 2, [1, 2], worker_view(raw, 1))["inbound"]["devices"]
    assert first["drain_sessions"] == [{"client_id": f"{base}-devices", "topics": plain}]
    assert first["topics"] == shared
    assert "drain_sessions" not in drain_view(raw, 2, [2], worker_view(raw, 1))["inbound"]["devices"]
    assert "drain_sessions" not in drain_view(raw, 1, [], copy_of(raw))["inbound"]["devices"]
    fewer = drain_view(raw, 2, [4], worker_view(raw, 1))["inbound"]["devices"]["drain_sessions"]
    assert [d["client_id"] for d in fewer] == [f"{base}-w3-devices", f"{base}-w4-devices"]
    assert "drain_sessions" not in raw["inbound"]["devices"]  # the parsed document is left alone

    assert seen_workers(tmp_path) == []
    record_workers(tmp_path, 2)
    record_workers(tmp_path, 1)
    record_workers(tmp_path, 2)
    assert seen_workers(tmp_path) == [1, 2]
    assert (tmp_path / WORKERS_FILE).read_text() == '{"seen": [1, 2]}\n'

    # The view the daemon loads through is a valid config: the drains are the inbound's drain_sessions.
    try:
        mediator.config.raw_view = lambda r: drain_view(r, 1, [1, 2], copy_of(r))
        config = load(qs.write(), load_specs())
    finally:
        mediator.config.raw_view = None
    drains = config.adapters["mqtt"].inbounds["devices"].drain_sessions  # type: ignore[attr-defined]
    assert [d.client_id for d in drains] == [f"{base}-w1-devices", f"{base}-w2-devices"]


def test_a_drained_session_may_not_be_a_client_id_in_use(tmp_path: Path) -> None:
    qs = Quickstart(tmp_path)
    uid = qs.uid
    text = qs.render().replace(
        f'"{qs.topic_prefix}devices/+/telemetry"]',
        f'"{qs.topic_prefix}devices/+/telemetry"]\n'
        f'drain_sessions = [{{ client_id = "mediator-{uid}-devices", topics = ["a/b"] }}]',
        1,
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load(path, load_specs())
    problems_found, _ = asyncio.run(dry_build(config))
    assert any("drain_sessions[0]" in p and "also used by inbound.devices" in p for p in problems_found), problems_found


def copy_of(raw: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(raw))
