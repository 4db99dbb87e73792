"""Why something became a dead letter, in a few documented classes: one table, one classifier.

A dead letter's reason is free text for the operator (``unroutable: exchange 'orders' has no queue bound
for routing key 'orders.priority'``); its class is a small fixed set for the ``reason`` label of
``mediator_dead_letters_total``, the listing of dead letters (``class``) and the logs. Every producer
of a dead letter writes a reason that begins the way its class's row says, and every consumer calls
``classify``, so a class means one thing wherever it is shown (before, an AMQP NO_ROUTE was counted as
``terminal`` while the table said ``unroutable``, and aggregation's dead letters as ``ingress``).

A dead letter belongs to one destination (a delivery: ``outbound`` names it) or is a whole event
(``outbound`` is ""); each scope has its own classes, the last of each being its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DELIVERY: Literal["delivery"] = "delivery"
EVENT: Literal["event"] = "event"


@dataclass(frozen=True, slots=True)
class DeadLetterClass:
    """One class: its label value, the scope it applies to, the reason prefixes that mark it (none: the
    scope's default), and what it means (the README's metrics table says the same)."""

    name: str
    scope: Literal["delivery", "event"]
    prefixes: tuple[str, ...]
    meaning: str


UNROUTABLE = "unroutable"
TRANSFORM_FAILED = "transform_failed"
EXHAUSTED = "exhausted"
REMOVED = "removed"
TERMINAL = "terminal"
UNMATCHED = "unmatched"
INGRESS = "ingress"
STAGE = "stage"

# Reason prefixes the producers write (and tests check): the text after them is the detail.
UNROUTABLE_PREFIX = "unroutable: "
TRANSFORM_PREFIX = "transform failed: "
EXHAUSTED_PREFIX = "gave up after "
REMOVED_PREFIX = "removed: "
UNMATCHED_REASON = "no route matched"
UNDECODABLE_PREFIX = "undecodable: "
REJECTED_PREFIX = "rejected: "

CLASSES: tuple[DeadLetterClass, ...] = (
    DeadLetterClass(
        UNROUTABLE,
        DELIVERY,
        (UNROUTABLE_PREFIX,),
        "no consumer could be reached at the destination's address: the broker had no queue bound for it "
        "(AMQP NO_ROUTE, the mandatory publish came back), or the address could not be rendered for the "
        "event or is not a valid one (an MQTT topic with wildcards, a routing key over 255 bytes, no URL)",
    ),
    DeadLetterClass(
        TRANSFORM_FAILED,
        DELIVERY,
        (TRANSFORM_PREFIX,),
        "the destination's transform or format conversion failed for the event (data its Protobuf message "
        "or Avro schema cannot hold: the reason names the field), at commit",
    ),
    DeadLetterClass(
        EXHAUSTED,
        DELIVERY,
        (EXHAUSTED_PREFIX,),
        "retry.max_attempts attempts failed with retryable errors (timeouts, connection loss, nacks, 5xx)",
    ),
    DeadLetterClass(
        REMOVED,
        DELIVERY,
        (REMOVED_PREFIX,),
        "its outbound was removed from the config (after removed_outbound_grace_s), or was not configured "
        "when the daemon started or the dead letter was replayed",
    ),
    DeadLetterClass(
        TERMINAL,
        DELIVERY,
        (),
        "the peer refused it for good: HTTP 4xx, an MQTT reason code retrying cannot change, an event the "
        "protocol cannot carry (any other delivery dead letter)",
    ),
    DeadLetterClass(UNMATCHED, EVENT, (UNMATCHED_REASON,), "no route matched the event"),
    DeadLetterClass(
        INGRESS,
        EVENT,
        (UNDECODABLE_PREFIX, REJECTED_PREFIX),
        "a broker inbound's message that could not be decoded, or that a stage refused (there is nobody "
        "to answer on MQTT or AMQP, so it is stored and acknowledged)",
    ),
    DeadLetterClass(
        STAGE,
        EVENT,
        (),
        "a stage took the event out: schema on_invalid = dead_letter, enrichment, aggregation (any other "
        "whole-event dead letter)",
    ),
)

DELIVERY_CLASSES: tuple[str, ...] = tuple(c.name for c in CLASSES if c.scope == DELIVERY)
EVENT_CLASSES: tuple[str, ...] = tuple(c.name for c in CLASSES if c.scope == EVENT)

_BY_SCOPE = {
    scope: (
        tuple((prefix, c.name) for c in CLASSES if c.scope == scope for prefix in c.prefixes),
        next(c.name for c in CLASSES if c.scope == scope and not c.prefixes),
    )
    for scope in (DELIVERY, EVENT)
}


def classify(reason: str, outbound: str) -> str:
    """The class of a dead letter with this reason, of a delivery to ``outbound`` ("" for a whole event)."""
    marked, default = _BY_SCOPE[DELIVERY if outbound else EVENT]
    for prefix, name in marked:
        if reason.startswith(prefix):
            return name
    return default
