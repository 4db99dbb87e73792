"""The operator's commands with ``[daemon] workers = 2``: ``mediator reload`` reports one outcome for the
whole daemon (each worker's under ``workers``), and ``mediator check`` refuses what ``mediator run`` refuses
only with workers, as real processes on real sockets (the daemon of ``test_workers.Rig``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from mediator.supervisor import merge_reload
from tests.scale.test_workers import Rig, mosquitto_own, worker_pids
from tests.support.brokers import MosquittoInstance
from tests.support.daemon import ROOT, Quickstart
from tests.test_cli_config import mediator

__all__ = ["mosquitto_own"]  # the fixture, imported for the tests below

AGGREGATE = """
[[aggregate]]
name = "order-lines"
types = ["com.example.order.line"]
key = "{data.orderId}"
count = 3
type = "com.example.order.assembled"
source = "/aggregate/orders"
"""


async def reload(config: Path, timeout_s: float) -> tuple[int, dict[str, Any], str]:
    """``mediator reload --config CONFIG --timeout T``: (exit status, the outcome it printed, stderr)."""
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "mediator", "reload", "--config", str(config), "--timeout", str(timeout_s)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await cli.communicate()
    assert cli.returncode is not None
    return cli.returncode, json.loads(out) if out.strip() else {}, err.decode()


@pytest.mark.timeout(180)
async def test_reload_with_two_workers_reports_one_outcome_for_the_whole_daemon(
    tmp_path: Path, rabbitmq: str, mosquitto_own: MosquittoInstance
) -> None:
    """Applied by both workers: exit 0, each worker's outcome under its pid. Refused by both: exit 1, each
    worker's problems. A worker stopped (SIGSTOP) when the signal comes: exit 1 at the timeout, naming it.
    A worker killed with kill -9 just before the signal: its replacement is sent the signal once ready,
    and the reload is applied by both."""
    rig = Rig(tmp_path, rabbitmq, mosquitto_own)
    config = rig.daemon.config
    base = config.read_text()
    async with rig.running():
        port = rig.qs.http_port
        pids = await worker_pids(port)
        supervisor = rig.daemon.pid

        revised = base.replace('address = "orders.created"', 'address = "orders.revised"', 1)
        assert revised != base
        config.write_text(revised)
        code, outcome, err = await reload(config, 60)
        assert code == 0, (outcome, err, rig.daemon.logs()[-4000:])
        assert outcome["pid"] == supervisor
        assert outcome["outcome"] == "applied"
        assert outcome["waiting_for"] == []
        assert {k: w["outcome"] for k, w in outcome["workers"].items()} == {"1": "applied", "2": "applied"}
        assert {k: w["pid"] for k, w in outcome["workers"].items()} == pids
        assert outcome["version"] == outcome["workers"]["1"]["version"] == outcome["workers"]["2"]["version"]

        config.write_text(base[: base.index("[[routes]]")])  # no routes: refused (unless --force)
        code, outcome, err = await reload(config, 60)
        assert code == 1, (outcome, err)
        assert outcome["outcome"] == "refused"
        assert {k: w["outcome"] for k, w in outcome["workers"].items()} == {"1": "refused", "2": "refused"}
        for k in ("1", "2"):
            assert any(p.startswith(f"worker {k}: it has no routes") for p in outcome["problems"]), outcome

        config.write_text(base)
        stopped = pids["2"]
        os.kill(stopped, signal.SIGSTOP)
        try:
            code, outcome, err = await reload(config, 8)
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert code == 1, (outcome, err)
        assert outcome["outcome"] == "pending"
        assert outcome["workers"]["1"]["outcome"] == "applied"
        assert outcome["waiting_for"] == [2]
        assert f"worker 2 (sent SIGHUP to pid {stopped}, no outcome yet)" in err, err

        os.kill(pids["2"], signal.SIGKILL)
        code, outcome, err = await reload(config, 90)
        assert code == 0, (outcome, err, rig.daemon.logs()[-4000:])
        assert outcome["outcome"] == "applied"
        assert outcome["workers"]["1"]["pid"] == pids["1"]
        replacement = outcome["workers"]["2"]["pid"]
        assert replacement != pids["2"]
        await rig._until_both_answer()
        assert (await worker_pids(port))["2"] == replacement
        await rig.sigterm()


def test_merge_reload_outcomes() -> None:
    """The whole daemon applied only when every worker did; pending, then incomplete, while one is silent."""
    ok = {"pid": 11, "outcome": "applied", "problems": [], "version": "v1"}
    refused = {"pid": 12, "outcome": "refused", "problems": ["it has no routes"], "version": "v0"}

    def merge(outcomes: dict[int, dict[str, Any]], waiting: dict[int, str], final: bool) -> dict[str, Any]:
        return merge_reload(
            pid=10, seq=1, at=0.0, signal_name="SIGHUP", outcomes=outcomes, waiting=waiting, final=final
        )

    both = merge(outcomes={1: ok, 2: {**ok, "pid": 12}}, waiting={}, final=True)
    assert (both["outcome"], both["version"], both["problems"]) == ("applied", "v1", [])
    mixed = merge(outcomes={1: ok, 2: refused}, waiting={}, final=True)
    assert mixed["outcome"] == "mixed"
    assert mixed["problems"] == ["worker 2: it has no routes"]
    assert mixed["workers"]["2"]["outcome"] == "refused"
    pending = merge(outcomes={1: ok}, waiting={2: "restarting"}, final=False)
    assert (pending["outcome"], pending["waiting_for"]) == ("pending", [2])
    assert pending["workers"]["2"] == {"outcome": "waiting", "state": "restarting"}
    late = merge(outcomes={1: ok}, waiting={2: "restarting"}, final=True)
    assert late["outcome"] == "incomplete"
    assert "worker 2: no outcome yet (restarting)" in late["problems"]
    # What waits for a restart in any worker is named for the whole daemon.
    metrics = {**ok, "restart_required": ["metrics"]}
    named = merge(
        outcomes={1: metrics, 2: {**metrics, "restart_required": ["daemon.log_level", "metrics"]}},
        waiting={},
        final=True,
    )
    assert named["restart_required"] == ["daemon.log_level", "metrics"]
    assert both["restart_required"] == []


@pytest.mark.timeout(120)
def test_check_refuses_what_run_refuses_with_workers(tmp_path: Path) -> None:
    """A listener on port 0 and an [[aggregate]] are fine for one daemon; with workers = 2, `mediator check`
    lists both with their key paths and exits 2, as `mediator run` does before it starts any worker."""
    one = Quickstart(tmp_path, overrides={"listeners.http": {"port": 0}}, extra_toml=AGGREGATE)
    result = mediator("check", "--config", str(one.write()))
    assert result.returncode == 0, result.stderr

    two = Quickstart(
        tmp_path, overrides={"daemon": {"workers": 2}, "listeners.http": {"port": 0}}, extra_toml=AGGREGATE
    )
    path = two.write()
    checked = mediator("check", "--config", str(path))
    assert checked.returncode == 2, checked.stdout + checked.stderr
    for expected in ("listeners.http.port: 0 would be a different port in each of the 2 workers", "aggregate: "):
        assert expected in checked.stderr, checked.stderr
    run = mediator("run", "--config", str(path))
    assert run.returncode == 2, run.stdout + run.stderr
    refused = sorted(line for line in run.stderr.splitlines() if line.startswith(f"  {path}: "))
    assert refused == sorted(line for line in checked.stderr.splitlines() if line.startswith(f"  {path}: "))
