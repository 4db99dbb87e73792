"""``python -m bench``: the benchmark. See ``python -m bench --help`` and bench/README.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import intake, report
from bench.clients import GENERATOR, SUBSCRIBER
from bench.infra import ROOT, WORK, Daemon, Mosquitto, NodeRed, OtlpSink, OwnRabbit, free_port, log
from bench.intake import INTAKE_PATHS
from bench.paths import (
    GENERATOR_CEILING,
    NATS_CEILING,
    PATHS,
    Env,
    PathDef,
    content_files,
    credentials,
    mqtt_generator_spec,
    nats_consumer_spec,
    nats_producer_spec,
)
from bench.report import aggregate
from bench.runner import Cell, Settings, measure, next_run

SHARED_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
BUDGET_S = 840.0
"""`make bench` must end within 10 minutes: cells that would start past this are skipped (and say so)."""

NODERED_PATHS = ("http-mqtt", "http-amqp", "mqtt-mqtt")
PLUGIN_PATHS = ("mqtt-amqp",)
MEMORY_PATH = "http-amqp"
AUTH_PATH = "http-amqp"
CONTENT_PATH = "http-amqp"
"""Beside the plain row, in the same round: a JSON Schema check, a CEL route and a field transform."""
CONTENT_SYSTEM = "mediator (schema+CEL+transform)"
TRACING_PATH = "http-amqp"
"""Beside the plain row (metrics on, as always; tracing off), in the same round: tracing at 100% sampling."""
TRACING_SYSTEM = "mediator (tracing 100%)"
STORE_PATH = "http-amqp"
STORE_SYSTEM = "mediator (store on, SQLite)"
"""Beside the plain row (the bench config has no [store]: off), in the same round: every event kept for 7 days
in the outbox's transaction; its cell also reports the store's bytes per event (``store``)."""
METRICS_OFF_SYSTEM = "mediator (metrics off)"
DASHBOARD_PATH = "http-amqp"  # with a dashboard open and the live tail on (bench/watch.py), beside the plain row
DASHBOARD_SYSTEM = "mediator (dashboard + live tail open)"
"""Beside the plain row on TRACING_PATH: nothing counted ([metrics] enabled = false), what the metrics cost."""
WORKERS = 2
WORKERS_PATHS = ("http-amqp", "mqtt-amqp", "mqtt-mqtt")
"""Beside the plain row, in the same round: the daemon with ``[daemon] workers = 2`` (one supervisor, two
worker processes sharing the load); CPU and RSS are those of the whole process tree."""
"""Beside its unauthenticated row, measured in the same round: the daemon requiring a JWT, then an API key."""


@dataclass(frozen=True, slots=True)
class AuthRow:
    """An authenticated mediator row: its key in results.json (beside ``mediator``), its label, the
    credential (``Env.auth``) and the JWT authenticator's ``cache_size`` (None: the daemon's default)."""

    key: str
    system: str
    kind: str
    jwt_cache_size: int | None = None

    @property
    def suffix(self) -> str:
        return "-" + self.key.removeprefix("mediator_")


def auth_rows(jwt_cache_sizes: list[int | None]) -> list[AuthRow]:
    """One JWT row per cache size, then the API key row."""
    from mediator.stages.config import JwtAuthConfig

    default = JwtAuthConfig.model_fields["cache_size"].default
    rows = []
    for size in jwt_cache_sizes:
        if size is None or size == default:
            rows.append(AuthRow("mediator_jwt", "mediator (JWT RS256)", "jwt", size))
        else:
            label = "mediator (JWT RS256, no cache)" if size == 0 else f"mediator (JWT, cache {size})"
            rows.append(AuthRow(f"mediator_jwt_cache{size}", label, "jwt", size))
    return [*rows, AuthRow("mediator_api_key", "mediator (API key)", "api_key")]


def _cache_sizes(text: str) -> list[int | None]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"cache sizes are integers >= 0: {text!r}")
    return list(sizes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one short run per cell (smoke test)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of: {', '.join(PATHS)}")
    ap.add_argument("--no-peers", action="store_true", help="skip Node-RED and the RabbitMQ MQTT plugin")
    ap.add_argument("--no-memory", action="store_true", help="skip the in-memory outbox figure")
    ap.add_argument("--no-auth", action="store_true", help=f"skip the authenticated {AUTH_PATH} rows (JWT, API key)")
    ap.add_argument(
        "--no-dashboard", action="store_true", help=f"skip the {DASHBOARD_PATH} row with a dashboard and live tail open"
    )
    ap.add_argument(
        "--no-tracing", action="store_true", help=f"skip the {TRACING_PATH} row with tracing at 100% sampling"
    )
    ap.add_argument(
        "--no-intake", action="store_true", help="skip the intake rates (each inbound with its outbound stalled)"
    )
    ap.add_argument(
        "--no-metrics-off", action="store_true", help=f"skip the {TRACING_PATH} row with metrics off (nothing counted)"
    )
    ap.add_argument("--no-store", action="store_true", help=f"skip the {STORE_PATH} row with the event store on")
    ap.add_argument(
        "--no-content", action="store_true", help=f"skip the {CONTENT_PATH} row with a schema, a CEL route, a transform"
    )
    ap.add_argument(
        "--jwt-cache-size",
        type=_cache_sizes,
        default=[None],
        metavar="N[,N...]",
        help="cache_size of the JWT authenticator (0: verify every token); several values give one JWT row"
        " each, in that order, in the same round (default: the daemon's default)",
    )
    ap.add_argument(
        "--no-workers", action="store_true", help=f"skip the workers = {WORKERS} rows ({', '.join(WORKERS_PATHS)})"
    )
    ap.add_argument("--profile", action="store_true", help="py-spy the daemon in each path's first saturation run")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="how many times the whole suite runs, each cell once per round (default 3; 1 with --quick)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where to write the JSON results")
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        ap.error(f"unknown path(s): {', '.join(unknown)}; known: {', '.join(PATHS)}")
    args.path_names = names
    return args


def ensure_generator() -> str:
    """mosquitto_pub and mosquitto_sub (package mosquitto-clients) are the MQTT load generator and consumer;
    as root we install them when missing, and say so."""
    if shutil.which(GENERATOR) is None or shutil.which(SUBSCRIBER) is None:
        log(f"{GENERATOR} is not installed: running `apt-get install -y mosquitto-clients` (Debian package)")
        subprocess.run(["apt-get", "install", "-y", "mosquitto-clients"], check=True, timeout=300, capture_output=True)
    out = subprocess.run([GENERATOR, "--help"], capture_output=True, text=True, check=False)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "version" in ln]
    return lines[0].strip() if lines else GENERATOR


def ensure_wrk() -> str:
    """wrk drives the HTTP paths. Debian packages it; as root we install it when missing, and say so."""
    if shutil.which("wrk") is None:
        log("wrk is not installed: running `apt-get install -y wrk` (Debian package)")
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, timeout=300, capture_output=True)
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).splitlines()[0] if (out.stdout + out.stderr) else "wrk"


async def _amqp_cleanup(url: str, exchanges: list[str], queues: list[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    async with conn:
        for name in queues:
            with contextlib.suppress(Exception):
                ch = await conn.channel()
                await ch.queue_delete(name)
        for name in exchanges:
            with contextlib.suppress(Exception):
                ch = await conn.channel()
                await ch.exchange_delete(name)


def amqp_cleanup(url: str, exchanges: list[str], queues: list[str]) -> None:
    with contextlib.suppress(Exception):
        asyncio.run(asyncio.wait_for(_amqp_cleanup(url, exchanges, queues), 20))


async def _nats_cleanup(url: str, streams: list[str]) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        for stream in streams:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def nats_cleanup(env: Env) -> None:
    """Delete the cell's JetStream streams (what a run stored stays on the shared server otherwise)."""
    with contextlib.suppress(Exception):
        asyncio.run(asyncio.wait_for(_nats_cleanup(env.nats_url, [env.stream_in, env.stream_out]), 20))


