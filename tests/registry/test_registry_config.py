"""What the config refuses about the registry, with the key path (no daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediator.config import loads
from mediator.core.errors import ConfigError
from mediator.registry import load_specs
from tests.support.daemon import Quickstart

SUBJECT_SCHEMA = """
[[schemas]]
name = "orders"
types = ["com.example.order.created"]
schema = { subject = "orders-value" }

[[routes]]
name = "avro"
match = { type = ["com.example.avro"] }
to = [{ outbound = "orders-exchange", address = "a", convert = { to = "avro", subject = "orders-value" } }]
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        loads(text, load_specs())
    return refused.value.problems


def test_subjects_need_the_registry(tmp_path: Path) -> None:
    qs = Quickstart(tmp_path, overrides={"registry": {"enabled": False}}, extra_toml=SUBJECT_SCHEMA)
    problems = _problems(qs.render())
    assert "schemas[0].schema: names a registry subject, but [registry] is not enabled" in problems
    assert any(p.startswith("routes['avro'].to[0].convert.subject: names a registry subject") for p in problems)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"registry": {"listener": "grpc"}}, "registry.listener: no http listener named 'grpc'"),
        ({"registry": {"backend": "postgresql"}}, "needs dsn_env"),
    ],
)
def test_registry_section_is_checked(tmp_path: Path, overrides: dict[str, dict[str, object]], expected: str) -> None:
    problems = _problems(Quickstart(tmp_path, overrides=overrides).render())
    assert any(expected in p for p in problems), problems


def test_a_subject_and_a_file_are_exclusive(tmp_path: Path) -> None:
    text = Quickstart(tmp_path, extra_toml=SUBJECT_SCHEMA.replace("schema = {", 'file = "x.json"\nschema = {')).render()
    assert any("give file (a schema file) or schema (a registry subject)" in p for p in _problems(text))
