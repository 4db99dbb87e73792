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


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    seconds: float
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


def run_target(name: str, seconds: int, out: Path, timeout_s: int, nice: int) -> Result:
    target = TARGETS[name]
    corpus = out / "corpus" / name
    findings = out / "findings" / name
    findings.mkdir(parents=True, exist_ok=True)
    _write_seeds(corpus, target.seeds())
    log = out / f"{name}.log"
    command = [
        *(["nice", "-n", str(nice)] if nice else []),
        sys.executable,
        "-m",
        "fuzz.run",
        name,
        f"-max_total_time={seconds}",
        f"-timeout={timeout_s}",
        f"-max_len={target.max_len}",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={findings}/",
        str(corpus),
    ]
    print(f"fuzz: {name} for {seconds} s ({' '.join(command)})", flush=True)
    started = time.monotonic()
    with log.open("w") as sink:
        # Bounded by libFuzzer's own -max_total_time; the margin covers start-up and a slow last input.
        proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds + 120 + timeout_s)
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    status = _STATUS.findall(text)
    last = status[-1] if status else ("0", "0", "0", "0", "0")
    executed = _EXECUTED.search(text)
    return Result(
        name=name,
        seconds=elapsed,
        executions=int(executed.group(1)) if executed else int(last[0]),
        cov=int(last[1]),
        ft=int(last[2]),
        corpus=int(last[3]),
        exec_per_s=int(last[4]),
        returncode=proc.returncode,
        findings=tuple(_ARTIFACT.findall(text)),
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
            f"fuzz: {name}: {verdict} in {result.seconds:.0f} s, {result.executions} executions, "
            f"cov {result.cov} ft {result.ft}, corpus {result.corpus}, {result.exec_per_s} exec/s"
            + "".join(f"\n  finding: {f}" for f in result.findings)
            + (f"\n  exit status {result.returncode}: see {args.out / (name + '.log')}" if result.returncode else ""),
            flush=True,
        )
    print(f"\n{'target':<20} {'seconds':>8} {'executions':>11} {'cov':>6} {'ft':>7} {'exec/s':>7}  result")
    for r in results:
        verdict = "ok" if r.ok else f"FOUND {len(r.findings)} (exit {r.returncode})"
        print(f"{r.name:<20} {r.seconds:>8.0f} {r.executions:>11} {r.cov:>6} {r.ft:>7} {r.exec_per_s:>7}  {verdict}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
