"""`mediator check` validates the security sections with key paths and refuses inline secrets; the
stages' own logic (GCRA, the JWKS cache) where a daemon would only blur what is measured."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mediator.core.errors import RejectCode, Rejected
from mediator.core.ingress import Batch, Origin, Principal
from mediator.stages.config import RateLimitConfig
from mediator.stages.jwks import JwksCache
from mediator.stages.ratelimit import Gcra, RateLimit, _client_key
from tests.support.jwtkit import SigningKey

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "config.toml").read_text()


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "mediator", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


CASES = {
    "inline-secret": (
        '[auth.k]\nkind = "api_key"\nkeys_file = "k.toml"\nkey = "hunter2"\n',
        ["auth.k", "inline secrets are refused (key)"],
    ),
    "inline-jwt-secret": (
        '[auth.j]\nkind = "jwt"\nalgorithms = ["HS256"]\nsecret = "x"\nissuer = "i"\naudience = ["a"]\n',
        ["auth.j", "inline secrets are refused (secret)"],
    ),
    "unknown-authenticator": ("", ["listeners.http.auth[0]: no authenticator [auth.nope]"]),
    "plain-http-jwks": (
        '[auth.j]\nkind = "jwt"\nissuer = "i"\naudience = ["a"]\njwks_url = "http://idp.example.com/jwks"\n',
        ["auth.j.jwks_url", "https://"],
    ),
    "mixed-algorithms": (
        '[auth.j]\nkind = "jwt"\nissuer = "i"\naudience = ["a"]\nalgorithms = ["RS256", "HS256"]\nsecret_env = "S"\n',
        ["do not mix HS and public-key algorithms"],
    ),
    "alg-none": (
        '[auth.j]\nkind = "jwt"\nissuer = "i"\naudience = ["a"]\nalgorithms = ["none"]\njwks_file = "j.json"\n',
        ["auth.j.algorithms", "'none' is not one of"],
    ),
    "broker-auth-on-http": ('[auth.b]\nkind = "broker"\nfrom = "user_id"\n', ["is for broker inbounds"]),
    "jwt-on-a-broker-inbound": (
        '[auth.j]\nkind = "jwt"\nissuer = "i"\naudience = ["a"]\njwks_file = "j.json"\n',
        ["inbound.devices.auth[0]", "use a kind = 'broker' authenticator"],
    ),
    "mtls-without-client-certs": ('[auth.m]\nkind = "mtls"\n', ["mtls needs tls.client_cert"]),
    "missing-key-file": ('[auth.k]\nkind = "api_key"\nkeys_file = "absent.toml"\n', ["cannot read"]),
    "rule-naming-missing-inbound": (
        '[[authorization]]\nname = "r"\ninbounds = ["nowhere"]\n',
        ["authorization[0].inbounds: no inbound named 'nowhere'"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_reports_security_problems_with_key_paths(tmp_path: Path, case: str) -> None:
    extra, expected = CASES[case]
    text = SHIPPED + "\n" + extra
    listener_auth = {
        "unknown-authenticator": ["nope"],
        "broker-auth-on-http": ["b"],
        "mtls-without-client-certs": ["m"],
        "missing-key-file": ["k"],
    }.get(case)
    if listener_auth is not None:
        text = text.replace("port = 8080 ", f"auth = {json.dumps(listener_auth)}\nport = 8080 ", 1)
    if case == "jwt-on-a-broker-inbound":
        text = text.replace('topics = ["devices/+/telemetry"]', 'topics = ["devices/+/telemetry"]\nauth = ["j"]', 1)
    result = check(tmp_path, text)
    assert result.returncode == 2, (result.stdout, result.stderr)
    for fragment in expected:
        assert fragment in result.stderr, result.stderr


def test_a_key_file_with_the_key_itself_is_refused(tmp_path: Path) -> None:
    (tmp_path / "k.toml").write_text('[[keys]]\nprincipal = "p"\nkey = "hunter2"\n')
    text = SHIPPED.replace("port = 8080 ", 'auth = ["k"]\nport = 8080 ', 1)
    result = check(tmp_path, text + '\n[auth.k]\nkind = "api_key"\nkeys_file = "k.toml"\n')
    assert result.returncode == 2, result.stderr
    assert "the key itself never goes in the file" in result.stderr


def test_hash_key_makes_an_entry_the_daemon_accepts(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "mediator", "hash-key", "--principal", "billing", "--role", "publisher"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert made.returncode == 0, made.stderr
    key, entry = made.stdout.split("\n", 1)
    assert key.startswith("mk_")
    assert key not in entry
    (tmp_path / "k.toml").write_text(entry)
    text = SHIPPED.replace("port = 8080 ", 'auth = ["k"]\nport = 8080 ', 1)
    result = check(tmp_path, text + '\n[auth.k]\nkind = "api_key"\nkeys_file = "k.toml"\n')
    assert result.returncode == 0, result.stderr


def test_gcra_lets_a_burst_through_then_the_rate() -> None:
    g = Gcra("l", rate=10.0, burst=5, max_keys=10)
    now = 100.0
    passed = 0
    for _ in range(20):
        tat, delay = g.check("k", 1, now)
        if delay == 0:
            g.commit("k", tat, now)
            passed += 1
    assert passed == 5
    assert g.state("k", now).remaining == 0
    later = now + 0.35  # 3.5 emission intervals: three more
    assert [g.check("k", 1, later)[1] == 0 for _ in range(1)] == [True]
    assert g.check("other", 5, now)[1] == 0, "another key has its own allowance"
    assert g.check("other", 6, now)[1] > 0


def test_gcra_forgets_idle_keys_when_full() -> None:
    g = Gcra("l", rate=1000.0, burst=1, max_keys=100)
    for i in range(1000):
        tat, _ = g.check(str(i), 1, float(i))
        g.commit(str(i), tat, float(i))
    assert len(g._tat) <= 100


def test_anonymous_callers_are_counted_per_address_and_ipv6_per_64() -> None:
    assert _client_key("10.0.0.1") == _client_key("ipv4:10.0.0.1:5555")
    assert _client_key("2001:db8::1") == _client_key("ipv6:%5B2001:db8::ffff%5D:443")
    assert _client_key("2001:db8::1") != _client_key("2001:db8:0:1::1")
    assert _client_key("::ffff:10.0.0.1") == _client_key("10.0.0.1")


async def test_rate_limit_refuses_listeners_and_waits_on_brokers() -> None:
    limit = RateLimit([RateLimitConfig(name="l", rate=20.0, burst=2)])
    alice = Principal("alice", "user", "jwt")
    origin = Origin("in", "http", peer="127.0.0.1")
    await limit.run(Batch(origin, [object(), object()], [alice, alice]))  # type: ignore[list-item]
    with pytest.raises(Rejected) as refused:
        await limit.run(Batch(origin, [object()], [alice]))  # type: ignore[list-item]
    assert refused.value.code is RejectCode.RATE_LIMITED
    assert refused.value.retry_after_s is not None
    assert 0 < refused.value.retry_after_s <= 0.05 + 1e-6
    with pytest.raises(Rejected) as batch:
        await limit.run(Batch(origin, [object()] * 3, [Principal("bob", "user", "jwt")] * 3))  # type: ignore[list-item]
    assert batch.value.code is RejectCode.TOO_LARGE, "a batch over the burst can never pass: not a 429"
    broker = Origin("in", "mqtt", broker=True)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await limit.run(Batch(broker, [object()] * 4, [alice] * 4))  # type: ignore[list-item]
    await limit.run(Batch(broker, [object()] * 2, [alice] * 2))  # type: ignore[list-item]
    assert loop.time() - start >= 0.15, "a broker batch over the limit must wait, not pass or raise"


async def test_jwks_single_flight_cooldown_and_last_good_set() -> None:
    key = SigningKey("k1")
    calls = 0
    fail = False
    gate = asyncio.Event()

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        if fail:
            raise OSError("connection refused")
        return json.dumps({"keys": [key.jwk()]}).encode()

    cache = JwksCache("test", fetch, ttl_s=0.2, cooldown_s=60.0)
    waiting = [asyncio.ensure_future(cache.key("k1", "RS256")) for _ in range(20)]
    await asyncio.sleep(0.01)
    gate.set()
    found = await asyncio.gather(*waiting)
    assert calls == 1, "twenty callers, one fetch"
    assert all(k is not None for k in found)
    assert await cache.key("unknown", "RS256") is None
    assert await cache.key("unknown-2", "RS256") is None
    assert calls == 1, "an unknown kid within the cooldown after a fetch does not fetch again"
    assert await cache.key("k1", "ES256") is None, "a key is only used for its own algorithm"
    fail = True
    await asyncio.sleep(0.25)  # stale: the next lookup serves the old set and refreshes behind it
    assert await cache.key("k1", "RS256") is not None
    await asyncio.sleep(0.05)
    assert calls == 2
    assert await cache.key("k1", "RS256") is not None, "a failed fetch keeps the last good set"
