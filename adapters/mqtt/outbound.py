"""MQTT outbound: publish each event and return once the broker confirmed it.

aiomqtt's ``publish`` waits for the PUBACK but ignores its MQTT 5 reason code, cannot tell a lost
connection from a slow broker (it waits for its timeout), and scans every pending call per publish
(quadratic under load). So the hot path talks to the paho client under it: ``publish`` queues the
packet, and paho's ``on_publish`` (called on the event loop by aiomqtt's socket callbacks) resolves the
future of that message id. A dropped connection fails every waiting send at once.

Request-reply (``requests = true``, MQTT 5 only): the outbound subscribes to its own reply topic,
``<reply_topic_prefix>/<client id>`` (the client id is per daemon, and per worker with ``workers``), and a
request carries it as Response Topic, a fresh correlation id as Correlation Data and the timeout as Message
Expiry Interval (whole seconds, rounded down, at least 1), so a request nobody took in time expires in the
broker. A reply is matched by its Correlation Data only; a reply with the user property
``mediator-error: true`` is the consumer's error (HTTP 502). MQTT 3.1.1 has none of these properties:
``mediator check`` refuses ``requests = true`` on a 3.1.1 broker.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog

from adapters.mqtt.codec import from_envelope
from adapters.mqtt.config import MqttOutboundConfig, publish_topic_problem
from adapters.mqtt.connection import (
    Backoff,
    BrokerAccess,
    PublishProperties,
    make_client,
    paho_client,
    stop_if_cancelled,
)
from mediator.core.deadletter import UNROUTABLE_PREFIX
from mediator.core.deadline import deadline
from mediator.core.envelope import Envelope
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from mediator.core.health import Health
from mediator.core.seams import Replies, Reply
from mediator.core.tracecontext import outgoing

ERROR_PROPERTY = "mediator-error"
"""A reply with this user property set to ``true`` (or ``1``) is the consumer's error reply."""

# PUBACK/PUBREC reason codes (MQTT 5 section 3.4.2.1) that retrying cannot cure.
_TERMINAL_REASONS = frozenset({0x87, 0x90, 0x95, 0x99})  # not authorized, bad topic, too large, bad format


class _Connection:
    """The ``Service`` that keeps an outbound's connection up."""

    def __init__(self, name: str, outbound: MqttOutbound) -> None:
        self.name = name
        self._outbound = outbound

    async def run(self) -> None:
        await self._outbound.run()


