"""Issue 19, items 7 and 10: ``mediator check`` lists every problem of a config in one run (a CEL syntax
error no longer hides a missing outbound), and warns about an authorization rule that allows every
authenticated principal (exit status 0 when that is all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mediator.config import loads
from mediator.core.errors import ConfigError
from mediator.registry import load_specs

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "config.toml").read_text()

pytestmark = pytest.mark.timeout(60)


def mediator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mediator", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def edit(text: str, old: str, new: str) -> str:
    assert old in text, f"config.toml no longer contains {old!r}"
    return text.replace(old, new, 1)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loads(text, load_specs(), "config.toml")
    return caught.value.problems


def test_a_cel_error_and_a_missing_outbound_are_listed_in_one_run(tmp_path: Path) -> None:
    text = edit(SHIPPED, 'name = "orders"\n', 'name = "orders"\nwhen = "data.total >"\n')
    text = edit(text, '{ outbound = "mqtt", address = "orders/created" }', '{ outbound = "nowhere", address = "x" }')
    text = edit(text, "drain_timeout_s = 10.0", "drain_timout_s = 10.0")
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = mediator("check", "--config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert "(3 error(s))" in lines[0], result.stderr
    assert any(line.startswith(f'{path}: routes["orders"].when: ') and "Syntax error" in line for line in lines)
    assert f"{path}: routes[\"orders\"].to[1].outbound: no outbound named 'nowhere'" in lines, result.stderr
    assert any(line.startswith(f"{path}: daemon.drain_timout_s: ") for line in lines), result.stderr


def test_a_broken_authenticator_is_reported_once_not_again_as_missing() -> None:
    text = edit(SHIPPED, "port = 50051", 'port = 50051\nauth = ["keys"]')
    text += '\n[auth.keys]\nkind = "api_key"\nkeys_file = "k.toml"\nsecret = "inline"\n'
    text = edit(text, '{ outbound = "mqtt", address = "orders/created" }', '{ outbound = "nowhere", address = "x" }')
    problems = problems_of(text)
    assert [p for p in problems if p.startswith("auth.keys")] == [
        "auth.keys: inline secrets are refused (secret): name a file (keys_file, jwks_file) or an environment "
        "variable (keys_env, secret_env) instead"
    ], problems
    assert not [p for p in problems if "no authenticator" in p], problems
    assert "routes[\"orders\"].to[1].outbound: no outbound named 'nowhere'" in problems, problems


def test_a_removed_array_element_does_not_shift_later_errors_onto_it() -> None:
    # authorization[0] lacks its name (removed to check the rest); authorization[1]'s unknown inbound would
    # then be reported as authorization[0]'s: no index-addressed later error of that array is reported.
    text = SHIPPED + (
        '\n[[authorization]]\ninbounds = ["orders-http"]\n\n[[authorization]]\nname = "b"\ninbounds = ["ghost"]\n'
    )
    text = edit(text, '{ outbound = "mqtt", address = "orders/created" }', '{ outbound = "nowhere", address = "x" }')
    problems = problems_of(text)
    assert "authorization[0].name: Field required" in problems, problems
    assert not [p for p in problems if p.startswith("authorization[0].inbounds")], problems
    assert "routes[\"orders\"].to[1].outbound: no outbound named 'nowhere'" in problems, problems


KEYED = (
    edit(SHIPPED, "port = 8080", 'port = 8080\nauth = ["keys"]\nallow_anonymous = true')
    + '\n[auth.keys]\nkind = "api_key"\nkeys_env = "CHECK_TEST_KEYS"\n'
)


def test_check_warns_about_a_rule_that_allows_every_authenticated_principal(tmp_path: Path) -> None:
    # The README's shape: inbounds = [...] and anonymous = true, meant for anonymous callers. On an inbound
    # that authenticates, the empty principals and roles also let every key holder through.
    text = KEYED + (
        '\n[[authorization]]\nname = "anonymous-orders"\ninbounds = ["orders-http"]\nanonymous = true\n'
        '\n[[authorization]]\nname = "publishers"\nroles = ["publisher"]\ninbounds = ["orders-http"]\n'
        '\n[[authorization]]\nname = "devices"\ninbounds = ["devices"]\nanonymous = true\n'  # nothing authenticates
        '\n[[authorization]]\nname = "no-contractors"\neffect = "deny"\ninbounds = ["orders-http"]\n'
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = mediator("check", "--config", str(path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "ok" in result.stdout
    warnings = [line.strip() for line in result.stderr.splitlines() if "warning: authorization" in line]
    assert len(warnings) == 1, result.stderr
    [warning] = warnings
    assert warning.startswith("warning: authorization[0] ('anonymous-orders'): allows every authenticated principal")
    assert "and anonymous callers" in warning
    assert "'orders-http' (auth keys)" in warning
    assert "any event type" in warning
    assert "narrow it with roles = [...] or principals = [...]" in warning


def test_no_warning_for_rules_that_name_who(tmp_path: Path) -> None:
    text = KEYED + '\n[[authorization]]\nname = "billing"\nprincipals = ["billing"]\ntypes = ["com.example.*"]\n'
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = mediator("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "warning: authorization" not in result.stderr, result.stderr