def store_figures(http_port: int, db: Path) -> dict[str, Any]:
    """What the store holds after a cell: its events, their envelope bytes (from /admin/status) and the
    pages its table and indexes take in the database file (SQLite's dbstat), each per event."""
    import sqlite3

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/admin/status", timeout=30) as resp:
        store = json.loads(resp.read())["store"]
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        pages = conn.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'events' OR name LIKE 'events_%'").fetchone()[
            0
        ]
    finally:
        conn.close()
    events = int(store.get("events") or 0)
    return {
        "events": events,
        "envelope_bytes": store.get("bytes"),
        "disk_bytes": pages,
        "envelope_bytes_per_event": round(store["bytes"] / events, 1) if events else None,
        "disk_bytes_per_event": round(pages / events, 1) if events and pages else None,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        # Each round runs every cell once (one saturation run, one fixed-load run); the table shows the median
        # over rounds, and each ratio is the median of the ratios measured within one round, so that a peer
        # and mediator measured minutes apart on a noisy machine never make a ratio on their own.
        self.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
        self.settings = (
            Settings(
                sat_runs=1,
                lat_runs=1,
                sat_s=2.0,
                sat_count=3000,
                lat_s=1.0,
                drain_max_s=20.0,
                profile=args.profile,
            )
            if args.quick
            else Settings(sat_runs=1, lat_runs=1, profile=args.profile)
        )
        self.uid = uuid.uuid4().hex[:8]
        self.mosquitto = Mosquitto(WORK / "mosquitto")
        self.otlp = OtlpSink()
        self.rabbit: OwnRabbit | None = None
        self.results: dict[str, Any] = {"paths": {}, "ceilings": {}, "skipped": [], "problems": []}

    def over_budget(self, what: str) -> bool:
        if time.monotonic() - self.started > BUDGET_S:
            self.results["skipped"].append(f"{what}: skipped, the run is past its {BUDGET_S:.0f} s budget")
            log(f"{what}: skipped (time budget)")
            return True
        return False

    def env(
        self,
        name: str,
        outbox: str = "sqlite",
        auth: AuthRow | None = None,
        content: bool = False,
        workers: int = 1,
        tracing: bool = False,
        metrics: bool = True,
        stalled_port: int | None = None,
        store: bool = False,
    ) -> Env:
        uid = (
            f"{self.uid}-{name}"
            + ("-mem" if outbox == "memory" else "")
            + (auth.suffix if auth else "")
            + ("-content" if content else "")
            + (f"-w{workers}" if workers > 1 else "")
            + ("-tracing" if tracing else "")
            + ("" if metrics else "-nometrics")
            + ("-store" if store else "")
        )
        workdir = WORK / "daemon" / uid
        workdir.mkdir(parents=True, exist_ok=True)
        for f in workdir.glob("outbox.sqlite*"):
            f.unlink()
        return Env(
            uid=uid,
            mqtt_port=self.mosquitto.port,
            amqp_url=SHARED_AMQP,
            http_port=free_port(),
            grpc_port=free_port(),
            hook_port=free_port(),
            workdir=str(workdir),
            outbox=outbox,
            auth=auth.kind if auth else None,
            jwt_cache_size=auth.jwt_cache_size if auth else None,
            content=content,
            workers=workers,
            tracing_endpoint=self.otlp.endpoint if tracing else None,
            metrics=metrics,
            stalled_port=stalled_port,
            store=store,
        )

    # ------------------------------------------------------------------------------------------ mediator

    def mediator(
        self,
        path: PathDef,
        outbox: str = "sqlite",
        profile: bool = True,
        auth: AuthRow | None = None,
        content: bool = False,
        workers: int = 1,
        tracing: bool = False,
        metrics: bool = True,
        dashboard: bool = False,
        store: bool = False,
    ) -> dict[str, Any]:
        """One mediator cell; with ``auth`` the HTTP listener requires that credential, which every producer
        (wrk and the Python probes) then sends; with ``content`` the daemon checks a JSON Schema, routes by a
        CEL predicate over the data and transforms it (``bench.paths.CONTENT_TOML``)."""
        env = self.env(path.name, outbox, auth, content, workers, tracing, metrics, store=store)
        spans_before = self.otlp.spans
        headers = credentials(env)
        content_files(env)
        daemon = Daemon(path.config(env), Path(env.workdir), env.http_port)
        wrk_url = f"http://127.0.0.1:{env.http_port}/bench" if path.producer == "http" else None
        tag = (
            ("-memory" if outbox == "memory" else "")
            + (auth.suffix if auth else "")
            + ("-content" if content else "")
            + (f"-workers{workers}" if workers > 1 else "")
            + ("-tracing" if tracing else "")
            + ("" if metrics else "-nometrics")
            + ("-store" if store else "")
        )
        system = auth.system if auth else ("mediator (memory outbox)" if outbox == "memory" else "mediator")
        if workers > 1:
            system = f"mediator (workers = {workers})"
        if tracing:
            system = TRACING_SYSTEM
        if not metrics:
            system = METRICS_OFF_SYSTEM
        if dashboard:
            system = DASHBOARD_SYSTEM
        watcher: list[subprocess.Popen[str]] = []
        if store:
            system = STORE_SYSTEM
        cell = Cell(
            label=path.name,
            system=CONTENT_SYSTEM if content else system,
            producer={**path.producer_spec(env), "headers": headers},
            consumer=path.consumer_spec(env),
            pid=lambda: daemon.pid if daemon.proc else None,
            wrk_url=wrk_url,
            wrk_headers=headers,
            profile_name=path.name + tag if profile else None,
            alive=daemon.exited,
        )

        def start() -> None:
            daemon.start()
            if auth is not None and wrk_url is not None:
                _refused_without_credential(wrk_url)
            if dashboard:
                argv = [sys.executable, "-m", "bench.watch", f"http://127.0.0.1:{env.http_port}"]
                watcher.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT))

        watched: dict[str, Any] | None = None
        store_stats: dict[str, Any] | None = None
        try:
            res = measure(cell, self.settings, start_system=start)
            if store:
                store_stats = store_figures(env.http_port, Path(env.workdir) / "outbox.sqlite")
        finally:
            for proc in watcher:
                proc.terminate()
                out, _ = proc.communicate(timeout=10)
                watched = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no output"}
            rc = daemon.stop()
            problems = daemon.problems()
            if problems:
                self.results["problems"].append({"cell": f"{path.name} [{cell.system}]", "log": problems[:20]})
            if rc not in (0, None):
                self.results["problems"].append({"cell": f"{path.name} [{cell.system}]", "exit": rc})
            amqp_cleanup(SHARED_AMQP, [env.exchange_in, env.exchange_out], [env.queue_in, env.queue_out])
            if "nats" in (path.producer, path.consumer):
                nats_cleanup(env)
        if auth is not None:
            res["auth"] = {"kind": auth.kind, "jwt_cache_size": auth.jwt_cache_size}
            res["variant"] = auth.key
        if content:
            res["variant"] = "content"
        if workers > 1:
            res["variant"] = f"workers{workers}"
            res["workers"] = workers
        if not metrics:
            res["variant"] = "metrics_off"
        if dashboard:
            res["variant"] = "dashboard"
            res["dashboard"] = watched
        if store:
            res["variant"] = "store"
            res["store"] = store_stats
        if tracing:
            res["variant"] = "tracing"
            res["otlp_spans_received"] = self.otlp.spans - spans_before
        res["daemon_exit"] = rc
        res["daemon_log_lines"] = len(problems)
        return res

    # ------------------------------------------------------------------------------------------ ceilings

    def ceiling(self, kind: str) -> dict[str, Any]:
        env = self.env(f"ceil-{kind}")
        prod: dict[str, Any]
        cons: dict[str, Any]
        if kind == "amqp":
            prod = {
                "kind": "amqp",
                "url": SHARED_AMQP,
                "exchange": env.exchange_out,
                "routing_key": "p1",
                "window": 512,
            }
            cons = {"kind": "amqp", "url": SHARED_AMQP, "exchange": env.exchange_out, "queue": env.queue_out}
            label = "AMQP direct: aio-pika publish (confirms, persistent) -> consume"
        elif kind == NATS_CEILING:
            prod = nats_producer_spec(env, env.stream_out, env.subject("out.p1"))
            cons = nats_consumer_spec(env, env.stream_out, env.subject("out.>"))
            label = "NATS direct: nats-py JetStream publish (acks, 512 in flight) -> pull consumer"
        elif kind == GENERATOR_CEILING:
            # The load generator of the MQTT paths and their peers, straight into mosquitto_sub: what it
            # can drive at most, in the same round as the systems it drives.
            prod = mqtt_generator_spec(env.mqtt_port, env.topic("out/p1"))
            cons = {"kind": "mqtt", "host": "127.0.0.1", "port": env.mqtt_port, "topic": env.topic("out/+")}
            label = "MQTT direct: mosquitto_pub -l (C, QoS 1, 100 in flight) -> mosquitto_sub"
        else:
            prod = {
                "kind": "mqtt",
                "host": "127.0.0.1",
                "port": env.mqtt_port,
                "topic": env.topic("out/p1"),
                "window": 1000,
            }
            cons = {"kind": "mqtt", "host": "127.0.0.1", "port": env.mqtt_port, "topic": env.topic("out/+")}
            label = "MQTT direct: paho QoS 1 publish -> mosquitto_sub"
        cell = Cell(label=f"ceiling-{kind}", system=label, producer=prod, consumer=cons)
        try:
            return measure(cell, self.settings)
        finally:
            amqp_cleanup(SHARED_AMQP, [env.exchange_out], [env.queue_out])
            if kind == NATS_CEILING:
                nats_cleanup(env)

    # ------------------------------------------------------------------------------------------ peers

    def node_red(self, names: list[str]) -> dict[str, dict[str, Any]]:
        red = NodeRed(WORK / "nodered")
        version = red.install()
        uid = f"{self.uid}-nr"
        ex = f"bench-nr-{uid}"
        port = self.mosquitto.port
        flows: list[dict[str, Any]] = [
            {"id": "tab1", "type": "tab", "label": "bench"},
            {
                "id": "mq",
                "type": "mqtt-broker",
                "name": "bench",
                "broker": "127.0.0.1",
                "port": str(port),
                "clientid": "",
                "autoConnect": True,
                "usetls": False,
                "protocolVersion": "4",
                "keepalive": "60",
                "cleansession": True,
            },
            {
                "id": "amqps",
                "type": "amqp-server",
                "host": "127.0.0.1",
                "port": "5672",
                "vhost": "",
                "keepalive": "30",
                "usetls": False,
                "verifyservercert": True,
                "usetopology": False,
                "topology": "{}",
            },
            # HTTP -> MQTT
            {
                "id": "hm_in",
                "type": "http in",
                "z": "tab1",
                "url": "/bench-mqtt",
                "method": "post",
                "upload": False,
                "wires": [["hm_out", "hm_resp"]],
            },
            {
                "id": "hm_out",
                "type": "mqtt out",
                "z": "tab1",
                "topic": f"bench/{uid}/out/http",
                "qos": "1",
                "retain": "false",
                "broker": "mq",
                "wires": [],
            },
            {"id": "hm_resp", "type": "http response", "z": "tab1", "statusCode": "202", "headers": {}, "wires": []},
            # HTTP -> AMQP
            {
                "id": "ha_in",
                "type": "http in",
                "z": "tab1",
                "url": "/bench-amqp",
                "method": "post",
                "upload": False,
                "wires": [["ha_out", "ha_resp"]],
            },
            {
                "id": "ha_out",
                "type": "amqp out",
                "z": "tab1",
                "routingkey": "bench.out",
                "iotype": "3",
                "ioname": ex,
                "server": "amqps",
                "wires": [],
            },
            {"id": "ha_resp", "type": "http response", "z": "tab1", "statusCode": "202", "headers": {}, "wires": []},
            # MQTT -> MQTT with a topic rewrite (in -> out)
            {
                "id": "mm_in",
                "type": "mqtt in",
                "z": "tab1",
                "topic": f"bench/{uid}/in/+",
                "qos": "1",
                "datatype": "buffer",
                "broker": "mq",
                "nl": False,
                "rap": True,
                "rh": 0,
                "inputs": 0,
                "wires": [["mm_rw"]],
            },
            {
                "id": "mm_rw",
                "type": "change",
                "z": "tab1",
                "rules": [
                    {
                        "t": "change",
                        "p": "topic",
                        "pt": "msg",
                        "from": "/in/",
                        "fromt": "str",
                        "to": "/out/",
                        "tot": "str",
                    }
                ],
                "wires": [["mm_out"]],
            },
            {
                "id": "mm_out",
                "type": "mqtt out",
                "z": "tab1",
                "topic": "",
                "qos": "1",
                "retain": "false",
                "broker": "mq",
                "wires": [],
            },
        ]
        log(f"starting Node-RED {version} on port {red.port}")
        red.start(flows)
        time.sleep(2.0)  # its broker connections come up after the HTTP port
        out: dict[str, dict[str, Any]] = {}
        mqtt_out = {"kind": "mqtt", "host": "127.0.0.1", "port": port, "topic": f"bench/{uid}/out/+"}
        amqp_out = {"kind": "amqp", "url": SHARED_AMQP, "exchange": ex, "queue": f"bench.nr.{uid}"}
        http_prod = {"kind": "http", "window": 64}
        cells: dict[str, tuple[dict[str, Any], dict[str, Any], str | None]] = {
            "http-mqtt": (mqtt_out, {**http_prod, "url": f"http://127.0.0.1:{red.port}/bench-mqtt"}, "/bench-mqtt"),
            "http-amqp": (amqp_out, {**http_prod, "url": f"http://127.0.0.1:{red.port}/bench-amqp"}, "/bench-amqp"),
            "mqtt-mqtt": (mqtt_out, mqtt_generator_spec(port, f"bench/{uid}/in/p1"), None),
        }
        try:
            for name in names:
                if self.over_budget(f"{name} [Node-RED]"):
                    continue
                cons, prod, url_path = cells[name]
                cell = Cell(
                    label=name,
                    system=f"Node-RED {version}",
                    producer=prod,
                    consumer=cons,
                    pid=lambda: red.pid,
                    wrk_url=f"http://127.0.0.1:{red.port}{url_path}" if url_path else None,
                )
                try:
                    out[name] = measure(cell, self.settings)
                except Exception as exc:
                    log(f"{name} [Node-RED] failed: {exc}")
                    out[name] = {"system": cell.system, "error": str(exc)}
        finally:
            red.stop()
            amqp_cleanup(SHARED_AMQP, [ex], [f"bench.nr.{uid}"])
        return out

    def rabbit_plugin(self) -> dict[str, Any]:
        # One node for every round (started at the first, stopped at the end of the run): starting one takes
        # about 10 s, which three rounds cannot spare within the 10 minutes.
        node = self.rabbit
        if node is None or node.pid() is None:
            node = self.rabbit = OwnRabbit(WORK / "rabbit")
            log(f"starting our own RabbitMQ node {node.node} with rabbitmq_mqtt (MQTT port {node.mqtt_port})")
            node.start()
        pid = node.pid()
        uid = f"{self.uid}-plugin"
        cell = Cell(
            label="mqtt-amqp",
            system="RabbitMQ 3.10 rabbitmq_mqtt plugin (own node; CPU/RSS = whole broker)",
            producer=mqtt_generator_spec(node.mqtt_port, f"bench/{uid}/in/p1"),  # the same C generator
            # The plugin publishes to amq.topic with '/' mapped to '.'.
            consumer={
                "kind": "amqp",
                "url": node.url,
                "exchange": "amq.topic",
                "declare_exchange": False,
                "routing_key": f"bench.{uid}.in.#",
                "queue": f"bench.plugin.{uid}",
            },
            pid=lambda: pid,
        )
        return measure(cell, self.settings)

    # ------------------------------------------------------------------------------------------ intake

    def intake(self, kind: str) -> dict[str, Any]:
        """One intake run of ``kind``'s inbound with its outbound stalled (``bench.intake``)."""
        path = PATHS[INTAKE_PATHS[kind]]
        hang = intake.Hang()
        env = self.env(f"intake-{kind}", stalled_port=hang.port)
        daemon = Daemon(path.config(env), Path(env.workdir), env.http_port)
        count = 3000 if self.args.quick else 20000
        run_id = next_run()
        log(f"intake-{kind} [{path.title} inbound, outbound stalled]: starting")
        try:
            if kind == "http":
                daemon.start()
                res = intake.http_intake(env.http_port, self.settings.sat_s, run_id, {})
            elif kind == "mqtt":
                daemon.start()
                res = intake.mqtt_intake(path.producer_spec(env), env.http_port, count, run_id, daemon.exited)
            else:
                daemon.start()  # declares the queue and its binding; stopped, the queue keeps what comes
                daemon.stop()
                intake.amqp_prefill(env.amqp_url, env.exchange_in, "p1", count, run_id)
                res = intake.amqp_intake(env.http_port, count, daemon.start, daemon.exited)
        finally:
            rc = daemon.stop()
            hang.close()
            amqp_cleanup(SHARED_AMQP, [env.exchange_in, env.exchange_out], [env.queue_in, env.queue_out])
        res["throughput_msgs_s"] = round(intake.rate(res), 1)
        res["daemon_exit"] = rc
        log(f"intake-{kind}: {res['throughput_msgs_s']:,.0f} msgs/s ({res['count']} in {res['seconds']} s)")
        return res

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> int:
        a = self.args
        WORK.mkdir(parents=True, exist_ok=True)
        names = a.path_names
        wrk_version = ensure_wrk() if any(PATHS[n].producer == "http" for n in names) else None
        generator_version = (
            ensure_generator() if any("mqtt" in (PATHS[n].producer, PATHS[n].consumer) for n in names) else None
        )
        self.results["meta"] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": a.quick,
            "payload_bytes": 1024,
            "settings": vars(self.settings),
            "rounds": self.rounds,
            "machine": {"cpus": _cpus(), "python": platform.python_version(), "kernel": platform.release()},
            "wrk": wrk_version,
            "mqtt_generator": generator_version,
            "amqp": "shared RabbitMQ 127.0.0.1:5672, unique exchange/queue names per run (deleted after)",
            "mosquitto": f"own instance on 127.0.0.1:{self.mosquitto.port}: set_tcp_nodelay true, "
            "max_queued_messages 1000000, max_inflight_messages 1000, persistence false",
        }
        self.mosquitto.start()
        rounds: list[dict[str, Any]] = []
        try:
            for r in range(self.rounds):
                log(f"round {r + 1} of {self.rounds}")
                rounds.append(self._suite(names, first=r == 0))
        finally:
            self.mosquitto.stop()
            self.otlp.stop()
            if self.rabbit is not None:
                self.rabbit.stop()
        self.results["rounds"] = rounds
        self.results.update(aggregate(rounds))
        self.results["intake"] = report.aggregate_intake(rounds, INTAKE_PATHS)
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
        out = Path(a.out)
        out.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        print(report.table(self.results))
        log(f"wrote {out} ({self.results['meta']['elapsed_s']} s)")
        failed = any("error" in (c or {}) for r in rounds for c in _cells(r))
        return 1 if failed else 0

    def _suite(self, names: list[str], *, first: bool) -> dict[str, Any]:
        """Every cell once: the ceilings, mediator on each path, then the peers."""
        a = self.args
        res: dict[str, Any] = {"paths": {}, "ceilings": {}}
        ceilings_needed = sorted({c for n in names for c in PATHS[n].ceilings})
        for kind in ceilings_needed:
            if self.over_budget(f"ceiling-{kind}"):
                continue
            res["ceilings"][kind] = self._guard(f"ceiling-{kind}", lambda k=kind: self.ceiling(k))
        for name in names:
            entry: dict[str, Any] = {"title": PATHS[name].title, "ceilings": list(PATHS[name].ceilings)}
            res["paths"][name] = entry
            if self.over_budget(name):
                continue
            entry["mediator"] = self._guard(name, lambda n=name: self.mediator(PATHS[n], profile=first))
            if name == AUTH_PATH and not a.no_auth:
                for row in auth_rows(a.jwt_cache_size):
                    what = f"{name} [{row.system}]"
                    if not self.over_budget(what):
                        entry[row.key] = self._guard(
                            what, lambda n=name, r=row: self.mediator(PATHS[n], profile=first, auth=r)
                        )
            if name == TRACING_PATH and not a.no_tracing and not self.over_budget(f"{name} [tracing]"):
                entry["mediator_tracing"] = self._guard(
                    f"{name} [tracing]", lambda n=name: self.mediator(PATHS[n], profile=first, tracing=True)
                )
            if name == TRACING_PATH and not a.no_metrics_off and not self.over_budget(f"{name} [metrics off]"):
                entry["mediator_metrics_off"] = self._guard(
                    f"{name} [metrics off]", lambda n=name: self.mediator(PATHS[n], profile=first, metrics=False)
                )
            if name == DASHBOARD_PATH and not a.no_dashboard and not self.over_budget(f"{name} [dashboard]"):
                entry["mediator_dashboard"] = self._guard(
                    f"{name} [dashboard]", lambda n=name: self.mediator(PATHS[n], profile=first, dashboard=True)
                )
            if name == STORE_PATH and not a.no_store and not self.over_budget(f"{name} [store]"):
                entry["mediator_store"] = self._guard(
                    f"{name} [store]", lambda n=name: self.mediator(PATHS[n], profile=first, store=True)
                )
            if name == CONTENT_PATH and not a.no_content and not self.over_budget(f"{name} [content]"):
                entry["mediator_content"] = self._guard(
                    f"{name} [content]", lambda n=name: self.mediator(PATHS[n], profile=first, content=True)
                )
            if name in WORKERS_PATHS and not a.no_workers and not self.over_budget(f"{name} [workers]"):
                entry[f"mediator_workers{WORKERS}"] = self._guard(
                    f"{name} [workers = {WORKERS}]",
                    lambda n=name: self.mediator(PATHS[n], profile=False, workers=WORKERS),
                )
            if name == MEMORY_PATH and not a.no_memory and not self.over_budget(f"{name} [memory]"):
                entry["mediator_memory"] = self._guard(
                    f"{name} [memory]", lambda n=name: self.mediator(PATHS[n], "memory", profile=first)
                )
            variants = [k for k in entry if k.startswith("mediator_") and k != "mediator_memory"]
            if variants and not self.over_budget(f"{name} [plain, again]"):
                # The plain row once more after the variants: the machine drifts within a round (later cells
                # ran slower than the first one, whatever they were), so /plain compares each variant with the
                # mean of the plain runs before and after it (report.aggregate).
                entry["plain_after"] = self._guard(
                    f"{name} [plain, after the variants]", lambda n=name: self.mediator(PATHS[n], profile=False)
                )
        if not a.no_intake:
            for kind, name in INTAKE_PATHS.items():
                if name in names and not self.over_budget(f"intake-{kind}"):
                    res.setdefault("intake", {})[kind] = self._guard(f"intake-{kind}", lambda k=kind: self.intake(k))
        if not a.no_peers:
            red_paths = [n for n in names if n in NODERED_PATHS]
            if red_paths and not self.over_budget("Node-RED"):
                try:
                    for name, cell in self.node_red(red_paths).items():
                        res["paths"][name].setdefault("peers", {})["node-red"] = cell
                except Exception as exc:
                    log(f"Node-RED peer failed: {exc}")
                    self.results["problems"].append({"cell": "Node-RED", "error": str(exc)})
            for name in names:
                if name in PLUGIN_PATHS and not self.over_budget(f"{name} [rabbitmq_mqtt]"):
                    cell = self._guard(f"{name} [rabbitmq_mqtt]", self.rabbit_plugin)
                    res["paths"][name].setdefault("peers", {})["rabbitmq-mqtt-plugin"] = cell
        return res

    def _guard(self, what: str, fn: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = fn()
            return result
        except Exception as exc:
            log(f"{what} FAILED: {exc}")
            return {"error": str(exc)[:2000]}


def _cells(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = list(results["ceilings"].values())
    for entry in results["paths"].values():
        out += [c for k, c in entry.items() if k.startswith("mediator")] + list(entry.get("peers", {}).values())
    return [c for c in out if c]


def _refused_without_credential(url: str) -> None:
    """An authenticated row measures authentication only if the daemon refuses a request that carries none."""
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    if status != 401:
        raise RuntimeError(f"{url} answered {status} to a request without a credential, not 401")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    return Bench(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
