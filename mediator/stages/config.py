"""Config models of the ingress stages: ``[auth.NAME]`` authenticators, ``[[authorization]]`` rules,
``[[rate_limits]]`` and ``[security]``. Secrets are never inline: files or environment variable names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from mediator.core import signatures
from mediator.core.seams import LOOPBACK_HOSTS, ConfigModel

AUTHTYPES = ("user", "app_user", "service_account", "api_key", "system")
AuthType = Literal["user", "app_user", "service_account", "api_key", "system"]

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
Claim = Literal["exp", "iss", "aud", "iat", "nbf", "sub"]
DEFAULT_REQUIRED: tuple[Claim, ...] = ("exp", "iss", "aud")
CertField = Literal["san_uri", "san_dns", "cn"]
CERT_FIELDS: tuple[CertField, ...] = ("san_uri", "san_dns", "cn")


_INLINE_SECRETS = frozenset({"secret", "secrets", "key", "keys", "password", "token", "private_key", "api_key", "hash"})


class _AuthBase(ConfigModel):
    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: object) -> object:
        if isinstance(data, dict):
            inline = sorted(_INLINE_SECRETS & set(data))
            if inline:
                raise ValueError(
                    f"inline secrets are refused ({', '.join(inline)}): name a file (keys_file, jwks_file) or an "
                    "environment variable (keys_env, secret_env, secrets_env) instead"
                )
        return data


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def inbounds(self) -> list[str]: ...


def named_problems(section: str, configs: Sequence[_Named], inbound_names: set[str]) -> list[str]:
    """The problems of a ``[[section]]`` array whose entries have a ``name`` and ``inbounds``: a name used
    twice, an inbound that does not exist."""
    names = [c.name for c in configs]
    out = [f"{section}: name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for i, cfg in enumerate(configs):
        out += [f"{section}[{i}].inbounds: no inbound named {r!r}" for r in cfg.inbounds if r not in inbound_names]
    return out


def _header_name(value: str) -> str:
    if not value or any(c in value for c in " :\r\n\t") or not value.isascii():
        raise ValueError(f"invalid header name {value!r}")
    return value.lower()


class ApiKeyAuthConfig(_AuthBase):
    """API keys, stored hashed: ``keys_file`` (or ``keys_env``, the name of a variable holding the same
    text) is TOML with one ``[[keys]]`` table per key: ``principal``, ``sha256`` (hex digest of the key),
    optional ``roles`` and ``expires`` (an RFC 3339 date-time). Several keys may name one principal, so a
    key is rotated by adding the new one, moving clients over, then removing the old. ``mediator
    hash-key`` makes a key and its entry. The file is read again on SIGHUP."""

    kind: Literal["api_key"]
    keys_file: str | None = Field(default=None, description="TOML file of hashed keys")
    keys_env: str | None = Field(default=None, description="name of an environment variable holding that TOML")
    header: str = Field(default="x-api-key", description="header / gRPC metadata carrying the key")
    bearer: bool = Field(default=True, description="also accept the key as `Authorization: Bearer <key>`")
    authtype: AuthType = "api_key"

    _header = field_validator("header")(classmethod(lambda cls, v: _header_name(v)))

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyAuthConfig:
        if (self.keys_file is None) == (self.keys_env is None):
            raise ValueError("give exactly one of keys_file and keys_env")
        return self


class JwtAuthConfig(_AuthBase):
    """JSON Web Tokens (``Authorization: Bearer <jwt>``) from one issuer, verified with PyJWT.

    Keys: ``jwks_url`` (fetched by the daemon, cached ``jwks_ttl_s``, fetched again for an unknown ``kid``
    at most once per ``jwks_cooldown_s``; a failed fetch keeps the last good set), ``jwks_file``, or
    ``secret_env`` for the HS algorithms. ``algorithms`` are pinned: a token naming any other is refused.
    """

    kind: Literal["jwt"]
    issuer: str | None = Field(default=None, description="required `iss`; None only with require without 'iss'")
    audience: list[str] = Field(default_factory=list, description="accepted `aud` values (any one)")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    jwks_url: str | None = None
    jwks_file: str | None = None
    secret_env: str | None = Field(default=None, description="environment variable holding the HS secret")
    require: list[Claim] = Field(
        default_factory=lambda: list(DEFAULT_REQUIRED), description="claims a token must carry"
    )
    leeway_s: float = Field(default=30.0, ge=0, le=300)
    principal_claim: str = "sub"
    roles_claim: str | None = Field(default=None, description="claim holding a list (or space-separated string)")
    claims: list[str] = Field(default_factory=list, description="claims copied into the event's authclaims")
    max_token_bytes: int = Field(default=8192, ge=256, le=65536)
    jwks_ttl_s: float = Field(default=300.0, gt=0)
    jwks_cooldown_s: float = Field(default=30.0, gt=0)
    jwks_timeout_s: float = Field(default=5.0, gt=0)
    jwks_ca_file: str | None = Field(default=None, description="CA bundle for an https jwks_url")
    cache_size: int = Field(default=4096, ge=0, description="verified tokens kept until they expire (0: none)")
    authtype: AuthType = "user"

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        for alg in value:
            if alg not in ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS:
                allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS))
                raise ValueError(f"algorithm {alg!r} is not one of {allowed}")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
            return value
        raise ValueError("jwks_url must be https:// (plain http only on a loopback address)")

    @model_validator(mode="after")
    def _keys(self) -> JwtAuthConfig:
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if hmac and len(hmac) != len(self.algorithms):
            raise ValueError("do not mix HS and public-key algorithms in one authenticator (one per issuer)")
        sources = [s for s in (self.jwks_url, self.jwks_file, self.secret_env) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of jwks_url, jwks_file and secret_env")
        if hmac and self.secret_env is None:
            raise ValueError("HS algorithms take their secret from secret_env")
        if not hmac and self.secret_env is not None:
            raise ValueError("secret_env is for HS algorithms; public-key algorithms use jwks_url or jwks_file")
        if "iss" in self.require and self.issuer is None:
            raise ValueError("issuer is required (or remove 'iss' from require)")
        if "aud" in self.require and not self.audience:
            raise ValueError("audience is required (or remove 'aud' from require)")
        return self


class MtlsAuthConfig(_AuthBase):
    """Client certificates verified by a TLS listener (``tls.client_cert``): the principal is the first of
    ``principal_from`` the certificate has."""

    kind: Literal["mtls"]
    principal_from: list[CertField] = Field(default_factory=lambda: list(CERT_FIELDS), min_length=1)
    roles: dict[str, list[str]] = Field(default_factory=dict, description="principal -> roles")
    default_roles: list[str] = Field(default_factory=list)
    authtype: AuthType = "service_account"


class BrokerAuthConfig(_AuthBase):
    """The identity a broker vouches for, on broker inbounds: ``from = "topic"`` takes topic segment
    ``segment`` (trustworthy where the broker's ACL binds it to the username, Mosquitto's ``pattern write
    devices/%u/#``); ``from = "user_id"`` the AMQP ``user_id`` property (RabbitMQ checks it against the
    connection's user)."""

    kind: Literal["broker"]
    source: Literal["topic", "user_id"] = Field(alias="from")
    segment: int | None = Field(default=None, description="0-based topic segment (from = 'topic')")
    roles: dict[str, list[str]] = Field(default_factory=dict, description="principal -> roles")
    default_roles: list[str] = Field(default_factory=list)
    authtype: AuthType = "app_user"

    @model_validator(mode="after")
    def _segment(self) -> BrokerAuthConfig:
        if (self.source == "topic") != (self.segment is not None):
            raise ValueError("from = 'topic' needs segment, and only it takes one")
        return self


WebhookScheme = Literal["standard-webhooks", "github", "hmac"]
HmacAlgorithm = Literal["sha256", "sha384", "sha512"]


class WebhookAuthConfig(_AuthBase):
    """Signed webhooks on HTTP inbounds: the request's signature over its exact body, under a shared
    secret, is the credential; the caller is the configured ``principal``.

    ``scheme = "standard-webhooks"`` (https://www.standardwebhooks.com/): ``webhook-id``,
    ``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``,
    several space-separated); a timestamp further than ``tolerance_s`` from now is refused, and so is a
    message (id and timestamp) already accepted within the tolerance (a replay); secrets are
    ``whsec_<base64>``; on a plain inbound the event takes the verified ``webhook-id`` as its id (as it
    would an ``Idempotency-Key``), so a sender's retry (same id, new timestamp) is committed once within
    the outbox's dedup window. ``scheme = "github"``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the
    body>`` (GitHub sends no timestamp, so replays cannot be told apart). ``scheme = "hmac"``: the HMAC of
    the body in ``header`` (``algorithm``, ``encoding``, after an optional ``prefix``).

    Secrets come from the environment variables ``secrets_env`` names; several for rotation (a signature
    under any one of them is accepted). Only on HTTP inbounds (``auth = [...]`` of the inbound).
    """

    kind: Literal["webhook"]
    scheme: WebhookScheme
    secrets_env: list[str] = Field(
        min_length=1, description="environment variables holding the secrets (several while rotating)"
    )
    principal: str = Field(min_length=1, description="the principal id a verified request is published as")
    roles: list[str] = Field(default_factory=list)
    authtype: AuthType = "service_account"
    tolerance_s: float = Field(
        default=300.0, gt=0, le=3600, description="standard-webhooks: how far webhook-timestamp may be from now"
    )
    replay_cache_size: int = Field(
        default=100_000,
        ge=1,
        description="standard-webhooks: messages remembered within the tolerance to refuse replays; "
        "when full of unexpired ones, new messages get 503 (retry later) rather than a replay window",
    )
    header: str | None = Field(default=None, description="hmac: the header carrying the signature")
    algorithm: HmacAlgorithm = Field(default="sha256", description="hmac: the HMAC hash")
    encoding: Literal["hex", "base64"] = Field(default="hex", description="hmac: how the signature is written")
    prefix: str = Field(default="", description='hmac: text before the signature in the header, e.g. "sha256="')

    @field_validator("secrets_env")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return signatures.env_names(value)

    @field_validator("header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        return None if value is None else _header_name(value)

    @model_validator(mode="after")
    def _scheme(self) -> WebhookAuthConfig:
        hmac_only = {"header", "algorithm", "encoding", "prefix"} & self.model_fields_set
        if self.scheme == "hmac":
            if self.header is None:
                raise ValueError("scheme = 'hmac' needs header (the header carrying the signature)")
        elif hmac_only:
            raise ValueError(f"{', '.join(sorted(hmac_only))}: only for scheme = 'hmac'")
        if self.scheme != "standard-webhooks" and {"tolerance_s", "replay_cache_size"} & self.model_fields_set:
            raise ValueError("tolerance_s and replay_cache_size are for scheme = 'standard-webhooks' (timestamped)")
        return self

    def signature_headers(self) -> tuple[str, ...]:
        """The request headers this authenticator reads (lower-case)."""
        if self.scheme == "standard-webhooks":
            return ("webhook-id", "webhook-timestamp", "webhook-signature")
        if self.scheme == "github":
            return ("x-hub-signature-256",)
        assert self.header is not None
        return (self.header,)

    def signature_header(self) -> str:
        """The header whose presence says a request is signed this way."""
        return self.signature_headers()[-1]


AUTH_KINDS = frozenset({"api_key", "jwt", "mtls", "broker", "webhook"})
AuthenticatorConfig = Annotated[
    ApiKeyAuthConfig | JwtAuthConfig | MtlsAuthConfig | BrokerAuthConfig | WebhookAuthConfig,
    Field(discriminator="kind"),
]


class AuthorizationRuleConfig(ConfigModel):
    """Who may publish what, where. As soon as one rule exists, what no ``allow`` rule allows is refused;
    a matching ``deny`` rule refuses first. Empty lists match everything."""

    name: str = Field(min_length=1)
    effect: Literal["allow", "deny"] = "allow"
    principals: list[str] = Field(default_factory=list, description="principal ids (globs)")
    roles: list[str] = Field(default_factory=list, description="any one of these roles")
    anonymous: bool = Field(default=False, description="also match callers no authenticator vouched for")
    inbounds: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list, description="event types (globs)")


class RateLimitConfig(ConfigModel):
    """``rate`` events per second with bursts of ``burst``, counted per principal (per client address
    for anonymous callers), per inbound, or for all. HTTP answers 429, gRPC RESOURCE_EXHAUSTED; a broker
    inbound slows down instead (its acknowledgements wait)."""

    name: str = Field(min_length=1)
    per: Literal["principal", "inbound", "global"] = "principal"
    rate: float = Field(gt=0, description="events per second")
    burst: int = Field(default=0, ge=0, description="events at once (0: one second's worth)")
    inbounds: list[str] = Field(default_factory=list, description="where it applies (empty: every inbound)")
    max_keys: int = Field(default=100_000, ge=1, description="callers tracked at once (idle ones are forgotten)")


class SecurityConfig(ConfigModel):
    reserved_attributes: list[str] = Field(
        default_factory=list, description="more attribute names stripped from what arrives, like authcontext's"
    )
    admin_roles: list[str] = Field(default_factory=lambda: ["admin"])
    payload_roles: list[str] = Field(
        default_factory=list,
        description="roles whose holders see event data in the dashboard's live tail (GET /admin/tail); "
        "none by default, since payloads may be personal data (the admin token has no role)",
    )
