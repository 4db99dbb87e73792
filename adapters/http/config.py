"""Config models of the HTTP adapter: ``[listeners.X]``, ``[inbound.X]`` and ``[outbound.X]`` with ``kind = "http"``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mediator.core.seams import ConfigModel, InboundConfigBase, OutboundConfigBase, TemplateField


class HttpListenerConfig(ConfigModel):
    """An HTTP server we run; it also serves ``/healthz`` and ``/readyz``."""

    kind: Literal["http"] = "http"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    # aiohttp has no header or body read timeout: this bounds reading one request body.
    read_timeout_s: float = Field(default=10.0, gt=0)
    reuse_port: bool = False
    backlog: int = Field(default=1024, ge=1)
    # /admin/dead-letters (list, replay). Off a loopback address it requires a bearer token, given by the
    # NAME of the environment variable that holds it.
    admin: bool = True
    admin_token_env: str | None = None

    @model_validator(mode="after")
    def _admin_guarded(self) -> HttpListenerConfig:
        loopback = self.host in ("127.0.0.1", "::1", "localhost")
        if self.admin and not loopback and not self.admin_token_env:
            raise ValueError("admin endpoints on a non-loopback host need admin_token_env (or admin = false)")
        return self


class HttpInboundConfig(InboundConfigBase):
    """A POST endpoint on a listener.

    ``mode = "plain"``: the body is the event data; ``type`` and ``source`` (templates) name the event
    (a request carrying ``ce-specversion`` is still read as a binary-mode CloudEvent).
    ``mode = "cloudevents"``: binary, structured, batch or Protobuf CloudEvents only.
    """

    kind: Literal["http"]
    listener: str = Field(min_length=1)
    path: str
    mode: Literal["plain", "cloudevents"] = "plain"
    type: TemplateField | None = None
    source: TemplateField | None = None
    max_batch: int = Field(default=1000, ge=1)

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


class HttpOutboundConfig(OutboundConfigBase):
    """Webhooks: each event is POSTed to ``url`` + the route's address (or to the address itself when it is
    an absolute http(s) URL)."""

    kind: Literal["http"]
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    format: Literal["binary", "structured", "protobuf"] = "binary"

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
