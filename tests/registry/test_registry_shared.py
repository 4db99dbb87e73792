"""Two daemons on one PostgreSQL registry (ids and versions consistent under concurrent registrations,
either answers for the other), and a registry listener with authenticators: readers read, admins write."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import unique
from tests.support.postgres import fresh_database

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

SR_JSON = "application/vnd.schemaregistry.v1+json"
DSN_ENV = "MEDIATOR_TEST_REGISTRY_DSN"
KEYS = {
    "reader-key-0123456789": ("reader", "publisher"),
    "admin-key-0123456789": ("root", "admin"),
    "dash-key-0123456789": ("dash", "dashboard"),
}

AUTH_TOML = """
[auth.keys]
kind = "api_key"
keys_file = "api-keys.toml"
"""


@dataclass
class Pair:
    a: str  # registry base URLs: a's listener authenticates (API keys), b's does not
    b: str
    http: aiohttp.ClientSession

    async def call(
        self, url: str, method: str, path: str, body: object = None, key: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": SR_JSON, **({"X-API-Key": key} if key else {})}
        data = json.dumps(body) if body is not None else None
        async with self.http.request(method, url + path, data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int], postgres: str
) -> AsyncIterator[Pair]:
    async with fresh_database("mediator_registry") as dsn:
        before = os.environ.get(DSN_ENV)
        os.environ[DSN_ENV] = dsn  # the daemons read it when they start
        daemons: list[DaemonProcess] = []
        urls: list[str] = []
        try:
            for i, auth in enumerate((True, False)):
                tmp = tmp_path_factory.mktemp(f"shared{i}")
                overrides: dict[str, dict[str, object]] = {
                    "registry": {"backend": "postgresql", "dsn_env": DSN_ENV, "read_roles": ["publisher"]}
                }
                if auth:
                    overrides["listeners.registry"] = {"auth": ["keys"]}
                    (tmp / "api-keys.toml").write_text(
                        "\n".join(
                            f'[[keys]]\nprincipal = "{p}"\nsha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n'
                            f'roles = ["{r}"]\n'
                            for k, (p, r) in KEYS.items()
                        )
                    )
                qs = Quickstart(tmp, overrides=overrides, extra_toml=AUTH_TOML if auth else "")
                daemon = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
                daemons.append(daemon)
                urls.append(f"http://127.0.0.1:{qs.registry_port}")
            await asyncio.gather(*(d.start() for d in daemons))  # both create the tables at once
            async with aiohttp.ClientSession() as http:
                yield Pair(urls[0], urls[1], http)
        finally:
            for daemon in daemons:
                if daemon.proc is not None:
                    code = await daemon.stop(signal.SIGTERM)
                    assert code == 0, f"daemon exited with {code}:\n{daemon.logs()}"
            if before is None:
                os.environ.pop(DSN_ENV, None)
            else:
                os.environ[DSN_ENV] = before


READER, ADMIN, DASH = list(KEYS)


def _schema(n: int) -> dict[str, str]:
    return {"schema": json.dumps({"type": "record", "name": f"R{n}", "fields": [{"name": "a", "type": "int"}]})}


async def test_two_daemons_share_ids_and_versions(pair: Pair) -> None:
    subject = unique("shared")
    # the first registration creates the subject; NONE lets unrelated records follow each other
    assert (await pair.call(pair.b, "POST", f"/subjects/{subject}/versions", _schema(0)))[0] == 200
    assert (await pair.call(pair.b, "PUT", f"/config/{subject}", {"compatibility": "NONE"}))[0] == 200
    jobs = [
        pair.call(pair.a if n % 2 else pair.b, "POST", f"/subjects/{subject}/versions", _schema(n), ADMIN)
        for n in range(1, 21)
    ]
    answers = await asyncio.gather(*jobs)
    assert all(status == 200 for status, _ in answers), answers
    ids = [body["id"] for _, body in answers]
    assert len(set(ids)) == 20, ids
    for url, key in ((pair.a, READER), (pair.b, None)):
        status, versions = await pair.call(url, "GET", f"/subjects/{subject}/versions", key=key)
        assert (status, versions) == (200, list(range(1, 22)))
    # the same schema at once through both: one id, one version
    same = _schema(99)
    (s1, b1), (s2, b2) = await asyncio.gather(
        pair.call(pair.a, "POST", f"/subjects/{subject}/versions", same, ADMIN),
        pair.call(pair.b, "POST", f"/subjects/{subject}/versions", same),
    )
    assert s1 == s2 == 200
    assert b1 == b2
    status, latest = await pair.call(pair.a, "GET", f"/subjects/{subject}/versions/latest", key=READER)
    assert (status, latest["version"], latest["id"]) == (200, 22, b1["id"])
    status, by_id = await pair.call(pair.b, "GET", f"/schemas/ids/{ids[0]}")
    assert status == 200
    assert json.loads(by_id["schema"])["name"] == "R1"


async def test_the_listener_authenticators_guard_the_registry(pair: Pair) -> None:
    subject = unique("guarded")
    status, body = await pair.call(pair.a, "GET", "/subjects")
    assert (status, body["error_code"]) == (401, 40101)
    status, body = await pair.call(pair.a, "GET", "/subjects", key=DASH)
    assert (status, body["error_code"]) == (403, 40301)
    assert (await pair.call(pair.a, "GET", "/subjects", key=READER))[0] == 200
    status, body = await pair.call(pair.a, "POST", f"/subjects/{subject}/versions", _schema(1), READER)
    assert (status, body["error_code"]) == (403, 40301)
    assert (await pair.call(pair.a, "PUT", "/config", {"compatibility": "NONE"}, READER))[0] == 403
    assert (await pair.call(pair.a, "POST", f"/subjects/{subject}/versions", _schema(1), ADMIN))[0] == 200
    # a look-up and a compatibility test are reads
    assert (await pair.call(pair.a, "POST", f"/subjects/{subject}", _schema(1), READER))[0] == 200
    status, body = await pair.call(
        pair.a, "POST", f"/compatibility/subjects/{subject}/versions/latest", _schema(2), READER
    )
    assert (status, body) == (200, {"is_compatible": False})
