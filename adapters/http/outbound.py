"""HTTP outbound (webhooks): POST each event to a URL and classify the answer; optionally sign it
(Standard Webhooks) and ask each target's consent first (the CloudEvents abuse-protection handshake)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import structlog

from adapters.http import codec
from adapters.http.config import HttpOutboundConfig
from mediator.core import signatures
from mediator.core.deadletter import UNROUTABLE_PREFIX
from mediator.core.deadline import deadline
from mediator.core.envelope import Envelope, value_to_str
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.tracecontext import TRACEPARENT, TRACESTATE, outgoing

_URL_CACHE_MAX = 4096
_ERROR_BODY_MAX = 200
_KEEPALIVE_BODY_MAX = 65536  # a 2xx body up to this size is read so the connection can be reused
REQUEST_ORIGIN = "WebHook-Request-Origin"
REQUEST_RATE = "WebHook-Request-Rate"
ALLOWED_ORIGIN = "WebHook-Allowed-Origin"
ALLOWED_RATE = "WebHook-Allowed-Rate"


@dataclass(slots=True)
class Consent:
    """A target's answer to the handshake: allowed (kept), or refused with the reason (kept until
    ``until``, monotonic). ``interval_s`` paces deliveries to its ``WebHook-Allowed-Rate``."""

    allowed: bool
    reason: str = ""
    until: float = 0.0
    interval_s: float = 0.0  # 60 / allowed rate; 0: no limit ('*')
    next_at: float = 0.0  # monotonic time of the next free delivery slot


def parse_consent(
    status: int, origins: list[str], rates: list[str], origin: str, asked_rate: int | None
) -> tuple[bool, str, float]:
    """(allowed, reason when refused, pacing interval) from a handshake answer that was not 429/5xx
    (CloudEvents http-webhook.md 4.2: consent is the headers, not the status)."""
    granted = [o.strip() for value in origins for o in value.split(",") if o.strip()]
    if not any(o == "*" or o.lower() == origin.lower() for o in granted):
        shown = ", ".join(granted)[:100] or "absent"
        return False, f"HTTP {status}, WebHook-Allowed-Origin {shown}", 0.0
    rate = rates[0].strip() if rates else ""
    if not rate:
        if asked_rate is not None:
            return False, f"HTTP {status}, no WebHook-Allowed-Rate for the rate asked", 0.0
        return True, "", 0.0
    if rate == "*":
        return True, "", 0.0
    if not (rate.isascii() and rate.isdigit()) or int(rate) <= 0:  # isdigit alone takes '²', int() does not
        return False, f"HTTP {status}, WebHook-Allowed-Rate {rate[:40]!r} is not a positive integer or '*'", 0.0
    return True, "", 60.0 / int(rate)


class HttpOutbound:
    """An ``Outbound`` with one aiohttp session (``max_in_flight`` connections). The session is opened on
    first use (or by ``run``) and closed when ``run`` is cancelled or ``close`` is called."""

    def __init__(
        self,
        name: str,
        cfg: HttpOutboundConfig,
        health: Health | None = None,
        *,
        signing_keys: tuple[bytes, ...] = (),
        handshake_origin: str = "",
    ) -> None:
        if cfg.sign is not None and not signing_keys:
            raise ValueError(f"outbound {name!r} signs its deliveries: signing_keys are required")
        if cfg.handshake and not handshake_origin:
            raise ValueError(f"outbound {name!r} performs the handshake: handshake_origin is required")
        self.name = name
        self.max_in_flight = cfg.max_in_flight
        self.cfg = cfg
        self.component = f"outbound:{name}"
        self._health = health
        self._timeout_s = cfg.send_timeout_s
        self._static_headers = dict(cfg.headers)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, str] = {}
        self._keys = signing_keys
        self._handshake_origin = handshake_origin
        self._consents: dict[str, Consent] = {}  # by target URL; bounded like _urls
        self._asking: dict[str, asyncio.Task[Consent]] = {}  # one handshake in flight per target
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
        for task in list(self._asking.values()):
            task.cancel()
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
        budget_s = self._timeout_s
        if self.cfg.handshake:
            budget_s -= await self._consented(url)  # one send_timeout_s for the handshake, pacing and POST
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
        if self._keys:
            # After the handshake and the pacing: the timestamp is this attempt's (Standard Webhooks:
            # the id stays the event's across retries, the timestamp and signature are new each time).
            stamp = int(time.time())
            headers[signatures.WEBHOOK_ID] = event.id
            headers[signatures.WEBHOOK_TIMESTAMP] = str(stamp)
            headers[signatures.WEBHOOK_SIGNATURE] = signatures.standard_signature_header(
                self._keys, event.id, stamp, body
            )
        if self.cfg.handshake:
            headers[REQUEST_ORIGIN] = self._handshake_origin
        session = self._get_session()
        try:
            with deadline(max(budget_s, 0.001)):
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

    async def _consented(self, url: str) -> float:
        """Return (the seconds it took) when ``url`` consented and a delivery slot within its allowed rate
        is free; raise TerminalDeliveryError when it refused, RetryableDeliveryError when it could not be
        asked or the next slot is further away than half this send's time budget."""
        started = time.monotonic()
        consent = self._consents.get(url)
        if consent is None or (not consent.allowed and time.monotonic() >= consent.until):
            asking = self._asking.get(url)
            if asking is None:
                # One handshake per target however many deliveries wait for it; shielded, so a waiter
                # cancelled (its send's deadline) leaves the answer to the others. Bounded by its deadline.
                asking = asyncio.get_running_loop().create_task(self._ask(url), name=f"handshake:{self.name}")
                self._asking[url] = asking
                asking.add_done_callback(lambda task: self._asked(url, task))
            consent = await asyncio.shield(asking)
        if not consent.allowed:
            raise TerminalDeliveryError(consent.reason)
        if consent.interval_s:
            now = time.monotonic()
            slot = max(now, consent.next_at)
            budget = self._timeout_s - (now - started)
            if slot - now > budget / 2:  # leave half the budget for the request itself
                raise RetryableDeliveryError(
                    f"{url}: paced to the target's WebHook-Allowed-Rate ({60 / consent.interval_s:g}/min)",
                    retry_after_s=slot - now,
                )
            consent.next_at = slot + consent.interval_s
            if slot > now:
                await asyncio.sleep(slot - now)
        return time.monotonic() - started

    def _asked(self, url: str, task: asyncio.Task[Consent]) -> None:
        del self._asking[url]
        if task.cancelled() or task.exception() is not None:  # retrieved here: every waiter may be gone
            return
        if len(self._consents) >= _URL_CACHE_MAX:
            self._consents.clear()
        self._consents[url] = task.result()

    async def _ask(self, url: str) -> Consent:
        """The handshake (CloudEvents http-webhook.md 4.1): OPTIONS with WebHook-Request-Origin (and the
        rate asked), the outbound's static headers (a target may want its credentials on it too)."""
        headers = {**self._static_headers, REQUEST_ORIGIN: self._handshake_origin}
        if self.cfg.handshake_rate is not None:
            headers[REQUEST_RATE] = str(self.cfg.handshake_rate)
        session = self._get_session()
        try:
            with deadline(self._timeout_s):
                async with session.options(url, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    origins = resp.headers.getall(ALLOWED_ORIGIN, [])
                    rates = resp.headers.getall(ALLOWED_RATE, [])
                    retry_after = resp.headers.get("Retry-After")
                    await resp.read()
        except TimeoutError as exc:
            raise RetryableDeliveryError(f"OPTIONS {url} (handshake): no response within {self._timeout_s} s") from exc
        except aiohttp.InvalidURL as exc:
            raise TerminalDeliveryError(f"invalid URL {url!r}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableDeliveryError(f"OPTIONS {url} (handshake): {type(exc).__name__}: {exc}") from exc
        if status in (408, 429) or status >= 500:
            raise RetryableDeliveryError(
                f"OPTIONS {url} (handshake): HTTP {status}",
                retry_after_s=codec.parse_retry_after(retry_after, time.time()),
            )
        allowed, reason, interval = parse_consent(
            status, origins, rates, self._handshake_origin, self.cfg.handshake_rate
        )
        if not allowed:
            reason = f"OPTIONS {url}: the target refused the CloudEvents webhook handshake ({reason})"
            self._log.warning("handshake.refused", url=url, reason=reason)
            return Consent(False, reason, until=time.monotonic() + self.cfg.handshake_retry_s)
        rate = f"{60 / interval:g}/min" if interval else "*"
        self._log.info("handshake.accepted", url=url, rate=rate)
        return Consent(True, interval_s=interval)


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
