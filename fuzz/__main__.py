"""``python -m fuzz``: every target (or ``--targets a,b``) under atheris, one after another, for ``--seconds``
each; a table of executions, coverage and findings at the end; exit status 1 when any target found something.

Per target, under ``--out`` (var/fuzz): ``corpus/NAME/`` (the seeds, then whatever the fuzzer keeps; kept
between runs, so a later run starts where the last one ended), ``findings/NAME/`` (libFuzzer's crash-,
timeout- and oom- files: the inputs to add to tests/fuzz_regressions/inputs/NAME/), ``NAME.log``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import TARGETS

# libFuzzer's status lines: "#12345\tREDUCE cov: 812 ft: 2011 corp: 90/3Kb lim: 4 exec/s: 411 rss: 88Mb ..."
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+)", re.MULTILINE)
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
MAX_SESSIONS = 8


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    seconds: float  # wall time, start-up included
    fuzzed: float  # of which fuzzing
    executions: int
    cov: int
    ft: int
    corpus: int
    exec_per_s: int
    returncode: int
    findings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.findings


def _write_seeds(corpus: Path, seeds: list[bytes]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)


def _session(command: list[str], log: Path, limit_s: float) -> tuple[int, float, str]:
    """One libFuzzer process: (exit status, seconds it fuzzed, its output). The fuzzing time starts at
    libFuzzer's "INFO: Seed:" line, after the instrumented imports (a minute on a busy machine)."""
    with log.open("a") as sink:
        offset = sink.tell()
        started = time.monotonic()
        fuzzing_since: float | None = None
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > limit_s:
                    proc.kill()  # libFuzzer's own -max_total_time failed to end it: a hang in start-up
                    proc.wait()
                    break
                if fuzzing_since is None and "INFO: Seed:" in log.read_text(errors="replace")[offset:]:
                    fuzzing_since = time.monotonic()
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ended = time.monotonic()
    text = log.read_text(errors="replace")[offset:]
    return proc.returncode, ended - (fuzzing_since or ended), text


def run_target(name: str, seconds: int, out: Path, timeout_s: int, nice: int) -> Result:
    """Fuzz ``name`` for ``seconds`` of fuzzing time. libFuzzer stops at a finding; the target is then
    started again on the same corpus for the time left (up to ``MAX_SESSIONS`` sessions), so one finding
    does not end the run and every finding of the run is listed."""
    target = TARGETS[name]
    corpus = out / "corpus" / name
    findings = out / "findings" / name
    findings.mkdir(parents=True, exist_ok=True)
    _write_seeds(corpus, target.seeds())
    log = out / f"{name}.log"
    log.write_text("")
    started = time.monotonic()
    fuzzed = 0.0
    executions = 0
    found: list[str] = []
    worst = 0
    last = ("0", "0", "0", "0", "0")
    for _ in range(MAX_SESSIONS):
        left = int(seconds - fuzzed)
        if left < 5:
            break
        command = [
            *(["nice", "-n", str(nice)] if nice else []),
            sys.executable,
            "-m",
            "fuzz.run",
            name,
            f"-max_total_time={left}",
            f"-timeout={timeout_s}",
            f"-max_len={target.max_len}",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={findings}/",
            str(corpus),
        ]
        print(f"fuzz: {name} for {left} s ({' '.join(command)})", flush=True)
        returncode, session_s, text = _session(command, log, limit_s=left + 900 + timeout_s)
        fuzzed += session_s
        status = _STATUS.findall(text)
        last = status[-1] if status else last
        executed = _EXECUTED.search(text)
        executions += int(executed.group(1)) if executed else int(status[-1][0]) if status else 0
        artifacts = _ARTIFACT.findall(text)
        found += artifacts
        if returncode != 0 and not artifacts:
            worst = returncode  # failed without an input to show: a broken target, not a finding
            break
        if returncode == 0:
            break
    return Result(
        name=name,
        seconds=time.monotonic() - started,
        fuzzed=fuzzed,
        executions=executions,
        cov=int(last[1]),
        ft=int(last[2]),
        corpus=int(last[3]),
        exec_per_s=int(executions / fuzzed) if fuzzed else 0,
        returncode=worst,
        findings=tuple(found),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--seconds", type=int, default=600, help="per target (default 600)")
    parser.add_argument("--targets", default="", help=f"comma-separated, of: {', '.join(TARGETS)} (default all)")
    parser.add_argument("--out", type=Path, default=Path("var/fuzz"))
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it is a finding")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the fuzzing processes (0: not nice'd)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()] or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    results = []
    for name in names:
        result = run_target(name, args.seconds, args.out, args.timeout, args.nice)
        results.append(result)
        verdict = "ok" if result.ok else "FOUND"
        print(
            f"fuzz: {name}: {verdict}, fuzzed {result.fuzzed:.0f} s ({result.seconds:.0f} s with start-up), "
            f"{result.executions} executions, "
            f"cov {result.cov} ft {result.ft}, corpus {result.corpus}, {result.exec_per_s} exec/s"
            + "".join(f"\n  finding: {f}" for f in result.findings)
            + (f"\n  exit status {result.returncode}: see {args.out / (name + '.log')}" if result.returncode else ""),
            flush=True,
        )
    print(f"\n{'target':<20} {'fuzzed s':>8} {'executions':>11} {'cov':>6} {'ft':>7} {'exec/s':>7}  result")
    for r in results:
        verdict = "ok" if r.ok else f"FOUND {len(r.findings)}" + (f" (exit {r.returncode})" if r.returncode else "")
        print(f"{r.name:<20} {r.fuzzed:>8.0f} {r.executions:>11} {r.cov:>6} {r.ft:>7} {r.exec_per_s:>7}  {verdict}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
