"""``GET /openapi.json``: an OpenAPI 3.1 description of what one HTTP listener serves, made from the live config.

Generated per request from the listener's own tables (its inbounds, whether it serves the admin API, the
delivery status, the metrics, and the mounts other adapters serve on it now: push subscriptions, WebSocket
inbounds), so it is true for the config being served and follows a reload. tests/adapters/test_openapi.py
keeps it true: every route the listener's aiohttp router serves is described and every described path is
served, and schemathesis calls every operation against a running daemon (no 5xx, every answer's status and
content type described).

Every refusal has the JSON shape ``{"error": code, "reason": text}``; content refusals (400 malformed, 415,
422) and the request-reply and status answers are RFC 9457 ``application/problem+json`` with the same two
members. Streams (a push subscription's Server-Sent Events, a WebSocket upgrade) are described with
``x-mediator-stream: true``: a client keeps them open, so a contract test does not call them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mediator import __version__

if TYPE_CHECKING:
    from adapters.http.inbound import HttpInbound
    from mediator.core.seams import HttpMount

OPENAPI_PATH = "/openapi.json"
JSON = "application/json"
PROBLEM = "application/problem+json"
CE_JSON = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
CE_PROTOBUF = "application/cloudevents+protobuf"

_ERROR = {"$ref": "#/components/schemas/Error"}
_REASONS = {
    400: "Malformed request or event",
    401: "No valid credential (WWW-Authenticate names the scheme)",
    403: "The caller may not do this",
    404: "Nothing is known at this path",
    406: "Not an acceptable representation",
    408: "The body did not arrive within read_timeout_s",
    413: "Body over the listener's max_body_bytes",
    415: "A media type this inbound does not take (Accept-Post lists what it does)",
    422: "The event does not match its schema",
    429: "Rate limited (Retry-After, RateLimit and RateLimit-Policy headers)",
    502: "The consumer answered with an error, or no destination takes the request",
    503: "Not ready: draining, overloaded (priority shedding, max_pending) or not connected; Retry-After says when",
    504: "No reply within the inbound's request_timeout_s",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "seconds"}}


def _error(status: int, *media: str) -> dict[str, Any]:
    """A refusal answer: the error shape in ``media`` (JSON by default)."""
    answer: dict[str, Any] = {
        "description": _REASONS.get(status, "Refused"),
        "content": {m: {"schema": _ERROR} for m in (media or (JSON,))},
    }
    if status in (429, 503):
        answer["headers"] = _RETRY_AFTER
    return answer


def _errors(statuses: Iterable[int], **media: Sequence[str]) -> dict[str, Any]:
    """``{"401": ..., "503": ...}``; ``media`` gives a status its own media types (``s400=(JSON, PROBLEM)``)."""
    return {str(s): _error(s, *media.get(f"s{s}", ())) for s in statuses}


def _json(schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": dict(schema)}}}


def _path_template(path: str) -> tuple[str, list[str]]:
    """An aiohttp route path as an OpenAPI path (``{name:regex}`` becomes ``{name}``) and its variables."""
    names: list[str] = []

    def strip(m: re.Match[str]) -> str:
        names.append(m.group(1))
        return "{" + m.group(1) + "}"

    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}", strip, path), names


def _path_params(names: Sequence[str]) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}} for n in names]


ADMIN_EXTRAS: tuple[tuple[str, str, str, str, str], ...] = (
    # (method, aiohttp route, operationId, summary, json | page | stream): adapters/http/admin.py,
    # adapters/http/dashboard/ and the event store's routes in adapters/http/listener.py.
    ("post", "/admin/dead-letters/delete", "deleteDeadLetters", "Delete the dead letters listed in ids", "json"),
    ("get", r"/admin/dead-letters/{id:\d+}", "getDeadLetter", "One dead letter, whole", "json"),
    (
        "post",
        r"/admin/dead-letters/{id:\d+}/replay",
        "editReplayDeadLetter",
        "Edit a dead letter and replay it",
        "json",
    ),
    ("get", "/admin/audit", "auditLog", "Who changed which dead letters, when", "json"),
    ("get", "/admin/routes", "adminRoutes", "The translation table as written and as resolved", "json"),
    ("get", "/admin/rates", "adminRates", "Events per second of each inbound and outbound", "json"),
    ("get", "/admin/tail", "adminTail", "The live tail (Server-Sent Events)", "stream"),
    ("get", "/admin/events", "listEvents", "The event store: events by type, source, subject, time", "json"),
    ("get", "/admin/events/{id}", "getEvent", "One stored event", "json"),
    ("get", "/admin/replays", "listReplays", "Replay jobs and their progress", "json"),
    ("post", "/admin/replays", "startReplay", "Start a replay of stored events", "json"),
    ("get", "/admin/replays/{id}", "getReplay", "One replay job", "json"),
    ("delete", "/admin/replays/{id}", "cancelReplay", "Cancel a replay job", "json"),
    ("get", "/admin/", "dashboard", "The dashboard's overview page", "page"),
    ("get", "/admin/ui/overview/stream", "dashboardOverviewStream", "The overview's live updates", "stream"),
    ("get", "/admin/ui/routes", "dashboardRoutes", "The dashboard's routes page", "page"),
    ("get", "/admin/ui/tail", "dashboardTail", "The dashboard's live tail page", "page"),
    ("get", "/admin/ui/dead-letters", "dashboardDeadLetters", "The dashboard's dead letters", "page"),
    ("get", r"/admin/ui/dead-letters/{id:\d+}", "dashboardDeadLetter", "One dead letter in the dashboard", "page"),
    ("post", r"/admin/ui/dead-letters/{id:\d+}/replay", "dashboardEditReplay", "Edit and replay (form)", "page"),
    ("post", "/admin/ui/dead-letters/replay", "dashboardReplay", "Replay dead letters (form)", "page"),
    ("post", "/admin/ui/dead-letters/delete", "dashboardDelete", "Delete dead letters (form)", "page"),
    ("get", "/admin/ui/history", "dashboardHistory", "The dashboard's history page", "page"),
    ("get", "/admin/ui/login", "dashboardLoginPage", "The dashboard's login page", "page"),
    ("post", "/admin/ui/login", "dashboardLogin", "Log in to the dashboard (form)", "page"),
    ("post", "/admin/ui/logout", "dashboardLogout", "Log out of the dashboard (form)", "page"),
    ("get", "/admin/ui/static/{name}", "dashboardStatic", "The dashboard's scripts and styles", "page"),
)
"""The admin routes beyond status and dead letters, as one table (the dashboard's pages and streams are
described for completeness; a contract test does not call them)."""


class Surface:
    """What one listener serves, read from the listener at the moment of the request."""

    def __init__(
        self,
        listener: str,
        inbounds: Sequence[HttpInbound],
        *,
        admin: bool,
        admin_token: bool,
        status: bool,
        metrics_path: str | None,
        mounts: Sequence[HttpMount],
        authenticated: bool,
        credential_headers: Sequence[str],
        max_body_bytes: int,
    ) -> None:
        self.listener = listener
        self.inbounds = inbounds
        self.admin = admin
        self.admin_token = admin_token
        self.status = status
        self.metrics_path = metrics_path
        self.mounts = mounts
        self.authenticated = authenticated
        self.credential_headers = credential_headers
        self.max_body_bytes = max_body_bytes


def describe(s: Surface, server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``s`` (JSON-ready), with ``server_url`` as its server."""
    paths: dict[str, dict[str, Any]] = {}
    security_schemes: dict[str, Any] = {}
    inbound_security: list[dict[str, list[str]]] = []
    if s.authenticated:
        for header in s.credential_headers:
            if header == "authorization":
                security_schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "a JWT or an API key"}
                inbound_security.append({"bearer": []})
            else:
                name = f"header-{header}"
                security_schemes[name] = {"type": "apiKey", "in": "header", "name": header}
                inbound_security.append({name: []})
    admin_security: list[dict[str, list[str]]] = []
    if s.admin_token:
        security_schemes["adminToken"] = {"type": "http", "scheme": "bearer", "description": "the admin token"}
        admin_security.append({"adminToken": []})
    if s.authenticated:
        admin_security += inbound_security  # a principal with an admin role

    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: the process answers",
            "tags": ["health"],
            "responses": {"200": _json({"$ref": "#/components/schemas/Healthz"}, "Alive")},
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: every component ready (503 and the same document otherwise)",
            "tags": ["health"],
            "responses": {
                "200": _json({"$ref": "#/components/schemas/Components"}, "Ready"),
                "503": _json({"$ref": "#/components/schemas/Components"}, "Not ready (draining, or a component down)"),
            },
        }
    }
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This description, made from the config being served",
            "tags": ["health"],
            "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 description of this listener")},
        }
    }
    if s.metrics_path is not None:
        paths[s.metrics_path] = {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (on a listener with auth, admins only unless [metrics] public)",
                "tags": ["health"],
                "responses": {
                    "200": {
                        "description": "The Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors((401, 403)),
                },
            }
        }
    if s.status:
        path, names = _path_template("/events/{id}/status")
        paths[path] = {
            "get": {
                "operationId": "eventStatus",
                "summary": "What became of an event: its delivery status per destination",
                "tags": ["status"],
                "parameters": _path_params(names),
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/DeliveryStatus"}, "The event's delivery status"),
                    **_errors((401, 403, 404), s404=(PROBLEM, JSON)),
                },
                **({"security": [*inbound_security, {}]} if inbound_security else {}),
            }
        }
    if s.admin:
        guarded = {"security": admin_security} if admin_security else {}
        admin_errors = _errors((401, 403))
        paths["/admin/status"] = {
            "get": {
                "operationId": "adminStatus",
                "summary": "The daemon's state: listeners, brokers, inbounds, outbounds, outbox, overload, config",
                "tags": ["admin"],
                "responses": {"200": _json({"$ref": "#/components/schemas/AdminStatus"}, "The status"), **admin_errors},
                **guarded,
            }
        }
        paths["/admin/dead-letters"] = {
            "get": {
                "operationId": "listDeadLetters",
                "summary": "The dead letters, newest first",
                "tags": ["admin"],
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "how many at most (1 to 10,000; default 100)",
                        "schema": {"type": "integer"},
                    }
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["dead_letters"],
                            "properties": {"dead_letters": {"type": "array", "items": {"type": "object"}}},
                        },
                        "The dead letters",
                    ),
                    **_errors((400,)),
                    **admin_errors,
                },
                **guarded,
            }
        }
        paths["/admin/dead-letters/replay"] = {
            "post": {
                "operationId": "replayDeadLetters",
                "summary": "Replay dead letters: those listed in ids, or every replayable one when ids is absent",
                "tags": ["admin"],
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "properties": {"ids": {"type": "array", "items": {"type": "integer"}}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["replayed"], "properties": {"replayed": {"type": "integer"}}},
                        "How many were replayed",
                    ),
                    **_errors((400, 404, 415)),
                    **admin_errors,
                },
                **guarded,
            }
        }
        for method, route, op_id, summary, kind in ADMIN_EXTRAS:
            path, names = _path_template(route)
            params = [
                {
                    "name": n,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9A-Za-z._-]+$"},
                }
                for n in names
            ]
            op: dict[str, Any] = {
                "operationId": op_id,
                "summary": summary,
                "tags": ["admin"],
                **({"parameters": params} if params else {}),
                **guarded,
            }
            if kind == "json":
                op["responses"] = {
                    "200": _json({"type": "object"}, "The answer"),
                    "202": _json({"type": "object"}, "Started (a replay job)"),
                    **_errors((400, 404, 409, 415, 503)),
                    **admin_errors,
                }
                if method == "post":
                    op["requestBody"] = {"required": True, "content": {JSON: {"schema": {"type": "object"}}}}
                    op["x-mediator-loose-body"] = True  # what the object must hold is in docs/, not in this schema
            else:  # a page for a browser, or a stream a client keeps open: described, not called by a contract test
                op["x-mediator-stream" if kind == "stream" else "x-mediator-page"] = True
                op["responses"] = {"200": {"description": "HTML" if kind == "page" else "Server-Sent Events"}}
            paths.setdefault(path, {})[method] = op
    for inbound in s.inbounds:
        path, names = _path_template(inbound.path)
        item = paths.setdefault(path, {})
        item["post"] = _publish(inbound, names, inbound_security, s.status)
        if inbound.handshake is not None:
            item["options"] = {
                "operationId": f"handshake-{inbound.name}",
                "summary": "CloudEvents webhook abuse-protection handshake (http-webhook.md 4.2)",
                "tags": ["inbound"],
                "parameters": [
                    *_path_params(names),
                    {"name": "WebHook-Request-Origin", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "This origin may deliver webhooks (WebHook-Allowed-Origin, -Rate)"},
                    "204": {"description": "No WebHook-Request-Origin: the methods allowed"},
                    **_errors((403,)),
                },
            }
    for mount in s.mounts:
        _mount(paths, mount)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"mediator listener {s.listener!r}",
            "version": __version__,
            "description": "Made from the config being served (adapters/http/openapi.py).",
        },
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {"schemas": _SCHEMAS, **({"securitySchemes": security_schemes} if security_schemes else {})},
    }


