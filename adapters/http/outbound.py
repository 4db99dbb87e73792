"""HTTP outbound (webhooks): POST each event to a URL and classify the answer."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog

from adapters.http import codec
from adapters.http.config import HttpOutboundConfig
from mediator.core.deadletter import UNROUTABLE_PREFIX
from mediator.core.deadline import deadline
from mediator.core.envelope import Envelope, value_to_str
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE, outgoing

_URL_CACHE_MAX = 4096
_ERROR_BODY_MAX = 200
_KEEPALIVE_BODY_MAX = 65536  # a 2xx body up to this size is read so the connection can be reused


class HttpOutbound:
    """An ``Outbound`` with one aiohttp session (``max_in_flight`` connections). The session is opened on
    first use (or by ``run``) and closed when ``run`` is cancelled or ``close`` is called."""

    def __init__(self, name: str, cfg: HttpOutboundConfig, health: Health | None = None) -> None:
        self.name = name
        self.max_in_flight = cfg.max_in_flight
        self.cfg = cfg
        self.component = f"outbound:{name}"
        self._health = health
        self._timeout_s = cfg.send_timeout_s
        self._static_headers = dict(cfg.headers)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, str] = {}
        self._log = structlog.get_logger(__name__).bind(outbound=name, protocol="http")

    def _get_session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_in_flight),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),  # webhooks are stateless; no cookie leaks between them
                # aiohttp would label a body without datacontenttype application/octet-stream, which a
                # binary-mode receiver reads back as a datacontenttype the event never had.
                skip_auto_headers=("Content-Type",),
            )
            self._session = session
        return session

    async def run(self) -> None:
        """Own the session: open it, report ready, close it when cancelled."""
        self._get_session()
        if self._health is not None:
            self._health.set(self.component, True, "ready")
        try:
            await asyncio.Future()
        finally:
            if self._health is not None:
                self._health.set(self.component, False, "stopped")
            await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            async with asyncio.timeout(5.0):
                await session.close()

    def url_for(self, address: str) -> str:
        """The request URL: ``address`` itself when absolute http(s), else the configured ``url`` + address."""
        url = self._urls.get(address)
        if url is not None:
            return url
        if address.startswith(("http://", "https://")):
            url = address
        elif self.cfg.url is None:
            raise TerminalDeliveryError(
                f"{UNROUTABLE_PREFIX}address {address!r} is not an absolute http(s) URL"
                f" and outbound {self.name!r} has no url"
            )
        elif not address:
            url = self.cfg.url
        else:
            url = self.cfg.url.rstrip("/") + "/" + address.lstrip("/")
        if len(self._urls) >= _URL_CACHE_MAX:
            self._urls.clear()
        self._urls[address] = url
        return url

    async def send(self, event: Envelope, address: str, format: str) -> None:
        url = self.url_for(address)
        try:
            headers, body = codec.from_envelope(event, format or self.cfg.format)
        except ValueError as exc:
            raise TerminalDeliveryError(str(exc)) from exc
        if self._static_headers:
            headers = {**self._static_headers, **headers}
        attrs = event.attributes
        hop = outgoing()
        if hop is not None:  # tracing on: the send span is the receiver's parent (ce-traceparent is the event's)
            headers[TRACEPARENT] = hop[0]
            if hop[1]:
                headers[TRACESTATE] = hop[1]
        elif "traceparent" in attrs:
            headers["traceparent"] = value_to_str(attrs["traceparent"])
            if "tracestate" in attrs:
                headers["tracestate"] = value_to_str(attrs["tracestate"])
        session = self._get_session()
        try:
            with deadline(self._timeout_s):
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    if 200 <= status < 300:
                        length = resp.content_length
                        if length is None or length <= _KEEPALIVE_BODY_MAX:
                            await resp.read()
                        self._log.debug("delivery.sent", event_id=event.id, status=status, size=len(body))
                        return
                    detail = (await resp.content.read(_ERROR_BODY_MAX)).decode("utf-8", "replace")
                    retry_after = resp.headers.get("Retry-After")
                    location = resp.headers.get("Location")
                    reason_phrase = resp.reason or ""
        except TimeoutError as exc:
            raise RetryableDeliveryError(f"POST {url}: no response within {self._timeout_s} s") from exc
        except aiohttp.InvalidURL as exc:
            raise TerminalDeliveryError(f"{UNROUTABLE_PREFIX}invalid URL {url!r}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableDeliveryError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:
            # aiohttp refuses header values with CR or LF (an attribute such as datacontenttype that arrived
            # in structured JSON can hold them): the event cannot be sent as it is.
            raise TerminalDeliveryError(f"POST {url}: unsendable request: {exc}") from exc
        raise classify(status, reason_phrase, detail, retry_after, location)


def classify(
    status: int, reason: str, detail: str, retry_after: str | None, location: str | None = None
) -> RetryableDeliveryError | TerminalDeliveryError:
    """The delivery error for a non-2xx answer: 408, 429 and 5xx are worth retrying, the rest is not."""
    text = f"HTTP {status} {reason}".rstrip()
    detail = " ".join(detail.split())
    if detail:
        text += f": {detail[:_ERROR_BODY_MAX]}"
    if status in (408, 429) or status >= 500:
        return RetryableDeliveryError(text, retry_after_s=codec.parse_retry_after(retry_after, time.time()))
    if 300 <= status < 400 and location:
        text += f" (redirect to {location} not followed)"
    return TerminalDeliveryError(text)
