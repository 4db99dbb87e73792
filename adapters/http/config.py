"""Config models of the HTTP adapter: ``[listeners.X]``, ``[inbound.X]`` and ``[outbound.X]`` with ``kind = "http"``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mediator.core import signatures
from mediator.core.seams import (
    ConfigModel,
    InboundConfigBase,
    ListenerConfigBase,
    OutboundConfigBase,
    TemplateField,
)

EXPOSED_BY_DEFAULT = ("RateLimit", "RateLimit-Policy", "Retry-After", "WWW-Authenticate")
"""The response headers a browser script may read by default: the ones our refusals carry."""


class CorsConfig(ConfigModel):
    """Cross-origin requests from browsers (the Fetch standard's CORS protocol) to a listener's inbounds.

    A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed origin, for an allowed
    method and headers, is answered 204 with the ``Access-Control-Allow-*`` headers; any other preflight 403.
    Inbound responses (202 and refusals) to an allowed origin carry ``Access-Control-Allow-Origin``.
    """

    allow_origins: list[str] = Field(
        min_length=1,
        description='origins allowed, exactly as browsers send them ("https://app.example.com"), or "*" for any',
    )
    allow_methods: list[str] = Field(default_factory=lambda: ["POST"], description="methods a preflight may ask for")
    allow_headers: list[str] = Field(
        default_factory=list, description="request headers a preflight may ask for (case-insensitive)"
    )
    expose_headers: list[str] = Field(
        default_factory=lambda: list(EXPOSED_BY_DEFAULT),
        description="response headers a browser script may read (Access-Control-Expose-Headers)",
    )
    max_age_s: int | None = Field(default=None, ge=0, description="how long a browser may cache a preflight answer")
    allow_credentials: bool = Field(
        default=False, description="let browsers send cookies and HTTP authentication (never with origin '*')"
    )

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and (not origin.startswith(("http://", "https://")) or origin.endswith("/")):
                raise ValueError(f"an origin is '*' or scheme://host[:port] without a path, got {origin!r}")
        return value

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]

    @model_validator(mode="after")
    def _credentials(self) -> CorsConfig:
        # The Fetch standard refuses "*" with credentials; echoing any origin instead would let every site
        # send a user's credentials here, so it is a config error rather than a silent echo.
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials = true needs explicit allow_origins, not '*'")
        return self


class HttpListenerConfig(ListenerConfigBase):
    """An HTTP server we run; it also serves ``/healthz`` and ``/readyz``."""

    kind: Literal["http"] = "http"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    # aiohttp has no header or body read timeout: this bounds reading one request body.
    read_timeout_s: float = Field(default=10.0, gt=0, description="the whole request body must arrive within it")
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="the whole request head must arrive within it, counted from the request's first byte "
        "(a client trickling its headers is closed, with a 408 when nothing else is being answered); "
        "with TLS, the handshake must also complete within it",
    )
    keepalive_timeout_s: float = Field(
        default=15.0, gt=0, description="an idle keep-alive connection (no request started) is closed after it"
    )
    max_header_bytes: int = Field(
        default=8190, ge=256, le=1_048_576, description="the longest header field (name and value); longer: 431"
    )
    max_headers: int = Field(
        default=100, ge=1, le=10_000, description="the most header fields a request has; more: 431"
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="open connections on this listener; one more is answered 503 (Retry-After: 1) and closed",
    )
    max_subscribers: int | None = Field(
        default=None,
        ge=1,
        description="streams held open at once on this listener by every push outbound and WebSocket inbound "
        "together (SSE subscriptions, WebSockets); one more is answered 503 (Retry-After: 1) before it starts. "
        "None: three quarters of max_connections, so subscribers never take the connections publishes need",
    )
    cors: CorsConfig | None = Field(
        default=None, description="CORS for browsers; None: no CORS headers, every preflight refused (403)"
    )
    reuse_port: bool = False
    backlog: int = Field(default=1024, ge=1)
    max_wait_s: float = Field(
        default=30.0, ge=0, description="the longest a publish with 'Prefer: wait=N' waits for delivery (N is capped)"
    )
    query_token: str | None = Field(
        default=None,
        description="a query parameter (e.g. 'access_token') that may carry the bearer token of a subscription "
        "(browsers' EventSource cannot set headers); never logged, refused over plain HTTP off loopback",
    )
    # /admin/dead-letters (list, replay). Off a loopback address it requires a bearer token, given by the
    # NAME of the environment variable that holds it, or authentication (``auth``) and an admin role.
    admin: bool = True
    openapi: bool = Field(
        default=True,
        description="serve GET /openapi.json: an OpenAPI 3.1 description of this listener, from the config",
    )
    admin_token_env: str | None = None

    @model_validator(mode="after")
    def _admin_guarded(self) -> HttpListenerConfig:
        if self.admin and not self.loopback and not self.admin_token_env and not self.auth:
            raise ValueError("admin endpoints on a non-loopback host need admin_token_env or auth (or admin = false)")
        return self


class HandshakeConfig(ConfigModel):
    """The CloudEvents HTTP webhook abuse-protection handshake answered by a CloudEvents inbound
    (http-webhook.md section 4): ``OPTIONS`` with ``WebHook-Request-Origin`` from an allowed origin gets
    200 with ``WebHook-Allowed-Origin`` (that origin) and ``WebHook-Allowed-Rate``; any other origin 403.
    The handshake commits nothing and needs no credentials: it only says this endpoint wants events."""

    allowed_origins: list[str] = Field(
        min_length=1,
        description='sender names as they send WebHook-Request-Origin (e.g. "eventgrid.azure.net", compared '
        'case-insensitively), or "*" for any',
    )
    allowed_rate: int | None = Field(
        default=None, ge=1, description="requests per minute granted (WebHook-Allowed-Rate); None: '*'"
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not origin.strip() or any(c in origin for c in " ,\r\n\t") or not origin.isascii():
                raise ValueError(f"{origin!r} is not a sender name (a DNS name, or '*')")
        return [o.lower() for o in value]


class HttpInboundConfig(InboundConfigBase):
    """A POST endpoint on a listener.

    ``mode = "plain"``: the body is the event data; ``type`` and ``source`` (templates) name the event
    (a request carrying ``ce-specversion``, or a CloudEvents structured, batch or Protobuf content type,
    is still read as a CloudEvent). Its Content-Type must be one of ``accept`` (else 415, with an
    ``Accept-Post`` header listing them); a request without one is 415 unless ``default_content_type``
    says what it is.
    ``mode = "cloudevents"``: binary, structured, batch or Protobuf CloudEvents only.
    """

    kind: Literal["http"]
    listener: str = Field(min_length=1)
    path: str
    mode: Literal["plain", "cloudevents"] = "plain"
    type: TemplateField | None = None
    source: TemplateField | None = None
    max_batch: int = Field(default=1000, ge=1)
    accept: list[str] = Field(
        default_factory=lambda: ["application/json"],
        min_length=1,
        description="plain mode: the media types accepted ('application/json' includes text/json and "
        "*+json; 'type/*' and '*/*' too); anything else is 415",
    )
    default_content_type: str | None = Field(
        default=None, description="plain mode: the datacontenttype of a request without a Content-Type"
    )
    request: bool = Field(
        default=False,
        description="request-reply: each POST (one event, no batch) is published with a reply address and "
        "answered with the consumer's reply (200), its error reply (502) or 504 after request_timeout_s; its "
        "route must name this inbound and have exactly one AMQP or MQTT 5 destination",
    )
    request_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="request mode: how long a caller waits for the reply (504 after)"
    )
    handshake: HandshakeConfig | None = Field(
        default=None, description="cloudevents mode: answer the CloudEvents webhook abuse-protection handshake"
    )

    @field_validator("accept")
    @classmethod
    def _accept(cls, value: list[str]) -> list[str]:
        out = []
        for media in value:
            m = media.strip().lower()
            kind, _, sub = m.partition("/")
            if not kind or not sub or ";" in m or any(c.isspace() for c in m) or (kind == "*" and sub != "*"):
                raise ValueError(f"{media!r} is not a media type or range (type/subtype, type/*, */*)")
            out.append(m)
        return out

    @field_validator("default_content_type")
    @classmethod
    def _default_type(cls, value: str | None) -> str | None:
        if value is not None and ("/" not in value or "*" in value or "\r" in value or "\n" in value):
            raise ValueError(f"{value!r} is not a media type (type/subtype)")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path must start with '/', got {value!r}")
        if value in ("/healthz", "/readyz"):
            raise ValueError(f"path {value!r} is reserved for health checks")
        return value

    @model_validator(mode="after")
    def _templates(self) -> HttpInboundConfig:
        if self.mode != "cloudevents" and self.handshake is not None:
            raise ValueError("handshake is answered by mode = 'cloudevents' inbounds (CloudEvents http-webhook.md)")
        if self.mode != "plain" and {"accept", "default_content_type"} & self.model_fields_set:
            raise ValueError("accept and default_content_type are for mode = 'plain'; CloudEvents say their own")
        if self.mode == "plain":
            missing = [k for k in ("type", "source") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"mode = 'plain' needs {' and '.join(missing)} (templates naming the event); "
                    "or set mode = 'cloudevents'"
                )
        elif self.type is not None or self.source is not None:
            raise ValueError("type and source are only used with mode = 'plain'; CloudEvents carry their own")
        return self

    def connection(self) -> str | None:
        return self.listener

    @property
    def request_mode(self) -> bool:
        return self.request


class StandardWebhooksSigningConfig(ConfigModel):
    """Sign every delivery per Standard Webhooks (https://www.standardwebhooks.com/): ``webhook-id`` (the
    event id, the same on every attempt), ``webhook-timestamp`` (the attempt's Unix time) and
    ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` per secret, space-separated,
    so a receiver holding either the new or the old secret verifies while one is rotated). Each variable
    holds a ``whsec_<base64>`` secret (24-64 bytes)."""

    kind: Literal["standard-webhooks"]
    secrets_env: list[str] = Field(
        min_length=1, description="environment variables holding the secrets, e.g. the new one and the old one"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: object) -> object:
        if isinstance(data, dict):
            inline = sorted({"secret", "secrets", "key"} & set(data))
            if inline:
                raise ValueError(
                    f"inline secrets are refused ({', '.join(inline)}): name environment variables in secrets_env"
                )
        return data

    @field_validator("secrets_env")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return signatures.env_names(value)


class HttpOutboundConfig(OutboundConfigBase):
    """Webhooks: each event is POSTed to ``url`` + the route's address (or to the address itself when it is
    an absolute http(s) URL).

    ``sign``: Standard Webhooks signatures on every delivery. ``handshake = true``: before the first
    delivery to a target URL, the CloudEvents abuse-protection handshake (``OPTIONS`` with
    ``WebHook-Request-Origin: handshake_origin``), its consent kept for the outbound's life and its
    ``WebHook-Allowed-Rate`` kept to. A target that refuses (no matching ``WebHook-Allowed-Origin``, a
    4xx) dead-letters the delivery with the reason (replay it once the target consents); the refusal is
    remembered ``handshake_retry_s``, then asked again. No answer, 429 or 5xx: retried like a send."""

    kind: Literal["http"]
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    format: Literal["binary", "structured", "protobuf"] = "binary"
    sign: StandardWebhooksSigningConfig | None = Field(default=None, description="sign every delivery")
    handshake: bool = Field(default=False, description="CloudEvents webhook abuse-protection handshake first")
    handshake_origin: str | None = Field(
        default=None, description="WebHook-Request-Origin sent: this sender's DNS name (default: the host name)"
    )
    handshake_rate: int | None = Field(
        default=None, ge=1, description="WebHook-Request-Rate asked, requests per minute (None: none asked)"
    )
    handshake_retry_s: float = Field(default=60.0, gt=0, description="how long a target's refusal is remembered")

    @field_validator("handshake_origin")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in " ,\r\n\t") or not value.isascii()):
            raise ValueError(f"{value!r} is not a DNS name")
        return value

    @model_validator(mode="after")
    def _handshake(self) -> HttpOutboundConfig:
        given = {"handshake_origin", "handshake_rate", "handshake_retry_s"} & self.model_fields_set
        if given and not self.handshake:
            raise ValueError(f"{', '.join(sorted(given))} need handshake = true")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"url must be an absolute http:// or https:// URL, got {value!r}")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, v in value.items():
            if not name or any(c in name for c in " :\r\n\t") or not name.isascii():
                raise ValueError(f"invalid header name {name!r}")
            if "\r" in v or "\n" in v:
                raise ValueError(f"header {name!r} value must not contain a line break")
        return value
