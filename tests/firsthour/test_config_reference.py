"""docs/config-reference.md is what scripts/gen_config_reference.py makes from the config models today."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_matches_the_models() -> None:
    text: str = generator().render()
    committed = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == text, "docs/config-reference.md is out of date: run `make docs` and commit it"


def test_reference_covers_every_section_and_the_listener_options() -> None:
    from mediator.config import RootConfig
    from mediator.registry import load_specs

    text: str = generator().render()
    for name in RootConfig.model_fields:
        assert f"[{name}" in text or f"[[{name}" in text, name
    for kind in load_specs():
        assert f'(kind = "{kind}")' in text, kind
    for key in ("max_body_bytes", "read_timeout_s", "admin", "drain_timeout_s", "log_format", "dedup_window_s"):
        assert f"| `{key}` |" in text, key


def test_config_toml_and_readme_link_it() -> None:
    assert "docs/config-reference.md" in (ROOT / "config.toml").read_text()
    assert "docs/config-reference.md" in (ROOT / "README.md").read_text()
