"""Enrichment: fields added to an event from a lookup before the commit, so every destination sees them.

One ``[[enrich]]`` table is one ``Enrich`` stage: events that match (``types``, ``inbounds``) get a key
rendered from a template over the event (``customer:{data.customerId}``, see ``keys.py``), the key is
looked up in a Redis hash (``HGETALL``) or with an HTTP GET (a JSON object answered 200; 404 or 410 is a
miss), and the fields found are merged into the JSON data (``into = "data.customer"``) or set as extension
attributes (``into = "attributes"``).

Lookups go through a bounded in-process cache (hits and misses alike for ``ttl_s``), one request per key
in flight at a time (concurrent events with the same key share it), and one connection pool per
enricher, closed on stop or when a reload replaces the enricher. Every lookup is bounded by
``timeout_s``. A failed lookup (timeout, connection refused, a 5xx, an answer that is not a JSON
object) follows ``on_error``: ``skip`` (the event goes on unenriched), ``retry`` (``NotReady``: HTTP 503
and gRPC UNAVAILABLE so the sender retries, a broker inbound withholds its ack so the broker redelivers)
or ``dead_letter`` (the event is stored as a dead letter with the reason, the sender acknowledged). A
miss is not an error and follows ``on_miss``: ``skip`` or ``dead_letter``; a key the event cannot fill
(``{data.customerId}`` on data without it) is a miss too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import orjson
import redis.asyncio as aioredis
import structlog
from pydantic import Field, field_validator, model_validator
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mediator.core.content import NOT_JSON, InvalidJson, parse_json
from mediator.core.envelope import REQUIRED, Envelope, valid_attribute_name
from mediator.core.errors import ConfigError, NotReady, RejectCode, Rejected
from mediator.core.ingress import AUTH_ATTRIBUTES, Batch
from mediator.core.patterns import TemplateError, any_of, compile_glob
from mediator.core.seams import ConfigModel
from mediator.stages.config import named_problems
from mediator.stages.keys import KeyTemplate

log = structlog.get_logger(__name__)

MAX_ANSWER_BYTES = 1 << 20
"""An HTTP lookup's answer larger than this is a failed lookup (a CRM record is a few KiB)."""
_PROTECTED = frozenset({*REQUIRED, *AUTH_ATTRIBUTES, "datacontenttype", "dataschema", "time", "subject"})


