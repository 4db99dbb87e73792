"""A JSON Web Key Set that the daemon fetches itself, on the event loop, without blocking it.

PyJWKClient fetches with urllib (blocking) and again on every unknown ``kid``; this does neither:

- one fetch at a time: callers arriving while a fetch runs wait for that one;
- the set is kept ``ttl_s``; a stale set is served while a fetch in the background replaces it;
- an unknown ``kid`` triggers a fetch at most once per ``cooldown_s`` (a flood of made-up kids costs one);
- a failed fetch keeps the last good set (logged), and is not tried again before ``cooldown_s``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from jwt import PyJWK
from jwt.exceptions import PyJWKError

log = structlog.get_logger(__name__)

MAX_JWKS_BYTES = 1 << 20

Fetch = Callable[[], Awaitable[bytes]]


def parse_jwks(body: bytes, source: str) -> dict[str, list[PyJWK]]:
    """Usable signing keys by ``kid`` ("" for keys without one); unusable keys are skipped and logged."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set (no 'keys' list)")
    keys: dict[str, list[PyJWK]] = {}
    for raw in data["keys"]:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(raw)
        except PyJWKError as exc:
            log.warning("jwks.key_skipped", source=source, kid=str(raw.get("kid", "")), reason=str(exc))
            continue
        keys.setdefault(str(raw.get("kid", "")), []).append(key)
    return keys


class JwksCache:
    def __init__(self, source: str, fetch: Fetch, *, ttl_s: float, cooldown_s: float) -> None:
        self.source = source
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._cooldown_s = cooldown_s
        self._keys: dict[str, list[PyJWK]] = {}
        self._fresh_until = 0.0  # monotonic
        self._next_kid_fetch = 0.0
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0  # attempts, for logs and tests
        self.generation = 0  # bumped whenever the set changes (cached verifications are dropped then)

    async def key(self, kid: str | None, alg: str) -> PyJWK | None:
        """The key to verify a token signed with ``alg`` under ``kid``; None when the set has none."""
        now = time.monotonic()
        if not self._keys:
            if now >= self._fresh_until:
                await self._refresh()
        elif now >= self._fresh_until and self._inflight is None:
            self._start_refresh()  # stale: serve what we have while a fetch replaces it
        found = self._find(kid, alg)
        if found is None and kid is not None and time.monotonic() >= self._next_kid_fetch:
            log.info("jwks.unknown_kid", source=self.source)
            await self._refresh()
            found = self._find(kid, alg)
        return found

    async def prefetch(self) -> None:
        await self._refresh()

    def _find(self, kid: str | None, alg: str) -> PyJWK | None:
        candidates = [k for ks in self._keys.values() for k in ks] if kid is None else self._keys.get(kid, [])
        usable = [k for k in candidates if _fits(k, alg)]
        # Without a kid, only an unambiguous key is used.
        return usable[0] if len(usable) == 1 or (kid is not None and usable) else None

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._inflight = asyncio.get_running_loop().create_task(self._do_fetch(), name=f"jwks:{self.source}")
        return self._inflight

    async def _refresh(self) -> None:
        # shield: a caller that is cancelled must not cancel the fetch other callers wait for.
        await asyncio.shield(self._start_refresh())

    async def _do_fetch(self) -> None:
        self.fetches += 1
        # Any fetch counts against the unknown-kid cooldown: a flood of made-up kids costs one per cooldown.
        self._next_kid_fetch = time.monotonic() + self._cooldown_s
        try:
            body = await self._fetch()
            keys = parse_jwks(body, self.source)
            if not keys:
                raise ValueError("no usable signing keys")
        except Exception as exc:
            # Keep the last good set; try again no sooner than the cooldown.
            self._fresh_until = time.monotonic() + self._cooldown_s
            log.warning(
                "jwks.fetch_failed",
                source=self.source,
                reason=str(exc) or type(exc).__name__,
                keys_kept=sum(map(len, self._keys.values())),
            )
        else:
            if _fingerprint(keys) != _fingerprint(self._keys):
                self.generation += 1
            self._keys = keys
            self._fresh_until = time.monotonic() + self._ttl_s
            log.info("jwks.fetched", source=self.source, keys=sum(map(len, keys.values())))
        finally:
            self._inflight = None

    async def close(self) -> None:
        task = self._inflight
        if task is not None:
            task.cancel()


def _fits(key: PyJWK, alg: str) -> bool:
    """Whether a JWK may verify ``alg``: its own ``alg`` (when it names one) must be that, and its type
    must be the algorithm's family (PyJWT would refuse the mismatch too; this picks the right key)."""
    named = key._jwk_data.get("alg")
    if named is not None and named != alg:
        return False
    family = {"R": "RSA", "P": "RSA", "E": "EC"}.get(alg[0], "OKP")
    return bool(key.key_type == family or (alg == "EdDSA" and key.key_type == "OKP"))


def _fingerprint(keys: dict[str, list[PyJWK]]) -> list[tuple[str, str]]:
    return sorted((kid, json.dumps(k._jwk_data, sort_keys=True)) for kid, ks in keys.items() for k in ks)


def file_fetch(path: str) -> Fetch:
    async def fetch() -> bytes:
        return await asyncio.to_thread(Path(path).read_bytes)

    return fetch


class HttpFetch:
    """GET the JWKS URL with aiohttp (a session made on first use, on the loop), bounded in time and size."""

    def __init__(self, url: str, timeout_s: float, ca_file: str | None) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._ca_file = ca_file
        self._session: Any = None

    async def __call__(self) -> bytes:
        import aiohttp

        if self._session is None:
            ssl_ctx: ssl.SSLContext | bool = True
            if self._ca_file is not None:
                ssl_ctx = await asyncio.to_thread(ssl.create_default_context, cafile=self._ca_file)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=1),
            )
        async with self._session.get(self.url, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body: bytes = await resp.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWKS larger than 1 MiB")
            return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
