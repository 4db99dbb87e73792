"""The flake check (``make flake``): the end-to-end and fault directories, run ``--rounds`` times in a row
(whole runs, not a test repeated in place, so a test that leaves state behind for the next run shows too),
then one summary of every test that failed at least once, with the rounds it failed in.

Exit status 0 when every test passed in every round, 1 otherwise. The JUnit XML of each round and its
pytest output stay in ``--out`` (default ``var/flake``) to read a failure's details."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = [
    "tests/e2e",
    "tests/faults",
    "tests/push",
    "tests/scale",
    "tests/burst",
    "tests/observability",
]


def outcomes(junit: Path) -> dict[str, str]:
    """test id -> "passed", "failed", "error" or "skipped", from one round's JUnit XML."""
    out: dict[str, str] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = (case.get("classname") or "").replace(".", "/")
        name = f"{module}.py::{case.get('name')}"
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                state = "failed" if child.tag == "failure" else "error"
            elif child.tag == "skipped" and state == "passed":
                state = "skipped"
        # A failing teardown adds a second entry for the same test: keep the worst.
        if out.get(name) not in ("failed", "error"):
            out[name] = state
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "flake")
    parser.add_argument("dirs", nargs="*", default=DIRS, help=f"test paths (default: {' '.join(DIRS)})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed_in: dict[str, list[int]] = defaultdict(list)
    ran: set[str] = set()
    for n in range(1, args.rounds + 1):
        junit = args.out / f"round-{n}.xml"
        junit.unlink(missing_ok=True)
        started = time.monotonic()
        print(f"flake: round {n}/{args.rounds}: pytest {' '.join(args.dirs)}", flush=True)
        with (args.out / f"round-{n}.log").open("w") as log:
            code = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args.dirs],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode
        results = outcomes(junit)
        ran |= set(results)
        bad = sorted(name for name, state in results.items() if state in ("failed", "error"))
        for name in bad:
            failed_in[name].append(n)
        if not results:
            failed_in[f"(round {n}: pytest exited {code} without a report; see {args.out}/round-{n}.log)"].append(n)
        print(
            f"flake: round {n}: {len(results)} tests, {len(bad)} failed, exit {code}, "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
    print(f"flake: summary over {args.rounds} rounds of {len(ran)} tests")
    if not failed_in:
        print("flake: no test failed in any round")
        return 0
    for name, rounds in sorted(failed_in.items()):
        print(f"flake: FAILED {len(rounds)}/{args.rounds} (rounds {', '.join(map(str, rounds))}): {name}")
    print(f"flake: {len(failed_in)} tests failed at least once; details in {args.out}/round-N.log")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
