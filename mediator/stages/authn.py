"""Authentication: who sent each event, from what the inbound's protocol carried (``Origin``).

Per inbound, a ``Policy`` names its authenticators (``[auth.NAME]``) and whether anonymous callers pass.
A bearer token that looks like a JWT goes to the JWT authenticators (by issuer), any other bearer token and
the API key header to the API key ones; with no credential, a verified client certificate goes to the
mTLS ones. Two different credentials in one request are refused rather than one picked. Broker inbounds
carry a broker-vouched identity per message (``provenance``). The verified principal is written into the
CloudEvents authcontext extension (``authtype``, ``authid``, ``authclaims``); those names, and any the
config reserves, are first removed from what arrived, on every protocol.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import orjson
import structlog

from mediator.core.envelope import Envelope
from mediator.core.errors import ConfigError, RejectCode, Rejected
from mediator.core.ingress import ANONYMOUS, AUTH_ATTRIBUTES, Batch, Origin, PeerCertificate, Principal
from mediator.stages.config import (
    HMAC_ALGORITHMS,
    ApiKeyAuthConfig,
    BrokerAuthConfig,
    JwtAuthConfig,
    MtlsAuthConfig,
)
from mediator.stages.jwks import Fetch, HttpFetch, JwksCache, file_fetch
from mediator.stages.webhooks import WebhookAuthenticator

log = structlog.get_logger(__name__)

CHALLENGE = 'Bearer realm="mediator"'
INVALID_TOKEN = 'Bearer realm="mediator", error="invalid_token"'
ANONYMOUS_PRINCIPAL = Principal("", ANONYMOUS, "anonymous")


def _unauthenticated(reason: str, rule: str, *, token: bool = False) -> Rejected:
    return Rejected(RejectCode.UNAUTHENTICATED, reason, rule=rule, challenge=INVALID_TOKEN if token else CHALLENGE)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


# ---------------------------------------------------------------- API keys


@dataclass(frozen=True, slots=True)
class _Key:
    digest: bytes
    principal: Principal


def parse_key_file(text: str, where: str, name: str, authtype: str) -> dict[bytes, _Key]:
    """The ``[[keys]]`` of a key file by digest; raises ConfigError naming each bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, [f"TOML syntax error: {exc}"]) from exc
    problems: list[str] = []
    keys: dict[bytes, _Key] = {}
    extra = sorted(set(data) - {"keys"})
    if extra:
        problems.append(f"unknown key(s) {', '.join(extra)} (only [[keys]] tables)")
    entries = data.get("keys", [])
    if not isinstance(entries, list):  # `keys = 5`: a TypeError (a traceback at start or reload) before
        problems.append("keys: must be an array of tables ([[keys]])")
        entries = []
    for i, entry in enumerate(entries):
        at = f"keys[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{at}: must be a table")
            continue
        unknown = sorted(set(entry) - {"principal", "sha256", "roles", "expires"})
        if unknown:
            hint = " (the key itself never goes in the file: its sha256)" if {"key", "secret"} & set(unknown) else ""
            problems.append(f"{at}: unknown field(s) {', '.join(unknown)}{hint}")
        principal, digest_hex = entry.get("principal"), entry.get("sha256")
        roles, expires = entry.get("roles", []), entry.get("expires")
        if not isinstance(principal, str) or not principal:
            problems.append(f"{at}.principal: required, a non-empty string")
            continue
        try:
            digest = bytes.fromhex(digest_hex) if isinstance(digest_hex, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            problems.append(f"{at}.sha256: required, 64 hex digits (mediator hash-key makes one)")
            continue
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            problems.append(f"{at}.roles: a list of strings")
            continue
        expires_at: float | None = None
        if expires is not None:
            if not isinstance(expires, datetime) or expires.tzinfo is None:
                problems.append(f"{at}.expires: an RFC 3339 date-time with an offset, e.g. 2027-01-01T00:00:00Z")
                continue
            expires_at = expires.timestamp()
        if digest in keys:
            problems.append(f"{at}.sha256: the same key is listed twice")
            continue
        keys[digest] = _Key(digest, Principal(principal, authtype, name, frozenset(roles), expires_at=expires_at))
    if problems:
        raise ConfigError(where, problems)
    return keys


class ApiKeyAuthenticator:
    def __init__(self, name: str, cfg: ApiKeyAuthConfig, base_dir: Path) -> None:
        self.name = name
        self.cfg = cfg
        self.header = cfg.header
        self._path = (base_dir / cfg.keys_file) if cfg.keys_file else None
        self._keys: dict[bytes, _Key] = {}

    def _where(self) -> str:
        return str(self._path) if self._path is not None else f"environment variable {self.cfg.keys_env}"

    def load_sync(self) -> None:
        """Read the keys (at start-up, before the loop serves, and in a thread on SIGHUP)."""
        if self._path is not None:
            try:
                text = self._path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(self._where(), [f"auth.{self.name}.keys_file: cannot read: {exc.strerror}"]) from exc
            except UnicodeDecodeError as exc:
                raise ConfigError(self._where(), [f"auth.{self.name}.keys_file: not UTF-8: {exc}"]) from exc
        else:
            assert self.cfg.keys_env is not None
            value = os.environ.get(self.cfg.keys_env)
            if value is None:
                raise ConfigError(
                    "environment", [f"auth.{self.name}.keys_env: variable {self.cfg.keys_env} is not set"]
                )
            text = value
        self._keys = parse_key_file(text, self._where(), self.name, self.cfg.authtype)

    def verify(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        # The lookup is on the key's SHA-256, which tells an attacker timing nothing about any stored key;
        # the comparison of the digests themselves is constant-time.
        entry = self._keys.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise _unauthenticated("invalid API key", self.name)
        expires_at = entry.principal.expires_at
        if expires_at is not None and time.time() >= expires_at:
            raise _unauthenticated("API key expired", self.name)
        return entry.principal


def new_api_key() -> tuple[str, str]:
    """A fresh random key (256 bits, URL-safe) and its SHA-256 hex digest."""
    key = "mk_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")
    return key, hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------- JWT


class _LruPrincipals:
    """Tokens already verified, kept until they expire (dict order = insertion order: oldest first)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: dict[str, tuple[Principal, float, int]] = {}

    def get(self, token: str, now: float, generation: int) -> Principal | None:
        hit = self._items.get(token)
        if hit is None:
            return None
        principal, valid_until, gen = hit
        if now >= valid_until or gen != generation:
            del self._items[token]
            return None
        return principal

    def put(self, token: str, principal: Principal, valid_until: float, generation: int) -> None:
        if self._size <= 0:
            return
        if len(self._items) >= self._size:
            for old in list(self._items)[: max(1, self._size // 8)]:
                del self._items[old]
        self._items[token] = (principal, valid_until, generation)


class JwtAuthenticator:
    """One issuer's tokens. A verified token is kept (``cache_size``) until its ``exp`` or until the key set
    changes, so a client that sends the same token on every request pays the signature check once (RS256
    verify is ~56 us against ~300 us of daemon CPU per event)."""

    def __init__(self, name: str, cfg: JwtAuthConfig, base_dir: Path) -> None:
        self.name = name
        self.cfg = cfg
        self.issuer = cfg.issuer
        self._algorithms = frozenset(cfg.algorithms)
        self._secret: bytes | None = None
        self._jwks: JwksCache | None = None
        self._http: HttpFetch | None = None
        self._cache = _LruPrincipals(cfg.cache_size)
        self._options: dict[str, Any] = {
            "require": list(cfg.require),
            "verify_aud": bool(cfg.audience),
            "verify_iss": cfg.issuer is not None,
        }
        if cfg.secret_env is None:
            fetch: Fetch
            if cfg.jwks_url is not None:
                self._http = HttpFetch(cfg.jwks_url, cfg.jwks_timeout_s, cfg.jwks_ca_file)
                fetch, source = self._http, cfg.jwks_url
            else:
                assert cfg.jwks_file is not None
                path = str(base_dir / cfg.jwks_file)
                fetch, source = file_fetch(path), path
            self._jwks = JwksCache(source, fetch, ttl_s=cfg.jwks_ttl_s, cooldown_s=cfg.jwks_cooldown_s)

    @property
    def jwks(self) -> JwksCache | None:
        return self._jwks

    def load_sync(self) -> None:
        if self.cfg.secret_env is not None:
            value = os.environ.get(self.cfg.secret_env)
            if not value:
                raise ConfigError(
                    "environment", [f"auth.{self.name}.secret_env: variable {self.cfg.secret_env} is not set"]
                )
            if len(value.encode()) < 32:
                raise ConfigError("environment", [f"auth.{self.name}.secret_env: an HS secret needs at least 32 bytes"])
            self._secret = value.encode()

    async def verify(self, token: str) -> Principal:
        cfg = self.cfg
        if len(token) > cfg.max_token_bytes:
            raise _unauthenticated(f"token larger than {cfg.max_token_bytes} bytes", self.name, token=True)
        if not token.isascii():
            # A compact JWS is base64url and dots. Header bytes that are not UTF-8 arrive surrogate-escaped,
            # and PyJWT's encode("utf-8") raised UnicodeEncodeError on them (a 500; found by atheris).
            raise _unauthenticated("malformed token", self.name, token=True)
        now = time.time()
        generation = self._jwks.generation if self._jwks is not None else 0
        cached = self._cache.get(token, now, generation)
        if cached is not None:
            return cached
        header = _peek_header(token)
        if header is None:
            raise _unauthenticated("malformed token", self.name, token=True)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _unauthenticated("token algorithm not allowed", self.name, token=True)
        if "crit" in header or header.get("b64") is False:
            # RFC 7515 4.1.11: a critical extension the recipient does not understand must be refused.
            raise _unauthenticated("unsupported critical header", self.name, token=True)
        problem = _numeric_date_problem(token)
        if problem is not None:
            raise _unauthenticated(problem, self.name, token=True)
        key: Any
        if alg in HMAC_ALGORITHMS:
            key = self._secret
        else:
            assert self._jwks is not None
            kid = header.get("kid")
            jwk = await self._jwks.key(kid if isinstance(kid, str) else None, alg)
            if jwk is None:
                raise _unauthenticated("unknown signing key", self.name, token=True)
            key = jwk.key
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience or None,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("token expired", self.name, token=True) from None
        except jwt.ImmatureSignatureError:
            raise _unauthenticated("token not yet valid", self.name, token=True) from None
        except jwt.InvalidAudienceError:
            raise _unauthenticated("token audience not accepted", self.name, token=True) from None
        except jwt.InvalidIssuerError:
            raise _unauthenticated("token issuer not accepted", self.name, token=True) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthenticated(f"token lacks the {exc.claim!r} claim", self.name, token=True) from None
        except jwt.InvalidSignatureError:
            raise _unauthenticated("token signature invalid", self.name, token=True) from None
        except jwt.PyJWTError as exc:
            raise _unauthenticated(f"invalid token: {type(exc).__name__}", self.name, token=True) from None
        principal = self._principal(claims)
        exp = _seconds(claims.get("exp"))
        valid_until = min(exp + cfg.leeway_s if exp is not None else now + 300.0, now + 3600.0)
        self._cache.put(token, principal, valid_until, generation)
        return principal

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        cfg = self.cfg
        pid = claims.get(cfg.principal_claim)
        if not isinstance(pid, str) or not pid:
            raise _unauthenticated(f"token lacks a {cfg.principal_claim!r} string claim", self.name, token=True)
        roles: frozenset[str] = frozenset()
        if cfg.roles_claim is not None:
            raw = claims.get(cfg.roles_claim)
            if isinstance(raw, str):
                roles = frozenset(raw.split())
            elif isinstance(raw, list):
                roles = frozenset(r for r in raw if isinstance(r, str))
        copied = {
            name: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            for name in cfg.claims
            if (value := claims.get(name)) is not None
        }
        exp = _seconds(claims.get("exp"))
        return Principal(
            pid,
            cfg.authtype,
            self.name,
            roles,
            MappingProxyType(copied),
            expires_at=exp + cfg.leeway_s if exp is not None else None,
        )

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()
        if self._http is not None:
            await self._http.close()


def _seconds(value: object) -> float | None:
    """A NumericDate claim PyJWT accepted, as float seconds: an integer too large for a float (JSON has no
    bound: ``"exp": 1e400`` written out) is the far future, not an OverflowError (a 500; found by fuzzing)."""
    if not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _peek_header(token: str) -> dict[str, Any] | None:
    """The JOSE header of a compact JWS, unverified: only to pick the algorithm and key. Decodes the header
    segment alone; ``jwt.get_unverified_header`` decodes (and checks character by character, in Python)
    all three segments, which ``jwt.decode`` then does again: 139 -> ~100 us per uncached RS256 token."""
    segment = token.split(".", 1)[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return None
    return header if isinstance(header, dict) else None


NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
_JSON_KINDS = {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}


def _numeric_date_problem(token: str) -> str | None:
    """Why a time claim of the token is no NumericDate, or None. RFC 7519 2 and 4.1.4-4.1.6: a NumericDate
    is a JSON number; PyJWT reads them with ``int()``, which takes the string "9999999999" (a token that
    never expires) and ``true`` (a bool is an int in Python). Checked before the signature: a refusal
    needs no trust, and a payload that does not parse here is left to PyJWT's own refusal."""
    try:
        segment = token.split(".", 2)[1]
        payload = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    if not isinstance(payload, dict):
        return None
    for name in NUMERIC_DATE_CLAIMS:
        if name not in payload:
            continue
        value = payload[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
            return f"token claim {name!r} must be a NumericDate (a JSON number), not {kind}"
    return None


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` of a token, unverified: only to pick which issuer's authenticator verifies it."""
    try:
        segment = token.split(".", 2)[1]
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError, binascii.Error, RecursionError):  # nested past the json module's stack
        return None
    iss = payload.get("iss") if isinstance(payload, dict) else None
    return iss if isinstance(iss, str) else None


# ---------------------------------------------------------------- mTLS and broker-vouched identities


def _with_roles(
    pid: str, authtype: str, name: str, roles: Mapping[str, list[str]], default: Sequence[str]
) -> Principal:
    return Principal(pid, authtype, name, frozenset(roles.get(pid, default)))


class MtlsAuthenticator:
    def __init__(self, name: str, cfg: MtlsAuthConfig) -> None:
        self.name = name
        self.cfg = cfg

    def verify(self, cert: PeerCertificate) -> Principal:
        for source in self.cfg.principal_from:
            values: Sequence[str] = {
                "san_uri": cert.uris,
                "san_dns": cert.dns,
                "cn": (cert.common_name,) if cert.common_name else (),
            }[source]
            if values:
                return _with_roles(values[0], self.cfg.authtype, self.name, self.cfg.roles, self.cfg.default_roles)
        raise _unauthenticated("client certificate names no principal", self.name)


class BrokerAuthenticator:
    def __init__(self, name: str, cfg: BrokerAuthConfig) -> None:
        self.name = name
        self.cfg = cfg
        self._cache: dict[str, Principal] = {}

    def identity(self, env: Envelope) -> str:
        prov = env.provenance
        if self.cfg.source == "user_id":
            return prov.vouched_user
        assert self.cfg.segment is not None
        segments = prov.topic.split(prov.topic_separator or "/")
        return segments[self.cfg.segment] if self.cfg.segment < len(segments) else ""

    def verify(self, env: Envelope) -> Principal | None:
        pid = self.identity(env)
        if not pid or pid in ("+", "#", "*"):
            return None
        principal = self._cache.get(pid)
        if principal is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            principal = _with_roles(pid, self.cfg.authtype, self.name, self.cfg.roles, self.cfg.default_roles)
            self._cache[pid] = principal
        return principal


Authenticator = ApiKeyAuthenticator | JwtAuthenticator | MtlsAuthenticator | BrokerAuthenticator | WebhookAuthenticator


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True, slots=True)
class Policy:
    """What one inbound (or ``listener:NAME``, for admin endpoints) accepts."""

    authenticators: tuple[Authenticator, ...] = ()
    allow_anonymous: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.authenticators)

    @property
    def webhooks(self) -> tuple[WebhookAuthenticator, ...]:
        return tuple(a for a in self.authenticators if isinstance(a, WebhookAuthenticator))


OPEN = Policy()
AWAITING_BODY = Principal("", ANONYMOUS, "awaiting-body")
"""What ``authenticate`` answers before the body for a signed webhook whose headers passed: not a
verdict (never cached on the Origin); the stage verifies the signature once the body is there."""


def _bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Authenticate:
    """The first stage. Also answers ``Sink.authenticate`` for adapters that refuse before reading."""

    name = "authenticate"

    def __init__(self, policies: Mapping[str, Policy], reserved: Sequence[str] = ()) -> None:
        self._policies = dict(policies)
        self._reserved = tuple(dict.fromkeys((*AUTH_ATTRIBUTES, *reserved)))
        # Webhook signature headers are no bearer-style credential: set apart before counting those.
        self._signature_headers = frozenset(h for p in self._policies.values() for a in p.webhooks for h in a.headers)
        # Standard Webhooks authenticators by name: their verified webhook-id names the event (below).
        self._message_ids = {
            a.name: "webhook-id" for p in self._policies.values() for a in p.webhooks if a.scheme == "standard-webhooks"
        }

    def policy(self, inbound: str) -> Policy:
        return self._policies.get(inbound, OPEN)

    async def authenticate(self, origin: Origin) -> Principal:
        principal = origin.principal
        if principal is not None:
            if principal.expires_at is not None and time.time() >= principal.expires_at:
                origin.principal = None  # a long stream outlived its credential
                raise _unauthenticated("credential expired", principal.mechanism, token=True)
            return principal
        principal = await self._authenticate(origin, self.policy(origin.inbound))
        if principal is not AWAITING_BODY:
            origin.principal = principal
        return principal

    async def _authenticate(self, origin: Origin, policy: Policy) -> Principal:
        if not policy.enabled:
            return ANONYMOUS_PRINCIPAL
        offered: dict[str, str] = {}  # credential value -> header it came in
        signed: dict[str, str] = {}  # signature header -> value
        for header, value in origin.credentials:
            if header in self._signature_headers:
                if header in signed:
                    raise _unauthenticated(f"{header} sent more than once", "authorization")
                signed[header] = value
            elif header == "authorization":
                token = _bearer(value)
                if token is None:
                    raise _unauthenticated("unsupported Authorization scheme (Bearer only)", "authorization")
                offered.setdefault(token, header)
            elif value.strip():
                offered.setdefault(value.strip(), header)
        if len(offered) > 1:
            raise _unauthenticated("more than one credential in one request", "authorization")
        if signed and policy.webhooks:
            hooks = [a for a in policy.webhooks if a.offered(signed)]
            if hooks:
                if offered:
                    raise _unauthenticated("more than one credential in one request", "authorization")
                return self._verify_signed(hooks, signed, origin.body)
        if offered:
            ((credential, header),) = offered.items()
            return await self._verify_credential(credential, header, policy)
        if origin.certificate is not None:
            for auth in policy.authenticators:
                if isinstance(auth, MtlsAuthenticator):
                    return auth.verify(origin.certificate)
        if policy.allow_anonymous:
            return ANONYMOUS_PRINCIPAL
        raise _unauthenticated("credentials required", "authentication")

    @staticmethod
    def _verify_signed(hooks: list[WebhookAuthenticator], signed: Mapping[str, str], body: bytes | None) -> Principal:
        """Before the body: refuse what the headers alone show is wrong, else AWAITING_BODY. With it:
        the first authenticator whose secret signed it (several may share a scheme: two GitHub apps)."""
        last: Rejected | None = None
        for auth in hooks:
            try:
                if body is None:
                    auth.check_headers(signed)
                    return AWAITING_BODY
                return auth.verify(signed, body)
            except Rejected as exc:
                last = exc
        assert last is not None
        raise last

    async def _verify_credential(self, credential: str, header: str, policy: Policy) -> Principal:
        auths = policy.authenticators
        if header == "authorization":
            if looks_like_jwt(credential):
                jwts = [a for a in auths if isinstance(a, JwtAuthenticator)]
                if jwts:
                    if len(jwts) > 1:
                        iss = unverified_issuer(credential)
                        jwts = [a for a in jwts if a.issuer == iss] or jwts[:1]
                    return await jwts[0].verify(credential)
            keys = [a for a in auths if isinstance(a, ApiKeyAuthenticator) and a.cfg.bearer]
        else:
            keys = [a for a in auths if isinstance(a, ApiKeyAuthenticator) and a.header == header]
        if not keys:
            raise _unauthenticated("credential of a kind this endpoint does not accept", "authentication")
        last: Rejected | None = None
        for auth in keys:
            try:
                return auth.verify(credential)
            except Rejected as exc:
                last = exc
        assert last is not None
        raise last

    async def run(self, batch: Batch) -> None:
        origin = batch.origin
        events = batch.events
        policy = self.policy(origin.inbound)
        if origin.broker and policy.enabled:
            batch.principals = [self._vouched(env, policy) for env in events]
        else:
            principal = await self.authenticate(origin)
            if principal is AWAITING_BODY:  # an adapter that carries no body cannot have it verified
                raise _unauthenticated("a signed webhook needs the request body", "webhook")
            batch.principals = [principal] * len(events)
            if len(events) == 1 and events[0].provenance.id_minted and principal.mechanism in self._message_ids:
                self._adopt_message_id(events[0], origin, self._message_ids[principal.mechanism])
        reserved = self._reserved
        for env, principal in zip(events, batch.principals, strict=True):
            attrs = env.attributes
            for name in reserved:
                if name in attrs:
                    del attrs[name]
            if principal.id:
                attrs["authtype"].ce_string = principal.authtype
                attrs["authid"].ce_string = principal.id
                if principal.claims:
                    attrs["authclaims"].ce_string = json.dumps(dict(principal.claims), separators=(",", ":"))
                env.provenance.principal = principal.id
            elif policy.enabled:
                attrs["authtype"].ce_string = ANONYMOUS

    @staticmethod
    def _adopt_message_id(env: Envelope, origin: Origin, header: str) -> None:
        """A plain event (its id minted) takes the verified webhook-id as its id, as it would an
        Idempotency-Key: Standard Webhooks keeps the id across a sender's retries (each with a new
        timestamp, so no replay), and the outbox's dedup window then commits the message once."""
        msg_id = next((value.strip() for name, value in origin.credentials if name == header), "")
        if msg_id:
            env.id = msg_id
            env.provenance.id_minted = False

    def _vouched(self, env: Envelope, policy: Policy) -> Principal:
        for auth in policy.authenticators:
            if isinstance(auth, BrokerAuthenticator):
                principal = auth.verify(env)
                if principal is not None:
                    return principal
        if policy.allow_anonymous:
            return ANONYMOUS_PRINCIPAL
        raise _unauthenticated("the broker vouches for no publisher of this message", "broker")

    def authenticators(self) -> list[Authenticator]:
        seen: dict[int, Authenticator] = {}
        for policy in self._policies.values():
            for auth in policy.authenticators:
                seen[id(auth)] = auth
        return list(seen.values())

    def reload_keys(self) -> None:
        """Read the API key files again (SIGHUP; runs in a thread). A bad file keeps the old keys."""
        for auth in self.authenticators():
            if isinstance(auth, ApiKeyAuthenticator):
                try:
                    auth.load_sync()
                except ConfigError as exc:
                    log.error("auth.keys_reload_refused", authenticator=auth.name, problems=exc.problems)
                else:
                    log.info("auth.keys_reloaded", authenticator=auth.name)

    async def close(self) -> None:
        for auth in self.authenticators():
            if isinstance(auth, JwtAuthenticator):
                await auth.close()
