"""The README a newcomer reads in one sitting: its sections in order, every link into docs/ resolving to a file
and a heading that exist, and the quickstart's command blocks run as written against a real daemon on the
shipped config (the same commands, moved onto this test's ports and broker names), each consumer receiving
what the README's comments say it prints."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiomqtt
import pytest

from tests.support.daemon import DaemonProcess, Quickstart

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SECTIONS = ["Two commands", "Commands", "The quickstart flows", "Configuring", "Securing", "Operating"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}


def test_readme_sections_come_in_reading_order() -> None:
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    top = re.findall(r"^## (.+)$", prose, flags=re.M)
    assert [t for t in top if t in SECTIONS] == SECTIONS, top
    assert top[0] == "Two commands", "keep the two set-up commands at the top"
    docs = ("benchmarks", "internals", "operations", "security", "content", "config-reference")
    for doc in (f"docs/{name}.md" for name in docs):
        assert f"]({doc}" in README, f"the README links {doc} from a short section"
    assert "msgs/s" not in prose, "benchmark tables belong in docs/benchmarks.md"


@pytest.mark.parametrize(
    "doc",
    ["README.md", *(f"docs/{name}.md" for name in ("operations", "internals", "benchmarks", "security", "content"))],
)
def test_every_relative_link_resolves(doc: str) -> None:
    source = ROOT / doc
    text = source.read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links or doc != "README.md"
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (source.parent / path).resolve() if path else source
        assert target.exists(), f"{doc}: {link} names a file that does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target.read_text()), f"{doc}: {link}: no heading #{anchor} in {path or doc}"


# --- The quickstart's command blocks, run ---------------------------------------------------------------


def quickstart_blocks() -> list[str]:
    start = README.index("## The quickstart flows")
    section = README[start : README.index("\n## ", start)]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


@dataclass
class Job:
    """A command of a block: a consumer run in the background (`&`, or a tail in its own terminal) or a command
    run to completion; what the README's comments after it say it, or a named consumer, prints."""

    command: str
    background: bool
    terminal: str | None = None
    expect: list[tuple[str | None, str]] = field(default_factory=list)  # (consumer tool or terminal, text)


def parse(block: str) -> list[Job]:
    jobs: list[Job] = []
    terminal: str | None = None  # a "# terminal N, ..." comment attributes the lines after it to terminal N
    for raw in block.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            text = line[1:].strip()
            if m := re.match(r"(terminal \d+)\b", text):
                terminal = m.group(1)
                continue
            expected, _, owner = text.partition("<-")
            who = owner.split()[0] if owner.strip() else terminal
            assert jobs, f"a comment before any command: {raw}"
            jobs[-1].expect.append((who, expected.strip()))
            continue
        terminal = None
        command, _, comment = line.partition("  #")
        command = command.strip()
        term = re.match(r"\s*(terminal \d+)", comment)
        background = command.endswith("&") or term is not None
        jobs.append(Job(command.rstrip("&").strip(), background, term.group(1) if term else None))
    return jobs


def checkable(expected: str) -> str | None:
    """The part of an expected line that must appear verbatim: a JSON object without elisions, the status
    line of an HTTP answer, or the whole line when it elides nothing."""
    if expected.startswith("HTTP/1.1 "):
        return " ".join(expected.split()[:2])
    if m := re.search(r"\{[^{}…]*\}", expected):
        return m.group(0)
    head = re.split(r"…|\.\.\.", expected)[0]
    if head == expected:
        return expected
    head = re.sub(r"[^\s:]*$", "", head)  # the word the elision cut short
    return head if len(head) >= 8 else None


@dataclass
class Running:
    job: Job
    proc: asyncio.subprocess.Process
    out: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace")


