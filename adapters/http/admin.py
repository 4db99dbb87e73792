"""The admin API over HTTP (``/admin/*``, JSON and Server-Sent Events): what ``mediator`` CLI commands and the
dashboard (``adapters/http/dashboard``) both use. Every handler asks the listener who the caller is first
(``Caller``: the admin token, an admin role, or loopback when the listener has neither) and acts through the
``Admin`` seam only, so there is one path to each fact.

Browsers. A page cannot send an ``Authorization`` header, so the dashboard's login stores the credential in
an HttpOnly, SameSite=Strict cookie (``SESSION_COOKIE``) that requests may present instead. Every JSON POST
requires ``Content-Type: application/json``, which a page of another site cannot send without a CORS
preflight (none is answered under /admin): so an open loopback listener, which any page the operator
visits could otherwise POST to, is not an open door. A JSON POST admitted by the session cookie also needs
the CSRF token in ``X-CSRF-Token``; the dashboard's forms (``adapters/http/dashboard``) always need it, in
their ``csrf`` field: the double-submit value of the ``CSRF_COOKIE`` cookie.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import hdrs, web

from adapters.http.inbound import error_response
from mediator.core.health import Health
from mediator.core.seams import Admin
from mediator.core.tap import TailFilter, TooManyWatchers

SESSION_COOKIE = "mediator_admin"
CSRF_COOKIE = "mediator_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
# Every /admin/ answer: nothing inline runs (scripts and styles are files served from the package), nothing
# is fetched from elsewhere, no page may frame it.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TAIL_HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle tail
STREAM_POLL_S = 1.0  # how often a stream checks whether the daemon drains (a stream never holds the drain)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who an admin request comes from: ``who`` for the audit log, ``roles`` for what it may see."""

    who: str
    roles: frozenset[str] = field(default_factory=frozenset)
    by_cookie: bool = False  # admitted by the dashboard's session cookie: a JSON POST needs the CSRF token


Identify = Callable[[web.BaseRequest, str | None], Awaitable[Caller | web.Response]]


def with_security(resp: web.StreamResponse) -> web.StreamResponse:
    for name, value in SECURITY_HEADERS.items():
        resp.headers.setdefault(name, value)
    return resp