class MqttOutbound:
    """An ``Outbound``; its connection runs as the service ``self.service``."""

    def __init__(
        self,
        name: str,
        cfg: MqttOutboundConfig,
        access: BrokerAccess,
        health: Health,
        replies: Replies | None = None,
    ) -> None:
        self.name = name
        self.max_in_flight = cfg.max_in_flight
        self.component = f"outbound:{name}"
        self.client_id = f"{access.config.client_id}-{name}"
        self.service = _Connection(self.component, self)
        self._cfg = cfg
        self._access = access
        self._v5 = access.v5
        self._health = health
        self._paho: Any = None  # the connected paho client, None while disconnected
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._log = structlog.get_logger(__name__).bind(outbound=name, protocol="mqtt")
        self._replies = replies if cfg.requests and access.v5 else None
        self.reply_topic = f"{cfg.reply_topic_prefix}/{self.client_id}"
        health.register(self.component)

    async def run(self) -> None:
        """Connect, and reconnect with backoff, until cancelled. No session: a publish that was not
        confirmed before a disconnect fails and the dispatcher retries it."""
        broker = self._access.config
        backoff = Backoff(broker.reconnect_initial_s, broker.reconnect_max_s)
        try:
            while True:
                problem = "disconnected"
                try:
                    client = make_client(
                        self._access,
                        self.client_id,
                        persistent=False,
                        receive_maximum=65535,
                        max_inflight=self._cfg.max_in_flight,
                    )
                    inner = paho_client(client)
                    inner.on_publish = self._on_publish
                    async with client:
                        stop_if_cancelled()  # aiomqtt's connect may have swallowed a cancellation
                        if self._replies is not None:  # before any request can name the topic
                            await client.subscribe(self.reply_topic, qos=1)
                        backoff.reset()
                        self._paho = inner
                        self._health.set(self.component, True, f"connected to {broker.host}:{broker.port}")
                        self._log.info("outbound.connected", broker=self._access.name, client_id=self.client_id)
                        # Only the reply topic is subscribed (with requests); the iterator ends, with
                        # MqttError, at a disconnect.
                        async for message in client.messages:
                            self._on_reply(message)
                except aiomqtt.MqttError as exc:
                    problem = str(exc)
                finally:
                    self._paho = None
                    self._fail_waiting(problem)
                stop_if_cancelled()
                delay = backoff.next()
                self._health.set(self.component, False, problem)
                self._log.warning("outbound.disconnected", reason=problem, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
        finally:
            self._health.set(self.component, False, "stopped")

    def _on_reply(self, message: aiomqtt.Message) -> None:
        replies = self._replies
        if replies is None:
            return
        props = message.properties
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else str(message.payload).encode()
        if not correlation:
            self._log.warning("reply.uncorrelated", topic=str(message.topic), size=len(payload))
            replies.resolve("", Reply(bytes(payload)))
            return
        content_type = getattr(props, "ContentType", None)
        error = any(
            name == ERROR_PROPERTY and str(value).strip().lower() in ("true", "1", "yes")
            for name, value in getattr(props, "UserProperty", None) or ()
        )
        replies.resolve(bytes(correlation).decode("utf-8", "replace"), Reply(bytes(payload), content_type, error))

    def request_refusal(self) -> str | None:
        if not self._v5:
            return "MQTT 3.1.1 has no Response Topic or Correlation Data (request-reply needs protocol = '5')"
        if self._replies is None:
            return "requests = false (set requests = true: it then subscribes to its reply topic)"
        return None

    async def send_request(
        self, event: Envelope, address: str, format: str, correlation_id: str, timeout_s: float
    ) -> None:
        await self._publish(event, address, format, (correlation_id, max(1, math.floor(timeout_s))))

    def _fail_waiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(RetryableDeliveryError(f"connection lost before the broker confirmed: {reason}"))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        fut = self._waiting.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason_code)

    async def send(self, event: Envelope, address: str, format: str) -> None:
        """Publish ``event`` to topic ``address`` and return once the broker confirmed it (PUBACK for QoS 1,
        PUBCOMP for QoS 2; QoS 0 has no confirmation: returns once queued on the connection)."""
        await self._publish(event, address, format, None)

    async def _publish(self, event: Envelope, address: str, format: str, request: tuple[str, int] | None) -> None:
        """``send``, and with ``request`` (correlation id, expiry in seconds) ``send_request``."""
        problem = publish_topic_problem(address)
        if problem is not None:
            raise TerminalDeliveryError(f"{UNROUTABLE_PREFIX}invalid MQTT topic {address!r}: {problem}")
        inner = self._paho
        if inner is None:
            raise RetryableDeliveryError(f"not connected to broker {self._access.name!r}")
        message = from_envelope(event, address, format, v5=self._v5, trace=outgoing())
        props: PublishProperties | None = None
        if self._v5 and (message.content_type or message.user_properties or request is not None):
            try:
                if request is None:
                    props = PublishProperties(message.content_type, message.user_properties)
                else:
                    props = PublishProperties(
                        message.content_type,
                        message.user_properties,
                        expiry_s=request[1],
                        response_topic=self.reply_topic,
                        correlation_data=request[0].encode("utf-8"),
                    )
            except ValueError as exc:
                raise TerminalDeliveryError(f"cannot encode the event as MQTT properties: {exc}") from exc
        qos = self._cfg.qos
        try:
            info = inner.publish(address, message.payload, qos, self._cfg.retain, props)
        except ValueError as exc:  # paho's own checks: topic, payload size
            raise TerminalDeliveryError(f"cannot publish to {address!r}: {exc}") from exc
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise RetryableDeliveryError(f"publish failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        # on_publish runs on this loop only after we yield, so registering now cannot miss it.
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[info.mid] = fut
        try:
            with deadline(self._cfg.send_timeout_s):
                reason = await fut
        except TimeoutError:
            raise RetryableDeliveryError(
                f"broker did not confirm within {self._cfg.send_timeout_s} s (message id {info.mid})"
            ) from None
        finally:
            if self._waiting.get(info.mid) is fut:
                del self._waiting[info.mid]
        value = getattr(reason, "value", 0)
        if value >= 0x80:
            error = f"broker refused the message: {reason} (0x{value:02x})"
            if value in _TERMINAL_REASONS:
                raise TerminalDeliveryError(error)
            raise RetryableDeliveryError(error)