class Walkthrough:
    def __init__(self, qs: Quickstart, workdir: Path) -> None:
        self.qs = qs
        self.workdir = workdir
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.running: list[Running] = []

    def localize(self, command: str) -> str:
        qs = self.qs
        command = command.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{qs.http_port}")
        command = command.replace("127.0.0.1:50051", f"127.0.0.1:{qs.grpc_port}")
        command = re.sub(r"-e (orders|telemetry|commands)\b", lambda m: f"-e {m.group(1)}-{qs.uid}", command)
        return re.sub(r"-t '?([^' ]+)'?", lambda m: f"-t '{qs.topic_prefix}{m.group(1)}'", command)

    async def start(self, job: Job, index: int) -> Running:
        out = self.workdir / f"job{index}.out"
        with out.open("wb") as sink:
            proc = await asyncio.create_subprocess_shell(
                self.localize(job.command),
                stdout=sink,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,
            )
        run = Running(job, proc, out)
        self.running.append(run)
        return run

    async def until_listening(self, run: Running) -> None:
        """A consumer in the background is ready once it receives: probe it until a probe shows in its output
        (the README's reader starts it and waits a moment; a test must not guess how long)."""
        words = shlex.split(self.localize(run.job.command))
        tool = Path(words[0]).name
        probe = f"probe-{time.monotonic_ns()}"
        deadline = time.monotonic() + 20
        while probe not in run.output():
            assert run.proc.returncode is None, f"{run.job.command} exited:\n{run.output()}"
            assert time.monotonic() < deadline, f"{run.job.command} never received a probe:\n{run.output()}"
            if tool == "amqp-consume":
                exchange = words[words.index("-e") + 1]
                key = words[words.index("-r") + 1].replace("#", "probe").replace("*", "probe")
                await self.amqp_probe(exchange, key, probe)
            elif tool == "mosquitto_sub":
                topic = words[words.index("-t") + 1].replace("+", "probe").replace("#", "probe")
                async with aiomqtt.Client("127.0.0.1", 1883) as mqtt:
                    await mqtt.publish(topic, probe, qos=1)
            else:  # a tail: it says when it is subscribed
                probe = "subscribed"
            await asyncio.sleep(0.2)

    async def amqp_probe(self, exchange: str, key: str, probe: str) -> None:
        connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/", timeout=5)
        async with connection:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                ex = await channel.get_exchange(exchange, ensure=True)
                await ex.publish(aio_pika.Message(probe.encode()), routing_key=key)

    async def close(self) -> None:
        for run in self.running:
            if run.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGTERM)
                try:
                    async with asyncio.timeout(5):
                        await run.proc.wait()
                except TimeoutError:
                    os.killpg(run.proc.pid, signal.SIGKILL)
                    await run.proc.wait()


@pytest.fixture
async def walkthrough(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> AsyncIterator[Walkthrough]:
    qs = Quickstart(tmp_path)
    config = qs.write()
    daemon = DaemonProcess(config, qs.http_port, tmp_path / "daemon.log")
    await daemon.start()
    walk = Walkthrough(qs, tmp_path)
    try:
        yield walk
    finally:
        await walk.close()
        code = await daemon.stop()
        assert code == 0, daemon.logs()


async def test_readme_quickstart_commands_run_as_written(walkthrough: Walkthrough) -> None:
    blocks = quickstart_blocks()
    assert len(blocks) >= 4, "the four flows each have a command block"
    pending: list[tuple[str, str, list[Running]]] = []  # (what, text, where it may appear)
    index = 0
    for block in blocks:
        for job in parse(block):
            index += 1
            run = await walkthrough.start(job, index)
            if job.background:
                await walkthrough.until_listening(run)
            else:
                async with asyncio.timeout(30):
                    code = await run.proc.wait()
                assert code == 0, f"{job.command} exited with {code}:\n{run.output()}"
            for who, expected in job.expect:
                text = checkable(expected)
                if text is None:
                    continue
                # "<- tool" names the consumer that prints it; any other words after "<-" are a remark
                where = [
                    r
                    for r in walkthrough.running
                    if who is not None and (r.job.terminal == who or Path(shlex.split(r.job.command)[0]).name == who)
                ] or [run]
                pending.append((f"{job.command} -> {who or 'its own output'}", walkthrough.localize(text), where))
    assert pending, "the quickstart's comments say what the commands print"
    deadline = time.monotonic() + 30
    while missing := [(w, t) for w, t, where in pending if not any(t in r.output() for r in where)]:
        if time.monotonic() > deadline:
            seen = "\n".join(f"--- {r.job.command}\n{r.output()[-2000:]}" for r in walkthrough.running)
            pytest.fail(f"the README says these appear, they did not: {missing}\n{seen}")
        await asyncio.sleep(0.2)


def test_every_outbound_an_example_names_is_defined() -> None:
    """A route example's `outbound = "X"` names one the shipped config has or the README defines."""
    defined = set(tomllib.loads((ROOT / "config.toml").read_text()).get("outbound", {}))
    used: set[str] = set()
    for block in re.findall(r"```toml\n(.*?)```", README, flags=re.S):
        used |= set(re.findall(r'outbound\s*=\s*"([^"]+)"', block))
        defined |= set(re.findall(r"^\[outbound\.([\w-]+)\]", block, flags=re.M))
    assert used, "the README's route examples name outbounds"
    assert used <= defined, f"the README uses outbounds it never defines: {sorted(used - defined)}"


def test_the_makefile_and_the_readme_agree_on_how_long_make_bench_takes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    said = [set(re.findall(r"bench\w*\W[^\n]*?about (\d+) minutes", text)) for text in (makefile, README)]
    assert all(len(s) == 1 for s in said), f"one duration each in the Makefile and the README: {said}"
    assert said[0] == said[1], f"make bench's duration differs: Makefile {said[0]}, README {said[1]}"
