"""The fuzz targets stay alive, and what fuzzing found stays fixed (``make fuzz`` itself is not run here).

Every target's one-input function on its seeds (so a target that no longer imports, or no longer accepts
its own seeds, fails ``make test`` rather than the next fuzzing run), and on every input a run found, kept
under ``inputs/TARGET/`` (libFuzzer's crash-/timeout- files, renamed for what they are). A one-input
function returns on success and on its documented refusal; anything else it raises is the bug back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.targets import TARGETS

INPUTS = Path(__file__).parent / "inputs"

SEEDS = [pytest.param(name, i, id=f"{name}-seed{i}") for name, t in TARGETS.items() for i in range(len(t.seeds()))]
FOUND = sorted(p for p in INPUTS.glob("*/*") if p.is_file())


@pytest.mark.parametrize(("name", "index"), SEEDS)
def test_target_takes_its_seed(name: str, index: int) -> None:
    target = TARGETS[name]
    target.one_input(target.seeds()[index])


@pytest.mark.parametrize("path", FOUND, ids=[f"{p.parent.name}/{p.name}" for p in FOUND])
def test_found_input_is_refused_or_accepted(path: Path) -> None:
    assert path.parent.name in TARGETS, f"{path}: the folder names no target (one of {', '.join(TARGETS)})"
    TARGETS[path.parent.name].one_input(path.read_bytes())


def test_every_target_has_seeds_and_a_stated_refusal() -> None:
    for name, target in TARGETS.items():
        assert target.seeds(), name
        assert target.refusal, name


def test_truncated_seeds_are_refused_cleanly() -> None:
    """Each seed cut at a few points: cheap coverage of the short-input paths, on every target."""
    for target in TARGETS.values():
        for seed in target.seeds():
            for cut in {0, 1, 2, 3, len(seed) // 2, max(len(seed) - 1, 0)}:
                target.one_input(seed[:cut])