class EnrichConfig(ConfigModel):
    """One ``[[enrich]]`` table."""

    name: str = Field(min_length=1)
    types: list[str] = Field(default_factory=list, description="event types (globs); empty: every type")
    inbounds: list[str] = Field(default_factory=list, description="inbound names; empty: every inbound")
    kind: Literal["redis", "http"]
    url: str | None = Field(default=None, description="redis://host:port/db, or an http(s) URL with {key}")
    url_env: str | None = Field(default=None, description="environment variable holding the URL (with secrets)")
    bearer_env: str | None = Field(default=None, description="http: variable holding a bearer token")
    key: str = Field(description="template of the lookup key, e.g. 'customer:{data.customerId}'")
    into: str = Field(default="data", description="'data', 'data.<field>...' or 'attributes'")
    attribute_prefix: str = Field(default="", description="into = 'attributes': prefix of each attribute name")
    ttl_s: float = Field(default=60.0, ge=0, description="how long a hit or a miss is cached (0: no cache)")
    cache_size: int = Field(default=10_000, ge=1, description="keys cached at most (least recently used go)")
    timeout_s: float = Field(default=1.0, gt=0, le=60)
    max_connections: int = Field(default=16, ge=1, le=1024)
    on_error: Literal["skip", "retry", "dead_letter"] = "retry"
    on_miss: Literal["skip", "dead_letter"] = "skip"

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        KeyTemplate.compile(value)
        return value

    @field_validator("into")
    @classmethod
    def _into(cls, value: str) -> str:
        if value in ("data", "attributes"):
            return value
        segs = value.split(".")
        if segs[0] != "data" or not all(segs[1:]):
            raise ValueError("into must be 'data', 'data.<field>[.<field>...]' or 'attributes'")
        return value

    @field_validator("attribute_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not valid_attribute_name(value):
            raise ValueError("attribute_prefix: lower-case letters and digits only")
        return value

    @model_validator(mode="after")
    def _source(self) -> EnrichConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        if self.url is not None:
            problem = url_problem(self.kind, self.url, inline=True)
            if problem:
                raise ValueError(problem)
        if self.bearer_env is not None and self.kind != "http":
            raise ValueError("bearer_env is for kind = 'http'")
        return self


def url_problem(kind: str, url: str, *, inline: bool) -> str | None:
    parts = urlsplit(url)
    if kind == "redis":
        if parts.scheme not in ("redis", "rediss", "unix"):
            return f"url {url!r}: a Redis URL is redis://, rediss:// or unix://"
    else:
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return f"url {url!r}: an HTTP lookup URL is http:// or https://"
        if "{key}" not in url:
            return f"url {url!r}: put {{key}} where the lookup key goes"
    if inline and parts.password:
        return "url: a password is a secret; put the whole URL in an environment variable named by url_env"
    return None


def problems(configs: list[EnrichConfig], inbound_names: set[str]) -> list[str]:
    return named_problems("enrich", configs, inbound_names)


class LookupFailed(Exception):
    """The lookup did not answer usably; ``str()`` says why (never a secret)."""


class Lookup(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None:
        """The fields under ``key``, None when there is none; raises ``LookupFailed``."""
        ...

    async def close(self) -> None: ...


class RedisLookup:
    """``HGETALL key`` (an empty hash is a miss) over a pool of at most ``max_connections``."""

    def __init__(self, url: str, timeout_s: float, max_connections: int) -> None:
        # Connections wait for a free slot (bounded by the lookup's timeout) instead of failing with
        # "too many connections"; no retries inside redis-py: the policy (on_error) decides.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = aioredis.Redis(connection_pool=self._pool)

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            value: dict[str, str] = await self._client.hgetall(key)  # type: ignore[assignment]
        except (aioredis.RedisError, OSError) as exc:
            raise LookupFailed(f"redis: {type(exc).__name__}: {exc}") from None
        return value or None

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()


class HttpLookup:
    """GET the URL with the key in it: 200 with a JSON object is a hit, 404 and 410 are misses."""

    def __init__(self, url: str, timeout_s: float, max_connections: int, bearer: str | None) -> None:
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = max_connections
        self._headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {bearer}"} if bearer else {})
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the loop, at the first lookup
            connector = aiohttp.TCPConnector(limit=self._limit)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, headers=self._headers)
        return self._session

    async def get(self, key: str) -> dict[str, Any] | None:
        url = self._url.replace("{key}", quote(key, safe=""))
        try:
            async with self._client().get(url, allow_redirects=False) as resp:
                if resp.status in (404, 410):
                    return None
                if resp.status != 200:
                    raise LookupFailed(f"http: status {resp.status}")
                body = await resp.content.read(MAX_ANSWER_BYTES + 1)
        except TimeoutError:  # aiohttp's own total timeout (the same as the stage's)
            raise LookupFailed(f"no answer within {self._timeout.total} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise LookupFailed(f"http: {type(exc).__name__}: {exc}") from None
        if len(body) > MAX_ANSWER_BYTES:
            raise LookupFailed(f"http: answer over {MAX_ANSWER_BYTES} bytes")
        try:
            value = parse_json(body)
        except InvalidJson as exc:
            raise LookupFailed(f"http: {exc}") from None
        if not isinstance(value, dict):
            raise LookupFailed("http: the answer is not a JSON object")
        return value

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


_Result = dict[str, Any] | None | LookupFailed


class _Cache:
    """Least recently used, bounded, each entry for ``ttl_s``; misses are cached too (a burst of events
    for an unknown customer costs one lookup)."""

    __slots__ = ("_entries", "_size", "_ttl")

    def __init__(self, ttl_s: float, size: int) -> None:
        self._ttl = ttl_s
        self._size = size
        self._entries: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[bool, dict[str, Any] | None]:
        hit = self._entries.get(key)
        if hit is None:
            return False, None
        if hit[0] < now:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, hit[1]

    def put(self, key: str, value: dict[str, Any] | None, now: float) -> None:
        if self._ttl <= 0:
            return
        self._entries[key] = (now + self._ttl, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Enrich:
    """The stage of one ``[[enrich]]`` table (see the module docstring)."""

    def __init__(self, cfg: EnrichConfig, lookup: Lookup) -> None:
        self.name = f"enrich:{cfg.name}"
        self.cfg = cfg
        self._lookup = lookup
        self._key = KeyTemplate.compile(cfg.key)
        self._types = [compile_glob(t) for t in cfg.types]
        self._inbounds = frozenset(cfg.inbounds)
        self._into = tuple(cfg.into.split(".")[1:]) if cfg.into.startswith("data") else None
        self._cache = _Cache(cfg.ttl_s, cfg.cache_size)
        self._flights: dict[str, asyncio.Future[_Result]] = {}
        self._last_warning = 0.0
        self._suppressed = 0

    def _matches(self, env: Envelope, inbound: str) -> bool:
        if self._inbounds and inbound not in self._inbounds:
            return False
        return not self._types or any_of(self._types, env.type)

    async def run(self, batch: Batch) -> None:
        inbound = batch.origin.inbound
        todo: list[tuple[int, str | None]] = []  # (index in batch.events, key or None: unrenderable)
        for i, env in enumerate(batch.events):
            if not self._matches(env, env.provenance.inbound or inbound):
                continue
            data = batch.data.get(env) if self._key.uses_data or self._into is not None else NOT_JSON
            if self._into is not None and not isinstance(data, dict):
                raise Rejected(
                    RejectCode.INVALID, f"{self.name}: the event's data must be a JSON object", rule=self.cfg.name
                )
            try:
                todo.append((i, self._key.render(env, data)))
            except TemplateError:
                todo.append((i, None))
        if not todo:
            return
        results = await self._resolve({k for _, k in todo if k is not None})
        drop: dict[int, str] = {}
        for i, key in todo:
            env = batch.events[i]
            value = results.get(key) if key is not None else None
            if isinstance(value, LookupFailed):
                if self.cfg.on_error == "retry":
                    raise NotReady(f"{self.name}: lookup failed: {value}", retry_after_s=1.0)
                self._warn(env, key, str(value))
                if self.cfg.on_error == "dead_letter":
                    drop[i] = f"{self.name}: lookup of {key!r} failed: {value}"
            elif value is None:
                log.debug("enrich.missed", enricher=self.cfg.name, event_id=env.id, key=key)
                if self.cfg.on_miss == "dead_letter":
                    drop[i] = f"{self.name}: no entry for {key!r}" if key else f"{self.name}: no key for this event"
            else:
                self._apply(batch, env, value)
        if drop:
            take_out(batch, drop)

    async def _resolve(self, keys: set[str]) -> dict[str, _Result]:
        now = time.monotonic()
        out: dict[str, _Result] = {}
        waits: list[tuple[str, asyncio.Future[_Result]]] = []
        for key in keys:
            cached, value = self._cache.get(key, now)
            if cached:
                out[key] = value
                continue
            flight = self._flights.get(key)
            if flight is None:
                flight = asyncio.ensure_future(self._fetch(key))
                self._flights[key] = flight
                flight.add_done_callback(lambda _f, k=key: self._flights.pop(k, None))  # type: ignore[misc]
            waits.append((key, flight))
        if waits:
            # shield: one caller leaving (its request cancelled) does not cancel the lookup others share.
            done = await asyncio.gather(*(asyncio.shield(f) for _, f in waits))
            out.update(zip((k for k, _ in waits), done, strict=True))
        return out

    async def _fetch(self, key: str) -> _Result:
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                value = await self._lookup.get(key)
        except TimeoutError:
            return LookupFailed(f"no answer within {self.cfg.timeout_s} s")
        except LookupFailed as exc:
            return exc
        self._cache.put(key, value, time.monotonic())
        return value

    def _apply(self, batch: Batch, env: Envelope, value: dict[str, Any]) -> None:
        if self._into is None:
            prefix = self.cfg.attribute_prefix
            for field, item in value.items():
                name = prefix + str(field).lower()
                if not valid_attribute_name(name) or name in _PROTECTED:
                    continue  # not an attribute name (CloudEvents: a-z0-9), or one the gateway owns
                env.attributes[name].ce_string = item if isinstance(item, str) else orjson.dumps(item).decode()
            return
        data = batch.data.get(env)
        assert isinstance(data, dict)
        target: dict[str, Any] = data
        for seg in self._into:
            inner = target.get(seg)
            if not isinstance(inner, dict):
                inner = target[seg] = {}
            target = inner
        target.update(value)
        encoded = orjson.dumps(data)
        if env.WhichOneof("data") == "text_data":
            env.text_data = encoded.decode()
        else:
            env.binary_data = encoded
        batch.data.forget(env)

    def _warn(self, env: Envelope, key: str | None, reason: str) -> None:
        # One line a second per enricher: an outage cannot flood the log.
        now = time.monotonic()
        if now - self._last_warning < 1.0:
            self._suppressed += 1
            return
        log.warning(
            "enrich.failed",
            enricher=self.cfg.name,
            event_id=env.id,
            key=key,
            reason=reason,
            policy=self.cfg.on_error,
            suppressed=self._suppressed or None,
        )
        self._last_warning, self._suppressed = now, 0

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.cancel()
        await self._lookup.close()


def take_out(batch: Batch, reasons: dict[int, str]) -> None:
    """Move the events at these indexes into the batch's dead letters (principals kept aligned)."""
    aligned = len(batch.principals) == len(batch.events)
    batch.dead_letters.extend((batch.events[i], reason) for i, reason in reasons.items())
    batch.events = [e for i, e in enumerate(batch.events) if i not in reasons]
    if aligned:
        batch.principals = [p for i, p in enumerate(batch.principals) if i not in reasons]


def build(configs: list[EnrichConfig], environ: Callable[[str], str | None] = os.environ.get) -> list[Enrich]:
    """One stage per table; raises ``ConfigError("environment", ...)`` for a variable that is not set."""
    missing: list[str] = []
    stages: list[Enrich] = []
    for i, cfg in enumerate(configs):
        url = cfg.url
        if cfg.url_env is not None:
            url = environ(cfg.url_env)
            if not url:
                missing.append(f"enrich[{i}].url_env: environment variable {cfg.url_env} is not set")
                continue
            problem = url_problem(cfg.kind, url, inline=False)
            if problem:
                missing.append(f"enrich[{i}].url_env: {problem.replace(url, '<' + cfg.url_env + '>')}")
                continue
        bearer = environ(cfg.bearer_env) if cfg.bearer_env is not None else None
        if cfg.bearer_env is not None and not bearer:
            missing.append(f"enrich[{i}].bearer_env: environment variable {cfg.bearer_env} is not set")
            continue
        assert url is not None
        lookup: Lookup = (
            RedisLookup(url, cfg.timeout_s, cfg.max_connections)
            if cfg.kind == "redis"
            else HttpLookup(url, cfg.timeout_s, cfg.max_connections, bearer)
        )
        stages.append(Enrich(cfg, lookup))
    if missing:
        raise ConfigError("environment", missing)
    return stages
