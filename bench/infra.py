"""The processes a benchmark run owns: its Mosquitto, its RabbitMQ node (for the MQTT plugin peer), the
daemon under test, Node-RED, and the client processes. All bind to 127.0.0.1; all are stopped at the end."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
CTX = mp.get_context("spawn")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def reachable(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not reachable(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} is not listening on {port} after {timeout_s} s")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- /proc


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and every live process below it (``workers = N``: the supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and the processes below it (all their threads). A child that
    exited (and was reaped) during the measurement takes its time with it: the benchmark never ends one."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """The sum of the peak RSS of ``pid`` and the processes below it."""
    return sum(_status_mb(p, "VmHWM:") for p in tree(pid))


def rss_mb(pid: int) -> float:
    """The sum of the RSS of ``pid`` and the processes below it."""
    return sum(_status_mb(p, "VmRSS:") for p in tree(pid))


def _status_mb(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------------------------------- Mosquitto


class Mosquitto:
    """Our own Mosquitto, with the two settings results depend on stated (see README)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            "persistence false\n"
        )
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=out, stderr=out)
        wait_port(self.port, 10, "mosquitto", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ------------------------------------------------------------------------------------------- RabbitMQ


@dataclass
class OwnRabbit:
    """A second RabbitMQ node with the MQTT plugin, on its own ports, name and data directory (never the
    shared node: see shared/SERVICES.md). As root the Debian wrappers run it as user rabbitmq."""

    base: Path
    port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.node = f"bench{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def ctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def start(self, timeout_s: float = 90) -> None:
        user = pwd.getpwnam("rabbitmq") if os.geteuid() == 0 else None
        if self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        files = {
            "rabbitmq.conf": (
                f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
                f"mqtt.listeners.tcp.local = 127.0.0.1:{self.mqtt_port}\n"
                "mqtt.allow_anonymous = true\n"
                "mqtt.tcp_listen_options.nodelay = true\n"
                "tcp_listen_options.nodelay = true\n"
            ),
            "enabled_plugins": "[rabbitmq_mqtt].\n",
            "rabbitmq-env.conf": "",  # not the system one, which names the shared node
        }
        for name, text in files.items():
            (self.base / name).write_text(text)
        if user is not None:
            for path in [self.base, *self.base.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=60, capture_output=True)
        deadline = time.monotonic() + timeout_s
        while self.ctl("await_startup", "--timeout", "5", timeout_s=30).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"own RabbitMQ node {self.node} did not start in {timeout_s} s")
            time.sleep(0.5)
        wait_port(self.port, 30, f"RabbitMQ node {self.node}")
        wait_port(self.mqtt_port, 30, f"RabbitMQ MQTT plugin of {self.node}")

    def pid(self) -> int | None:
        out = self.ctl("eval", "list_to_integer(os:getpid()).").stdout.strip()
        return int(out) if out.isdigit() else None

    def stop(self) -> None:
        self.ctl("stop", timeout_s=60)
        shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------------------- daemon


class Daemon:
    """The daemon under test: ``python -m mediator run --config`` on a generated config."""

    def __init__(self, config_text: str, workdir: Path, http_port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "config.toml"
        self.config.write_text(config_text)
        self.log = workdir / "daemon.log"
        self.http_port = http_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mediator", "run", "--config", str(self.config)],
                stdout=out,
                stderr=out,
                cwd=ROOT,
                env=env,
            )
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready after {timeout_s} s:\n{self.tail()}")
            time.sleep(0.1)

    def exited(self) -> str | None:
        """None while the daemon runs, else how it ended (the benchmark never stops it mid-cell)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with {rc}"
        return f"the daemon (pid {self.proc.pid}) {how}; last log: {self.tail(600)!r}"

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def problems(self) -> list[str]:
        """Log lines at warning level or above (the daemon logs at warning in the benchmark)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][:50]


# ------------------------------------------------------------------------------------------- Node-RED


NODERED_PACKAGES = ("node-red@4", "node-red-contrib-amqp@0.4")


class NodeRed:
    """Node-RED 4 installed from the npm registry into bench/.work/nodered, run on a generated flows.json."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "node-red.log"

    def install(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        red = self.dir / "node_modules" / "node-red" / "red.js"
        amqp = self.dir / "node_modules" / "node-red-contrib-amqp" / "package.json"
        if not (red.exists() and amqp.exists()):
            if shutil.which("npm") is None:
                raise RuntimeError("npm is not installed: cannot install Node-RED")
            log("installing Node-RED 4 and node-red-contrib-amqp from the npm registry into bench/.work/nodered")
            pkg = self.dir / "package.json"
            if not pkg.exists():
                pkg.write_text('{"name": "bench-nodered", "private": true}\n')
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *NODERED_PACKAGES],
                cwd=self.dir,
                check=True,
                timeout=400,
            )
        version: str = json.loads((self.dir / "node_modules" / "node-red" / "package.json").read_text())["version"]
        return version

    def start(self, flows: list[dict[str, Any]], timeout_s: float = 60) -> None:
        user = self.dir / "user"
        user.mkdir(parents=True, exist_ok=True)
        (user / "flows.json").write_text(json.dumps(flows, indent=1))
        (user / "settings.js").write_text(
            "module.exports = {\n"
            f"  uiPort: {self.port},\n"
            "  uiHost: '127.0.0.1',\n"
            "  flowFile: 'flows.json',\n"
            "  credentialSecret: false,\n"
            "  httpAdminRoot: '/admin',\n"
            "  httpNodeRoot: '/',\n"
            "  disableEditor: true,\n"
            "  logging: { console: { level: 'warn', metrics: false, audit: false } },\n"
            "  editorTheme: { tours: false },\n"
            "};\n"
        )
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["node", str(self.dir / "node_modules" / "node-red" / "red.js"), "--userDir", str(user)],
                stdout=out,
                stderr=out,
                cwd=self.dir,
            )
        wait_port(self.port, timeout_s, "Node-RED", self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ------------------------------------------------------------------------------------------- client processes


class Child:
    """A consumer or producer process and its end of the pipe."""

    def __init__(self, role: str, spec: dict[str, Any]) -> None:
        from bench import clients

        target = clients.consumer_main if role == "consumer" else clients.producer_main
        self.role = role
        self.spec = spec
        self.conn, child_conn = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(spec, child_conn), daemon=True)
        self.proc.start()
        child_conn.close()

    def expect(self, tag: str, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"{self.role} {self.spec['kind']}: no {tag!r} within {timeout_s} s")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"{self.role} {self.spec['kind']} failed:\n{msg[1]}")
        if msg[0] != tag:
            raise RuntimeError(f"{self.role} {self.spec['kind']}: expected {tag!r}, got {msg[0]!r}")
        return msg[1]

    def ready(self, timeout_s: float = 60) -> Any:
        return self.expect("ready", timeout_s)

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class OtlpSink:
    """An OTLP/HTTP receiver for the tracing row: answers every ``POST /v1/traces`` 200 and counts the
    spans it got (decoded with opentelemetry-proto), on threads of the benchmark's own process."""

    def __init__(self) -> None:
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        sink = self
        self.spans = 0
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector's OTLP/HTTP receiver

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                count = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with sink._lock:
                    sink.spans += count
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