def _publish(
    inbound: HttpInbound, names: Sequence[str], security: list[dict[str, list[str]]], status: bool
) -> dict[str, Any]:
    cfg = inbound.cfg
    cloudevent = {"$ref": "#/components/schemas/CloudEvent"}
    content: dict[str, Any] = {
        CE_JSON: {"schema": cloudevent},
        CE_BATCH: {"schema": {"type": "array", "items": cloudevent, "maxItems": cfg.max_batch}},
    }
    if cfg.mode == "plain":
        summary = f"Publish to inbound {inbound.name!r}: the body becomes an event's data (or a CloudEvent)"
        for media in cfg.accept:
            content.setdefault(media if "*" not in media else "application/octet-stream", {"schema": {}})
    else:
        # Binary mode (any body with ce-* headers) is said in the description only: which headers a body
        # needs depends on its media type, which OpenAPI cannot say.
        summary = f"Publish CloudEvents to inbound {inbound.name!r}: structured, batch, or binary (ce-* headers)"
    content[CE_PROTOBUF] = {"schema": {"type": "string", "contentMediaType": CE_PROTOBUF}}
    parameters: list[dict[str, Any]] = [*_path_params(names)]
    if cfg.mode == "plain":
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "the event's id (repeats within the dedup window are committed once)",
                "schema": {"type": "string", "pattern": "^[!-~]([ -~]*[!-~])?$"},
            }
        )
    refusals: tuple[int, ...] = (400, 401, 403, 408, 413, 415, 422, 429, 503)
    content_refusal = (JSON, PROBLEM)
    op: dict[str, Any] = {
        "operationId": f"publish-{inbound.name}",
        "summary": summary,
        "description": "Binary mode: any body with ce-specversion, ce-id, ce-source and ce-type headers. "
        + ("Prefer: wait=N waits for delivery (200 with the delivery status). " if status and not cfg.request else "")
        + f"Priority under overload: {cfg.priority} (README 'Shedding by priority').",
        "tags": ["inbound"],
        "parameters": parameters,
        "requestBody": {"required": True, "content": content},
    }
    if cfg.request:
        op["summary"] = f"Request-reply through inbound {inbound.name!r}: the consumer's reply is the answer"
        op["responses"] = {
            "200": {"description": "The consumer's reply, in its own content type", "content": {"*/*": {"schema": {}}}},
            **_errors(refusals, s400=content_refusal, s415=content_refusal, s422=content_refusal, s503=(JSON, PROBLEM)),
            **_errors((502, 504), s502=(PROBLEM,), s504=(PROBLEM,)),
        }
    else:
        accepted: dict[str, Any] = {
            "description": "Committed: it will be delivered or dead-lettered (Location: its status URL)",
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        }
        if status:
            accepted["headers"] = {"Location": {"schema": {"type": "string"}, "description": "the status URL"}}
        op["responses"] = {
            "202": accepted,
            **(
                {"200": _json({"$ref": "#/components/schemas/DeliveryStatus"}, "Prefer: wait: delivered or dead")}
                if status
                else {}
            ),
            **_errors(refusals, s400=content_refusal, s415=content_refusal, s422=content_refusal),
        }
    if security:
        op["security"] = [*security, {}] if cfg.allow_anonymous else security
    return op


