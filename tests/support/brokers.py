"""Broker instances a test owns (and may stop, kill or restart). Never the shared ones."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port, reachable


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """The PEM files of a broker's TLS listener: its CA (which client certificates must chain to), its
    certificate and key. The listener requires a client certificate."""

    ca_file: Path
    cert_file: Path
    key_file: Path


GENEROUS_LIMITS = "set_tcp_nodelay true\nmax_queued_messages 100000\n"
DEBIAN_LIMITS = "max_queued_messages 1000\nmax_inflight_messages 20\n"
"""Mosquitto 2.0's defaults, which Debian's /etc/mosquitto/mosquitto.conf leaves as they are (and no
``set_tcp_nodelay``)."""


class MosquittoInstance:
    """A Mosquitto on a free loopback port, with a config that states the settings results depend on.

    With ``tls``, a second listener on ``tls_port`` speaks TLS only and requires a client certificate
    signed by ``tls.ca_file`` (the plain listener on ``port`` stays, for ``start`` to wait on).

    ``limits``: the config lines that decide whether a burst survives; by default generous ones, with
    ``DEBIAN_LIMITS`` the broker behaves as Debian installs it. ``extra``: more config lines (say
    ``sys_interval 1``, for a test that reads ``$SYS``)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        tls: BrokerTls | None = None,
        limits: str = GENEROUS_LIMITS,
        extra: str = "",
    ) -> None:
        self.port = port or free_port()
        self.tls_port = free_port() if tls is not None else None
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"{limits}"
            f"{extra}"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            # Started as root, mosquitto drops to the user "mosquitto", which cannot write (or even reach)
            # a test's temporary directory: persistence would fail silently ("Error saving in-memory
            # database") and a restart would lose every session and queued message. (Staying root also
            # lets it read a TLS key the test wrote, which the user "mosquitto" could not.)
            + (
                ""
                if tls is None
                else f"listener {self.tls_port} 127.0.0.1\n"
                f"cafile {tls.ca_file}\n"
                f"certfile {tls.cert_file}\n"
                f"keyfile {tls.key_file}\n"
                "require_certificate true\n"
            )
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.workdir / f"mosquitto-{self.port}.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                "mosquitto", "-c", str(self.conf), stdout=asyncio.subprocess.DEVNULL, stderr=log
            )
        async with asyncio.timeout(10):
            while not all(reachable("127.0.0.1", port, 0.2) for port in self.ports()):
                if self.proc.returncode is not None:
                    raise AssertionError(f"mosquitto exited with {self.proc.returncode}")
                await asyncio.sleep(0.05)

    def ports(self) -> list[int]:
        return [self.port] if self.tls_port is None else [self.port, self.tls_port]

    async def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
        async with asyncio.timeout(10):
            await self.proc.wait()
        self.proc = None

    async def restart(self, kill: bool = False, down_s: float = 0.5) -> None:
        await self.stop(kill=kill)
        await asyncio.sleep(down_s)
        await self.start()


STARTUP_TIMEOUT_S = 90.0