class AdminApi:
    def __init__(self, admin: Admin, identify: Identify, health: Health, *, secure: bool) -> None:
        self.admin = admin
        self._identify = identify
        self.health = health
        self.secure = secure  # the listener serves TLS: cookies are Secure
        self._streams: set[asyncio.Task[Any]] = set()  # the SSE handlers running now

    def streaming(self) -> None:
        """Called by a stream handler as it starts: ``close_streams`` ends it when the listener stops."""
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)

    def close_streams(self) -> None:
        """End every open stream at once (the listener is stopping: its cleanup then waits for nothing)."""
        for task in self._streams:
            task.cancel()

    # ------------------------------------------------------------------ who, and CSRF
    async def caller(self, request: web.BaseRequest, credential: str | None = None) -> Caller | web.Response:
        """The caller, from ``credential`` (the login form's), the ``Authorization`` header, or else the
        dashboard's session cookie."""
        if credential is not None:
            return await self._identify(request, f"Bearer {credential}")
        cookie = request.cookies.get(SESSION_COOKIE)
        if hdrs.AUTHORIZATION not in request.headers and cookie:
            found = await self._identify(request, f"Bearer {cookie}")
            if isinstance(found, Caller):
                return Caller(found.who, found.roles, by_cookie=True)
            return found
        return await self._identify(request, None)

    @staticmethod
    def csrf_ok(request: web.BaseRequest, given: str | None) -> bool:
        expected = request.cookies.get(CSRF_COOKIE, "")
        return bool(expected) and given is not None and hmac.compare_digest(given.encode(), expected.encode())

    @staticmethod
    def csrf_refusal() -> web.Response:
        return error_response(403, "forbidden", "missing or wrong CSRF token (reload the page and try again)")

    async def _json_action(self, request: web.BaseRequest) -> tuple[Caller, object] | web.Response:
        """The caller and the JSON body of a state-changing API request, or the refusal."""
        caller = await self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        if request.content_type != "application/json":
            return error_response(415, "unsupported_media_type", "send the body as application/json")
        if caller.by_cookie and not self.csrf_ok(request, request.headers.get(CSRF_HEADER)):
            return self.csrf_refusal()
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return error_response(400, "invalid", "the body is not JSON")
        return caller, body

    # ------------------------------------------------------------------ routes
    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/status", self.status)
        router.add_get("/admin/dead-letters", self.dead_letters)
        router.add_post("/admin/dead-letters/replay", self.replay)
        router.add_post("/admin/dead-letters/delete", self.delete)
        router.add_get(r"/admin/dead-letters/{id:\d+}", self.dead_letter)
        router.add_post(r"/admin/dead-letters/{id:\d+}/replay", self.edit_replay)
        router.add_get("/admin/audit", self.audit)
        router.add_get("/admin/routes", self.routes)
        router.add_get("/admin/rates", self.rates)
        router.add_get("/admin/tail", self.tail)

    async def _read(self, request: web.BaseRequest, fetch: Callable[[], Awaitable[object]]) -> web.StreamResponse:
        caller = await self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        return with_security(web.json_response(await fetch()))

    async def status(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._read(request, self.admin.status)

    async def routes(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._read(request, self.admin.routes)

    async def rates(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._read(request, self.admin.rates)

    async def audit(self, request: web.BaseRequest) -> web.StreamResponse:
        limit = _limit(request.query.get("limit", "100"))
        if limit is None:
            return error_response(400, "invalid", "limit must be an integer")
        return await self._read(request, lambda: self._audit(limit))

    async def _audit(self, limit: int) -> dict[str, object]:
        return {"audit": await self.admin.audit(limit)}

    async def dead_letters(self, request: web.BaseRequest) -> web.StreamResponse:
        """``?limit=&reason=&outbound=``: the oldest dead letters, those whose reason contains ``reason``
        (case-insensitive) and whose outbound is ``outbound`` when given."""
        limit = _limit(request.query.get("limit", "100"))
        if limit is None:
            return error_response(400, "invalid", "limit must be an integer")
        reason, outbound = request.query.get("reason", ""), request.query.get("outbound", "")
        return await self._read(request, lambda: self._letters(limit, reason, outbound))

    async def _letters(self, limit: int, reason: str, outbound: str) -> dict[str, object]:
        return {"dead_letters": await self.filtered_letters(limit, reason, outbound)}

    async def filtered_letters(self, limit: int, reason: str = "", outbound: str = "") -> list[dict[str, object]]:
        letters = await self.admin.dead_letters(10_000 if reason or outbound else limit)
        needle = reason.lower()
        chosen = [
            dl
            for dl in letters
            if (not needle or needle in str(dl.get("reason", "")).lower() or needle == dl.get("class"))
            and (not outbound or dl.get("outbound") == outbound)
        ]
        return chosen[:limit]

    async def dead_letter(self, request: web.BaseRequest) -> web.StreamResponse:
        caller = await self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        found = await self.admin.dead_letter(path_id(request))
        if found is None:
            return error_response(404, "not_found", f"no dead letter with id {path_id(request)}")
        return with_security(web.json_response(found))

    async def replay(self, request: web.BaseRequest) -> web.StreamResponse:
        """``{"ids": [...]}`` replays those, ``{}`` every dead letter."""
        got = await self._json_action(request)
        if isinstance(got, web.Response):
            return got
        caller, body = got
        try:
            raw = body.get("ids") if isinstance(body, dict) else None
            ids = [int(i) for i in raw] if raw is not None else None
        except (ValueError, TypeError):
            return error_response(400, "invalid", 'body must be {"ids": [integers]} or {}')
        replayed = await self.admin.replay(ids, caller.who)
        if ids and not replayed:
            return error_response(404, "not_found", "no replayable dead letter with id " + ", ".join(map(str, ids)))
        return web.json_response({"replayed": replayed})

    async def delete(self, request: web.BaseRequest) -> web.StreamResponse:
        got = await self._json_action(request)
        if isinstance(got, web.Response):
            return got
        caller, body = got
        try:
            ids = [int(i) for i in body["ids"]] if isinstance(body, dict) else None
        except (KeyError, ValueError, TypeError):
            ids = None
        if not ids:
            return error_response(400, "invalid", 'body must be {"ids": [integers]}')
        return web.json_response({"deleted": await self.admin.delete(ids, caller.who)})

    async def edit_replay(self, request: web.BaseRequest) -> web.StreamResponse:
        """``{"data": "text"}`` or ``{"data_base64": "..."}`` and/or ``{"attributes": {"name": "value"}}``
        (an empty value removes the attribute): the dead letter is changed, then replayed."""
        got = await self._json_action(request)
        if isinstance(got, web.Response):
            return got
        caller, body = got
        parsed = parse_edit(body)
        if isinstance(parsed, str):
            return error_response(400, "invalid", parsed)
        data, attributes = parsed
        return await self.do_edit_replay(path_id(request), data, attributes, caller)

    async def do_edit_replay(
        self, id: int, data: bytes | None, attributes: Mapping[str, str] | None, caller: Caller
    ) -> web.Response:
        try:
            replayed = await self.admin.edit_replay(id, data, attributes, caller.who)
        except ValueError as exc:
            return error_response(400, "invalid", str(exc))
        if not replayed:
            return error_response(404, "not_found", f"no replayable dead letter with id {id}")
        return web.json_response({"replayed": replayed})

    # ------------------------------------------------------------------ the live tail
    async def tail(self, request: web.BaseRequest) -> web.StreamResponse:
        """Server-Sent Events: one ``event: passed`` per event from now on that ``?type=&source=&route=&when=``
        matches (globs, a route name, CEL as in a route's ``when``), as JSON; its data only for a caller with
        one of ``[security] payload_roles``. 400 for a CEL expression that does not compile, 503 when
        ``MAX_WATCHERS`` tails are open. Ends when the client goes away or the daemon drains."""
        caller = await self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        q = request.query
        wanted = TailFilter(q.get("type", ""), q.get("source", ""), q.get("route", ""), q.get("when", ""))
        try:
            watcher = self.admin.tail(wanted)
        except ValueError as exc:
            return error_response(400, "invalid", f"when: {exc}")
        except TooManyWatchers as exc:
            return error_response(503, "not_ready", str(exc), {"Retry-After": "5"})
        with_data = bool(caller.roles & self.admin.payload_roles)
        from mediator.admin import passed_view  # the JSON shape of a passed event, beside the other views

        resp = self.event_stream()
        self.streaming()
        try:
            await resp.prepare(request)
            await resp.write(f"event: ready\ndata: {json.dumps({'payloads': with_data})}\n\n".encode())
            idle = 0.0
            while not self.health.draining:
                batch = await watcher.next(STREAM_POLL_S)
                if not batch:
                    idle += STREAM_POLL_S
                    if idle >= TAIL_HEARTBEAT_S:
                        await resp.write(b": heartbeat\n\n")
                        idle = 0.0
                    continue
                idle = 0.0
                docs = (json.dumps(passed_view(p, with_data), ensure_ascii=False) for p in batch)
                await resp.write("".join(f"event: passed\ndata: {doc}\n\n" for doc in docs).encode())
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self.admin.untail(watcher)
        return resp

    @staticmethod
    def event_stream() -> web.StreamResponse:
        """An SSE answer, not yet prepared."""
        resp = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/event-stream", "X-Accel-Buffering": "no"})
        return with_security(resp)


def path_id(request: web.BaseRequest) -> int:
    """The dead letter id of ``.../dead-letters/{id}[/replay]`` (the listener dispatches without match info;
    the route's pattern admitted digits only)."""
    parts = request.rel_url.path.rstrip("/").split("/")
    return int(parts[-2] if parts[-1] == "replay" else parts[-1])


def _limit(text: str) -> int | None:
    try:
        return max(1, min(int(text), 10_000))
    except ValueError:
        return None


def parse_edit(body: object) -> tuple[bytes | None, dict[str, str] | None] | str:
    """(data, attributes) of an edit-and-replay body, or what is wrong with it."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    data: bytes | None = None
    if isinstance(body.get("data"), str):
        data = body["data"].encode("utf-8")
    elif isinstance(body.get("data_base64"), str):
        try:
            data = base64.b64decode(body["data_base64"], validate=True)
        except ValueError:
            return "data_base64 is not base64"
    elif body.get("data") is not None:
        return "data must be a string (or send data_base64)"
    raw = body.get("attributes")
    if raw is not None and (not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values())):
        return "attributes must be an object of strings"
    return data, (dict(raw) if raw is not None else None)


def csrf_token(request: web.BaseRequest) -> tuple[str, bool]:
    """The request's CSRF token, and whether it is new (then ``set_csrf`` it on the answer)."""
    token = request.cookies.get(CSRF_COOKIE)
    return (token, False) if token else (secrets.token_urlsafe(32), True)


def set_csrf(resp: web.StreamResponse, token: str, secure: bool) -> None:
    resp.set_cookie(CSRF_COOKIE, token, path="/admin", httponly=True, samesite="Strict", secure=secure)
