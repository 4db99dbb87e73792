"""Signed webhooks as an authenticator (``[auth.NAME] kind = "webhook"``): the signature a sender computed
over the exact request body with a shared secret vouches for the configured principal.

The HTTP inbound only extracts: the signature headers (in ``Origin.credentials``, as every credential
header) and the raw body as received (``Origin.body``, once read). Verification runs twice at most: before
the body (``check_headers``: headers present and well formed, timestamp within the tolerance, so a stale or
unsigned request is refused without its body being buffered) and with it (``verify``). A message is
remembered only once it verified, so a forged one cannot fill the replay cache.
"""

from __future__ import annotations

import base64
import hmac
import os
import time
from collections.abc import Mapping

from mediator.core import signatures
from mediator.core.errors import ConfigError, NotReady, RejectCode, Rejected
from mediator.core.ingress import Principal
from mediator.stages.config import WebhookAuthConfig

MIN_RAW_SECRET_BYTES = 16  # github / hmac: a shorter secret falls to an offline guess from one signature
CHALLENGE = 'Signature realm="mediator"'  # RFC 9110 15.5.2: a 401 carries a challenge; no standard scheme fits


def _refused(reason: str, rule: str) -> Rejected:
    return Rejected(RejectCode.UNAUTHENTICATED, reason, rule=rule, challenge=CHALLENGE)


class _Seen:
    """Messages (id, timestamp) accepted within the tolerance, each until its timestamp leaves it.

    Bounded: at ``size`` unexpired entries a new message is answered 503 (the sender retries later)
    rather than an old entry forgotten, which would reopen a replay window for it. Insertion order is
    close to expiry order (timestamps are near now), so the expired ones are swept from the front."""

    def __init__(self, size: int, tolerance_s: float) -> None:
        self._size = size
        self._tolerance_s = tolerance_s
        self._items: dict[tuple[str, int], float] = {}

    def __contains__(self, key: tuple[str, int]) -> bool:
        expires = self._items.get(key)
        return expires is not None and expires > time.time()

    def add(self, key: tuple[str, int], rule: str) -> None:
        items = self._items
        if len(items) >= self._size:
            now = time.time()
            for old in [k for k, expires in items.items() if expires <= now]:
                del items[old]
            if len(items) >= self._size:
                raise NotReady(f"{rule}: replay cache full ({self._size} messages within the tolerance)", 5.0)
        items[key] = key[1] + self._tolerance_s

    def __len__(self) -> int:
        return len(self._items)


class WebhookAuthenticator:
    """One ``kind = "webhook"`` authenticator. ``load_sync`` reads the secrets (at start-up)."""

    def __init__(self, name: str, cfg: WebhookAuthConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.scheme = cfg.scheme
        self.headers = cfg.signature_headers()
        self.signature_header = cfg.signature_header()
        self._keys: tuple[bytes, ...] = ()
        self._seen = _Seen(cfg.replay_cache_size, cfg.tolerance_s)
        self._principal = Principal(cfg.principal, cfg.authtype, name, frozenset(cfg.roles))
        self._prefix = "sha256=" if cfg.scheme == "github" else cfg.prefix
        self._algorithm = "sha256" if cfg.scheme != "hmac" else cfg.algorithm

    def load_sync(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        keys: list[bytes] = []
        problems: list[str] = []
        for var in self.cfg.secrets_env:
            at = f"auth.{self.name}.secrets_env ({var})"
            value = env.get(var)
            if not value:
                problems.append(f"{at}: variable {var} is not set")
                continue
            if self.scheme == "standard-webhooks":
                try:
                    keys.append(signatures.decode_standard_secret(value))
                except ValueError as exc:
                    problems.append(f"{at}: {exc}")
            else:
                raw = value.encode("utf-8")
                if len(raw) < MIN_RAW_SECRET_BYTES:
                    problems.append(f"{at}: a secret of at least {MIN_RAW_SECRET_BYTES} bytes is required")
                else:
                    keys.append(raw)
        if problems:
            raise ConfigError("environment", problems)
        self._keys = tuple(keys)

    def offered(self, headers: Mapping[str, str]) -> bool:
        """Whether the request is signed this authenticator's way (its signature header is present)."""
        return self.signature_header in headers

    def check_headers(self, headers: Mapping[str, str]) -> None:
        """What can be refused before the body: missing or malformed headers, a stale timestamp, a replay."""
        if self.scheme == "standard-webhooks":
            self._standard_headers(headers)

    def _standard_headers(self, headers: Mapping[str, str]) -> tuple[str, int, str]:
        msg_id = headers.get(signatures.WEBHOOK_ID, "").strip()
        stamp = headers.get(signatures.WEBHOOK_TIMESTAMP, "").strip()
        signature = headers.get(signatures.WEBHOOK_SIGNATURE, "")
        if not msg_id or not stamp or not signature.strip():
            raise _refused("webhook-id, webhook-timestamp and webhook-signature are all required", self.name)
        # isascii: str.isdigit is true of digits int() refuses, such as '²' (a 500 before; found by fuzzing).
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
            raise _refused("webhook-timestamp is not whole seconds since the epoch", self.name)
        timestamp = int(stamp)
        skew = time.time() - timestamp
        if abs(skew) > self.cfg.tolerance_s:
            side = "old" if skew > 0 else "far in the future"
            raise _refused(f"webhook-timestamp too {side} (tolerance {self.cfg.tolerance_s:g} s)", self.name)
        if (msg_id, timestamp) in self._seen:
            raise _refused("webhook message already received (replay)", self.name)
        return msg_id, timestamp, signature

    def verify(self, headers: Mapping[str, str], body: bytes) -> Principal:
        """The principal, when one of the signatures matches the body under one of the secrets; raises
        ``Rejected(UNAUTHENTICATED)`` otherwise (``NotReady`` when the replay cache is full)."""
        if self.scheme == "standard-webhooks":
            msg_id, timestamp, header = self._standard_headers(headers)
            given = signatures.standard_candidates(header)
            for key in self._keys:
                expected = signatures.standard_signature(key, msg_id, timestamp, body)
                matched = False
                for candidate in given:  # every comparison made: the time taken tells nothing of which matched
                    matched |= hmac.compare_digest(expected, candidate)
                if matched:
                    self._seen.add((msg_id, timestamp), self.name)
                    return self._principal
            raise _refused("webhook signature does not match", self.name)
        value = headers.get(self.signature_header, "").strip()
        given_bytes = self._decode(value)
        for key in self._keys:
            if hmac.compare_digest(signatures.hmac_digest(key, body, self._algorithm), given_bytes):
                return self._principal
        raise _refused("webhook signature does not match", self.name)

    def _decode(self, value: str) -> bytes:
        prefix = self._prefix
        if prefix and not value.lower().startswith(prefix.lower()):
            raise _refused(f"{self.signature_header} does not start with {prefix!r}", self.name)
        text = value[len(prefix) :].strip()
        try:
            if self.scheme == "github" or self.cfg.encoding == "hex":
                return bytes.fromhex(text)
            return base64.b64decode(text, validate=True)
        except ValueError:
            raise _refused(f"{self.signature_header} is not a {self._encoding_name()} signature", self.name) from None

    def _encoding_name(self) -> str:
        return "hex" if self.scheme == "github" or self.cfg.encoding == "hex" else "base64"

    @property
    def remembered(self) -> int:
        """Messages in the replay cache (for tests and status)."""
        return len(self._seen)