def _chown(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


class RabbitNode:
    """A second RabbitMQ node on free loopback ports, with its own name, config, env file and data
    (shared/SERVICES.md): never the shared node on 5672, so a test may stop, kill and restart it.

    The synchronous methods (``start``, ``stop``, ``ctl``) are for session fixtures; tests use the
    ``a*`` variants, which do not block the event loop.

    With ``tls``, the node also listens for amqps on ``tls_port`` (``tls_url``), with ``verify_peer`` and
    ``fail_if_no_peer_cert``: a client without a certificate signed by ``tls.ca_file`` is refused. The
    files are copied into the node's directory, which its user can read."""

    def __init__(self, base: Path | None = None, tls: BrokerTls | None = None) -> None:
        # As root the Debian wrappers re-run the server as the rabbitmq user, which must own its files.
        self._user = pwd.getpwnam("rabbitmq") if os.geteuid() == 0 else None
        self.base = base or Path(tempfile.mkdtemp(prefix="mediator-rabbit-"))
        self.port, dist_port = free_port(), free_port()
        self.node = f"t{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.pid_file = self.base / "rabbit.pid"
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        _chown(self.base, self._user)
        conf = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        self.tls_port: int | None = None
        self.tls_url: str | None = None
        if tls is not None:
            self.tls_port = free_port()
            self.tls_url = f"amqps://guest:guest@127.0.0.1:{self.tls_port}/"
            tls_dir = self.base / "tls"
            tls_dir.mkdir()
            _chown(tls_dir, self._user)
            copies = {}
            for role, source in (("cacertfile", tls.ca_file), ("certfile", tls.cert_file), ("keyfile", tls.key_file)):
                copies[role] = tls_dir / f"{role}.pem"
                shutil.copyfile(source, copies[role])
                copies[role].chmod(0o600)
                _chown(copies[role], self._user)
            conf += (
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                + "".join(f"ssl_options.{role} = {path}\n" for role, path in copies.items())
                + "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
            )
        files = {
            # Our own config file: the system one pins the listener to 5672, the shared node's port.
            "rabbitmq.conf": conf,
            "enabled_plugins": "[].\n",
            "rabbitmq-env.conf": "",  # not the system one, which names the shared node
        }
        for name, text in files.items():
            (self.base / name).write_text(text)
            _chown(self.base / name, self._user)

    def ctl_argv(self, *args: str) -> list[str]:
        return ["rabbitmqctl", "-n", self.node, *args]

    def ctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ctl_argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    async def actl(self, *args: str, timeout_s: float = 60.0, check: bool = True) -> int:
        """rabbitmqctl from a test's event loop; raises AssertionError on a non-zero exit if ``check``."""
        proc = await asyncio.create_subprocess_exec(
            *self.ctl_argv(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        code = proc.returncode or 0
        if check and code != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {out.decode(errors='replace')}")
        return code

    def start(self) -> None:
        """Start the node and wait until it has booted and listens (about 4 s warm, 10 s cold)."""
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=60, capture_output=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        # -detached returns at once: poll until the node has booted.
        while self.ctl("await_startup", "--timeout", "5", timeout_s=30).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"RabbitMQ node {self.node} did not start in {STARTUP_TIMEOUT_S} s\n{self.logs()}")
            time.sleep(0.5)
        for port in [self.port] if self.tls_port is None else [self.port, self.tls_port]:
            if not reachable("127.0.0.1", port):
                raise AssertionError(f"RabbitMQ node {self.node} is up but not listening on {port}\n{self.logs()}")

    async def astart(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            "rabbitmq-server", "-detached", env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        async with asyncio.timeout(60):
            await proc.wait()
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while await self.actl("await_startup", "--timeout", "5", timeout_s=30, check=False) != 0:
                await asyncio.sleep(0.5)
            while not reachable("127.0.0.1", self.port, 0.2):
                await asyncio.sleep(0.1)

    def beam_pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    async def akill(self) -> None:
        """kill -9 the node's Erlang VM and wait until it is gone (no clean shutdown, no flush)."""
        pid = self.beam_pid()
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            while _alive(pid) or reachable("127.0.0.1", self.port, 0.2):
                await asyncio.sleep(0.05)

    async def stop_app(self) -> None:
        await self.actl("stop_app")

    async def start_app(self) -> None:
        await self.actl("start_app", timeout_s=120)

    def is_running(self) -> bool:
        return self.ctl("status", timeout_s=30).returncode == 0

    def stop(self) -> None:
        self.ctl("stop", timeout_s=60)

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.base / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class NatsServer:
    """A nats-server with JetStream on a free loopback port, its store in ``workdir`` (so a restart keeps
    streams, consumers and messages): never the shared one on 4222, so a test may stop and restart it.
    With ``tls``, clients must speak TLS and present a certificate signed by ``tls.ca_file``."""

    def __init__(self, workdir: Path, tls: BrokerTls | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"{'tls' if tls else 'nats'}://127.0.0.1:{self.port}"
        self.argv = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(workdir / "js")]
        if tls is not None:
            self.argv += ["--tlsverify", "--tlscert", str(tls.cert_file), "--tlskey", str(tls.key_file)]
            self.argv += ["--tlscacert", str(tls.ca_file)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.workdir / "nats-server.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=log)
        async with asyncio.timeout(10):
            while not reachable("127.0.0.1", self.port, 0.2):
                if self.proc.returncode is not None:
                    raise AssertionError(f"nats-server exited with {self.proc.returncode}")
                await asyncio.sleep(0.05)

    async def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        async with asyncio.timeout(10):
            await self.proc.wait()
        self.proc = None

    async def restart(self, kill: bool = False, down_s: float = 0.5) -> None:
        await self.stop(kill=kill)
        await asyncio.sleep(down_s)
        await self.start()


@contextlib.contextmanager
def own_rabbit_node() -> Iterator[RabbitNode]:
    """A ``RabbitNode`` started for a session or module fixture, stopped and removed afterwards; a node that
    cannot start fails the test (never skips it)."""
    import pytest

    if shutil.which("rabbitmq-server") is None:
        pytest.fail("rabbitmq-server is not installed; `make test` installs it (see README)")
    node = RabbitNode()
    try:
        try:
            node.start()
        except AssertionError as exc:
            pytest.fail(str(exc))
        yield node
    finally:
        node.stop()
        node.remove()
