"""Issue 19, item 4: ``mediator status`` and ``mediator dead-letters`` authenticate to the admin endpoints
of a running daemon with ``auth`` on: refused (401, a clear message naming --token-env) without a
credential, served with ``--token-env`` (the admin token) or ``--api-key-env`` (a key with the admin role),
refused (403) for a key without it; a credential's value is never printed. ``publish`` takes the same
``-env`` forms over gRPC."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mediator.stages.authn import new_api_key
from tests.cli.support import cli
from tests.support.daemon import DaemonProcess, Quickstart

pytestmark = pytest.mark.timeout(90)

ADMIN_TOKEN = "admin-token-for-the-cli-test-0123456789"


class Keyed:
    def __init__(self, quickstart: Quickstart, daemon: DaemonProcess, admin_key: str, plain_key: str) -> None:
        self.quickstart = quickstart
        self.daemon = daemon
        self.admin_key = admin_key
        self.plain_key = plain_key
        self.config = str(daemon.config)


@pytest.fixture
async def keyed(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Keyed]:
    """The quickstart with API keys on both listeners and an admin token on the HTTP one."""
    admin_key, admin_digest = new_api_key()
    plain_key, plain_digest = new_api_key()
    monkeypatch.setenv(
        "CLI_TEST_KEYS",
        f'[[keys]]\nprincipal = "ops"\nsha256 = "{admin_digest}"\nroles = ["admin"]\n'
        f'[[keys]]\nprincipal = "billing"\nsha256 = "{plain_digest}"\nroles = ["publisher"]\n',
    )
    monkeypatch.setenv("CLI_TEST_ADMIN_TOKEN", ADMIN_TOKEN)  # the daemon's admin_token_env
    quickstart = Quickstart(
        tmp_path,
        overrides={
            "listeners.http": {"auth": ["keys"], "admin_token_env": "CLI_TEST_ADMIN_TOKEN"},
            "listeners.grpc": {"auth": ["keys"]},
        },
        extra_toml='[auth.keys]\nkind = "api_key"\nkeys_env = "CLI_TEST_KEYS"\n',
    )
    daemon = DaemonProcess(quickstart.write(), quickstart.http_port, tmp_path / "daemon.log")
    await daemon.start()
    # The CLI's own environment: none of the variables it falls back on, unless a test sets them.
    monkeypatch.delenv("CLI_TEST_ADMIN_TOKEN")
    for name in ("MEDIATOR_TOKEN", "MEDIATOR_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield Keyed(quickstart, daemon, admin_key, plain_key)
    finally:
        assert await daemon.stop(signal.SIGTERM) == 0, daemon.logs()


def no_secret(text: str, keyed: Keyed) -> None:
    for secret in (ADMIN_TOKEN, keyed.admin_key, keyed.plain_key):
        assert secret not in text, "a credential was printed"


async def test_status_and_dead_letters_without_a_credential_are_refused_with_a_hint(keyed: Keyed) -> None:
    for args in (("status", "--json"), ("dead-letters", "list", "--json"), ("dead-letters", "replay")):
        code, out, err = await cli(*args, "--config", keyed.config)
        assert code == 1, (args, out, err)
        assert "the daemon asks for a credential (401" in err, err
        assert "--token-env NAME" in err, err
        assert "--api-key-env NAME" in err, err
        assert "Traceback" not in err
        assert out == ""


async def test_status_with_the_admin_token_by_variable(keyed: Keyed) -> None:
    env = {"OPS_TOKEN": ADMIN_TOKEN}
    code, out, err = await cli("status", "--config", keyed.config, "--json", "--token-env", "OPS_TOKEN", env=env)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ready"] is True
    assert {lst["name"] for lst in doc["listeners"]} >= {"http", "grpc"}
    no_secret(out + err, keyed)


async def test_status_and_dead_letters_with_an_admin_api_key_by_variable(keyed: Keyed) -> None:
    env = {"OPS_KEY": keyed.admin_key}
    code, out, err = await cli("status", "--config", keyed.config, "--json", "--api-key-env", "OPS_KEY", env=env)
    assert code == 0, err
    assert json.loads(out)["ready"] is True
    code, out, err = await cli(
        "dead-letters", "list", "--config", keyed.config, "--json", "--api-key-env", "OPS_KEY", env=env
    )
    assert code == 0, err
    assert json.loads(out) == {"dead_letters": []}
    code, out, err = await cli("dead-letters", "replay", "--config", keyed.config, "--api-key-env", "OPS_KEY", env=env)
    assert code == 0, err
    assert json.loads(out) == {"replayed": 0}
    # An API key also goes as a bearer token (the api_key authenticator's bearer = true).
    code, out, err = await cli("status", "--config", keyed.config, "--json", "--token-env", "OPS_KEY", env=env)
    assert code == 0, err
    no_secret(out + err, keyed)


async def test_the_default_variables_and_the_admin_token_env(keyed: Keyed) -> None:
    code, out, err = await cli("status", "--config", keyed.config, "--json", env={"MEDIATOR_API_KEY": keyed.admin_key})
    assert code == 0, err
    assert json.loads(out)["ready"] is True
    # The variable the listener's admin_token_env names, when the CLI's environment has it (as before).
    code, out, err = await cli("status", "--config", keyed.config, "--json", env={"CLI_TEST_ADMIN_TOKEN": ADMIN_TOKEN})
    assert code == 0, err
    assert json.loads(out)["ready"] is True


async def test_a_key_without_the_admin_role_is_refused_naming_where_it_came_from(keyed: Keyed) -> None:
    env = {"BILLING_KEY": keyed.plain_key}
    code, out, err = await cli("status", "--config", keyed.config, "--api-key-env", "BILLING_KEY", env=env)
    assert code == 1
    refused = (
        "the daemon refused the credential from --api-key-env BILLING_KEY (403 admin needs one of the roles admin)"
    )
    assert refused in err, err
    no_secret(out + err, keyed)
    code, out, err = await cli("status", "--config", keyed.config, "--token", "wrong-token")
    assert code == 1
    assert "the daemon refused the credential from --token (401" in err, err
    assert "wrong-token" not in err


async def test_credential_mistakes_are_one_line(keyed: Keyed) -> None:
    code, _, err = await cli("status", "--config", keyed.config, "--token-env", "CLI_TEST_UNSET_VARIABLE")
    assert code == 1
    assert err.strip() == (
        "mediator: --token-env CLI_TEST_UNSET_VARIABLE: the variable CLI_TEST_UNSET_VARIABLE is not set (or empty)"
    )
    env = {"A": keyed.admin_key, "B": ADMIN_TOKEN}
    code, _, err = await cli("status", "--config", keyed.config, "--api-key-env", "A", "--token-env", "B", env=env)
    assert code == 1
    assert "--token-env B and --api-key-env A both give a credential" in err, err
    no_secret(err, keyed)


async def test_publish_over_grpc_with_an_api_key_by_variable(keyed: Keyed) -> None:
    publish = ("publish", "--config", keyed.config, "--type", "com.example.order.created", "--id", "cli-key-1", "{}")
    code, _, err = await cli(*publish)
    assert code == 1
    assert "the daemon asks for a credential (UNAUTHENTICATED" in err, err
    code, out, err = await cli(*publish, "--api-key-env", "BILLING_KEY", env={"BILLING_KEY": keyed.plain_key})
    assert code == 0, err
    assert json.loads(out) == {"id": "cli-key-1", "duplicate": False}
    no_secret(out + err, keyed)


async def test_help_names_the_credential_options_and_prefers_variables() -> None:
    for command in (("status",), ("dead-letters",), ("publish",), ("tail",)):
        code, out, _ = await cli(*command, "--help", env={"COLUMNS": "200"})
        assert code == 0
        for flag in ("--token-env NAME", "--api-key-env NAME", "--token TOKEN", "--api-key API_KEY"):
            assert flag in out, (command, out)
        assert "shows in `ps`" in out, out
