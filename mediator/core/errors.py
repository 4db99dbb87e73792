"""The error hierarchy every part of the daemon speaks.

Adapters convert library exceptions at their boundary (``raise RetryableDeliveryError(...) from exc``);
core code never sees an aiomqtt, aio-pika, aiohttp or grpc type.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class MediatorError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(MediatorError):
    """A configuration file is unreadable or invalid. ``problems`` holds one line per error."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(f"{file}: " + "; ".join(problems))


class RejectCode(Enum):
    """Why a sender's message was refused; each inbound maps it onto its protocol's answer."""

    INVALID = "invalid"  # HTTP 400, INVALID_ARGUMENT
    UNAUTHENTICATED = "unauthenticated"  # 401
    FORBIDDEN = "forbidden"  # 403, PERMISSION_DENIED
    TOO_LARGE = "too_large"  # 413
    UNSUPPORTED_MEDIA = "unsupported_media"  # 415
    RATE_LIMITED = "rate_limited"  # 429, RESOURCE_EXHAUSTED
    UNPROCESSABLE = "unprocessable"  # 422 (well-formed, but not what its schema says), INVALID_ARGUMENT


@dataclass(frozen=True, slots=True)
class ContentError:
    """One thing wrong with an event's content: what, and where: an RFC 6901 JSON pointer into the data
    ("" for the whole of it) or the name of a context attribute (neither: the event as a whole)."""

    message: str
    pointer: str | None = None
    attribute: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """The limit a refused (or any) call ran into, for the IETF httpapi RateLimit headers: ``quota``
    events per ``window_s`` seconds, ``remaining`` of them now, the quota back in full after ``reset_s``."""

    policy: str
    quota: int
    window_s: float
    remaining: int
    reset_s: float


class Rejected(MediatorError):
    """The sender's fault; never retried.

    ``rule`` names the config rule (authenticator, authorization rule, rate limit) that refused, for logs;
    ``challenge`` is the authentication scheme a 401 offers (HTTP ``WWW-Authenticate``); ``retry_after_s``
    and ``limit`` come with RATE_LIMITED; ``errors`` lists every problem a content check found (HTTP's
    problem body carries them).
    """

    def __init__(
        self,
        code: RejectCode,
        reason: str,
        *,
        rule: str | None = None,
        challenge: str | None = None,
        retry_after_s: float | None = None,
        limit: RateLimitState | None = None,
        errors: tuple[ContentError, ...] = (),
    ) -> None:
        self.code = code
        self.reason = reason
        self.rule = rule
        self.challenge = challenge
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.errors = errors
        super().__init__(f"{code.value}: {reason}")


class NotReady(MediatorError):
    """Draining, overloaded or unable to commit: 503 / UNAVAILABLE / no ack, so the sender retries."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(reason)


class Overloaded(NotReady):
    """The outbox holds more undelivered events than allowed: back-pressure (HTTP 503 with Retry-After,
    gRPC RESOURCE_EXHAUSTED, broker intake paused)."""


class DeliveryError(MediatorError):
    """An outbound could not deliver."""


class RetryableDeliveryError(DeliveryError):
    """Timeout, connection loss, 5xx, broker nack: try again later.

    ``retry_after_s`` is the peer's own hint (HTTP Retry-After), if it gave one.
    """

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(reason)


class TerminalDeliveryError(DeliveryError):
    """Unroutable, 4xx, too large: retrying cannot help, so the delivery is dead-lettered."""


class RequestError(MediatorError):
    """A request (request-reply) that got no reply: the caller is answered with an error, never retried by
    the gateway (a request is not committed to the outbox)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class RequestTimeout(RequestError):
    """No reply within the request's timeout: HTTP 504, gRPC DEADLINE_EXCEEDED."""


class RequestUndeliverable(RequestError):
    """The request could not be handed to a request-capable destination (no route, several, a destination
    that cannot carry a reply address, a broker that refused or is not connected): HTTP 502, gRPC
    UNAVAILABLE when ``retryable`` (not connected, no confirmation) else FAILED_PRECONDITION."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        self.retryable = retryable
        super().__init__(reason)