def _mount(paths: dict[str, dict[str, Any]], mount: HttpMount) -> None:
    """A path another adapter serves on this listener now: a push outbound's subscriptions (``outbound:``)
    or a WebSocket inbound (``inbound:``)."""
    role, _, name = mount.component.partition(":")
    if role == "outbound":
        paths[mount.prefix + "/{address}"] = {
            "get": {
                "operationId": f"subscribe-{name}",
                "summary": f"Subscribe to push outbound {name!r}: Server-Sent Events, or a WebSocket upgrade",
                "tags": ["push"],
                "x-mediator-stream": True,
                "parameters": [
                    {
                        "name": "address",
                        "in": "path",
                        "required": True,
                        "description": "an address, or a pattern ('orders.*' one segment more, 'orders.#' any below)",
                        "schema": {"type": "string"},
                    },
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                    {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {
                    "101": {"description": "WebSocket: events as text (JSON) or binary (protobuf) messages"},
                    "200": {
                        "description": "The stream: one event per SSE message, its cursor as the id",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors((400, 401, 403, 404, 406, 503)),
                },
            }
        }
    else:
        paths[mount.prefix] = {
            "get": {
                "operationId": f"websocket-{name}",
                "summary": f"Publish over a WebSocket to inbound {name!r} (cloudevents.json or cloudevents.proto)",
                "tags": ["inbound"],
                "x-mediator-stream": True,
                "responses": {
                    "101": {"description": "Upgraded: one event per message, each acknowledged"},
                    **_errors((400, 403, 503)),
                },
            }
        }


# A CloudEvents String: no control characters, surrogates or noncharacters (mediator/stages/wellformed.py).
# Said as the characters allowed (of the Basic Multilingual Plane: a narrower promise than the daemon keeps),
# because schemathesis drops a pattern that names surrogates.
_STRING = {"type": "string", "pattern": "^[ -~\\u00a0-\\ud7ff\\ue000-\\ufdcf\\ufdf0-\\ufffd]*$"}
_TOKEN = "[!#$%&'*+.^_`|~0-9A-Za-z-]+"

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every refusal; problem details (RFC 9457) add type, title, status, detail and errors",
        "required": ["error", "reason"],
        "properties": {
            "error": {"type": "string"},
            "reason": {"type": "string"},
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object"}},
        },
    },
    "CloudEvent": {
        "type": "object",
        "description": "CloudEvents 1.0, JSON format; the well-formedness rules (mediator/stages/wellformed.py) "
        "and the [validation] limits apply (400, 413 otherwise)",
        "required": ["specversion", "id", "source", "type"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {**_STRING, "minLength": 1},
            "source": {**_STRING, "minLength": 1},
            "type": {**_STRING, "minLength": 1},
            "datacontenttype": {"type": "string", "pattern": f"^{_TOKEN}/{_TOKEN}$"},
            "dataschema": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9+.-]*:[!-~]*$"},
            "subject": _STRING,
            "time": {"type": "string", "format": "date-time"},
            "data": {},
            "data_base64": {
                "type": "string",
                "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
            },
        },
        # Extension attributes: lower-case ASCII letters and digits, a String or a Boolean. A CloudEvents Integer
        # (a 32-bit JSON number without a fraction: 1978.0 is refused) is taken too, but JSON Schema's
        # "integer" includes 1978.0, so the schema leaves integers out rather than promise that.
        "patternProperties": {"^[a-z0-9]{1,64}$": {"oneOf": [_STRING, {"type": "boolean"}]}},
        "additionalProperties": False,
        "not": {"required": ["data", "data_base64"]},
    },
    "Accepted": {
        "type": "object",
        "description": "One event: its id; a batch: every id, in order, with a status URL each",
        "properties": {
            "id": {"type": "string"},
            "duplicate": {"oneOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "boolean"}}]},
            "ids": {"type": "array", "items": {"type": "string"}},
            "status": {"type": "array", "items": {"type": "string"}},
        },
    },
    "DeliveryStatus": {"type": "object", "description": "An event's delivery status (docs/status.md)"},
    "Healthz": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Components": {
        "type": "object",
        "description": "Every health component (listener:, inbound:, outbound:NAME) and its state",
        "additionalProperties": {"type": "object"},
    },
    "AdminStatus": {
        "type": "object",
        "required": ["mediator", "ready", "draining", "config", "inbounds", "outbounds"],
        "properties": {
            "mediator": {"type": "string"},
            "ready": {"type": "boolean"},
            "draining": {"type": "boolean"},
            "config": {"type": "object"},
            "listeners": {"type": "array", "items": {"type": "object"}},
            "brokers": {"type": "array", "items": {"type": "object"}},
            "inbounds": {"type": "array", "items": {"type": "object"}},
            "outbounds": {"type": "array", "items": {"type": "object"}},
            "routes": {"type": "array", "items": {"type": "object"}},
            "outbox": {"type": "object"},
            "overload": {"type": "object"},
        },
    },
}
