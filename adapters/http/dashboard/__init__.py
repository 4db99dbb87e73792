"""The operator's dashboard at ``/admin/``: server-rendered pages (Jinja2 templates shipped in this package),
live through Server-Sent Events, with no build step and nothing fetched from elsewhere.

Every page is drawn from the admin API's own calls (``AdminApi``, the ``Admin`` seam), the same ones the CLI's
JSON endpoints answer, so a page never reads the daemon another way. Forms change state with POST and the
CSRF token (double-submit cookie, ``adapters.http.admin``); a strict Content-Security-Policy goes with every
answer, so the only scripts that run are this package's ``static/*.js`` files. Every page reads without
JavaScript; the scripts add the live parts (the overview's refresh, the tail's stream and pause).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import hdrs, web

from adapters.http.admin import (
    CSRF_FIELD,
    SESSION_COOKIE,
    STREAM_POLL_S,
    AdminApi,
    Caller,
    csrf_token,
    parse_edit,
    path_id,
    set_csrf,
    with_security,
)
from mediator import __version__

OVERVIEW_EVERY_S = 2.0  # the overview's refresh over SSE (the rates are sampled as often: mediator/rates.py)
MAX_OVERVIEW_STREAMS = 16
CHART_W, CHART_H = 640, 140
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
PAGES = (("/admin/", "Overview"), ("/admin/ui/routes", "Routes"), ("/admin/ui/tail", "Live tail"),
         ("/admin/ui/dead-letters", "Dead letters"), ("/admin/ui/history", "History and schemas"))  # fmt: skip


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("adapters.http.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        enable_async=False,
    )
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, sort_keys=True)
    env.filters["counts"] = lambda v: ", ".join(f"{k} {n}" for k, n in v.items()) if v else "0"
    return env


def chart(rates: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The SVG polylines of the series whose key starts with ``prefix`` (inbound: or outbound:), scaled to
    the busiest, drawn server-side (no script needed to see it), and each series' latest rate."""
    series = {k.removeprefix(prefix): v for k, v in rates.get("series", {}).items() if k.startswith(prefix)}
    top = max((max(v, default=0.0) for v in series.values()), default=0.0) or 1.0
    lines = []
    for i, (name, values) in enumerate(sorted(series.items())):
        n = len(values)
        step = CHART_W / max(1, n - 1)
        points = " ".join(f"{j * step:.1f},{CHART_H - (v / top) * (CHART_H - 4):.1f}" for j, v in enumerate(values))
        lines.append({"name": name, "points": points, "now": values[-1] if values else 0.0, "colour": i % 8})
    return {"lines": lines, "top": top, "width": CHART_W, "height": CHART_H, "span_s": _span(rates)}


def _span(rates: Mapping[str, Any]) -> int:
    times = rates.get("times") or []
    return int(times[-1] - times[0]) if len(times) > 1 else 0


class Dashboard:
    def __init__(self, api: AdminApi) -> None:
        self.api = api
        self.admin = api.admin
        self.env = _env()
        self.overview_streams = 0

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/", self.overview)
        router.add_get("/admin/ui/overview/stream", self.overview_stream)
        router.add_get("/admin/ui/routes", self.routes)
        router.add_get("/admin/ui/tail", self.tail)
        router.add_get("/admin/ui/dead-letters", self.letters)
        router.add_get(r"/admin/ui/dead-letters/{id:\d+}", self.letter)
        router.add_post(r"/admin/ui/dead-letters/{id:\d+}/replay", self.edit_replay)
        router.add_post("/admin/ui/dead-letters/replay", self.replay)
        router.add_post("/admin/ui/dead-letters/delete", self.delete)
        router.add_get("/admin/ui/history", self.history)
        router.add_get("/admin/ui/login", self.login_page)
        router.add_post("/admin/ui/login", self.login)
        router.add_post("/admin/ui/logout", self.logout)
        router.add_get("/admin/ui/static/{name}", self.static)

    # ------------------------------------------------------------------ rendering
    def _page(
        self, request: web.BaseRequest, template: str, status: int = 200, caller: Caller | None = None, **ctx: Any
    ) -> web.Response:
        token, new = csrf_token(request)
        html = self.env.get_template(template).render(
            pages=PAGES, path=request.path, csrf=token, csrf_field=CSRF_FIELD, version=__version__,
            caller=caller, **ctx,
        )  # fmt: skip
        resp = web.Response(status=status, text=html, content_type="text/html", charset="utf-8")
        if new:
            set_csrf(resp, token, self.api.secure)
        with_security(resp)
        return resp

    async def _who(self, request: web.BaseRequest) -> Caller | web.Response:
        """The caller, or the refusal as a page: the login form for 401, the reason for 403."""
        caller = await self.api.caller(request)
        if isinstance(caller, Caller):
            return caller
        if caller.status == 401:
            return self._page(request, "login.html", status=401, reason=_reason(caller), next=request.path_qs)
        return self._page(request, "refused.html", status=caller.status, reason=_reason(caller))

    async def _acting(self, request: web.BaseRequest) -> tuple[Caller, Mapping[str, str]] | web.Response:
        """A form's caller and fields, after the CSRF check; or the refusal."""
        caller = await self._who(request)
        if isinstance(caller, web.Response):
            return caller
        form = await request.post()
        fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        if not self.api.csrf_ok(request, fields.get(CSRF_FIELD)):
            return self._page(request, "refused.html", status=403, reason="missing or wrong CSRF token")
        ids = [str(v) for v in form.getall("ids", []) if isinstance(v, str)]
        return caller, {**fields, "ids": ",".join(ids)}

    # ------------------------------------------------------------------ pages
    async def _overview_ctx(self) -> dict[str, Any]:
        status, rates = await asyncio.gather(self.admin.status(), self.admin.rates())
        return {
            "s": status,
            "inbound_chart": chart(rates, "inbound:"),
            "outbound_chart": chart(rates, "outbound:"),
            "now": time.strftime("%H:%M:%S"),
        }

    async def overview(self, request: web.BaseRequest) -> web.StreamResponse:
        caller = await self._who(request)
        if isinstance(caller, web.Response):
            return caller
        return self._page(request, "overview.html", caller=caller, **await self._overview_ctx())

    async def overview_stream(self, request: web.BaseRequest) -> web.StreamResponse:
        """The overview's body again every ``OVERVIEW_EVERY_S`` as one SSE ``overview`` event (HTML the
        page's script puts in place), until the browser goes away or the daemon drains."""
        caller = await self.api.caller(request)
        if isinstance(caller, web.Response):
            return caller
        if self.overview_streams >= MAX_OVERVIEW_STREAMS:
            return web.Response(status=503, text="too many dashboards open", headers={"Retry-After": "5"})
        self.overview_streams += 1
        resp = self.api.event_stream()
        self.api.streaming()
        fragment = self.env.get_template("_overview.html")
        try:
            await resp.prepare(request)
            while not self.api.health.draining:
                html = fragment.render(**await self._overview_ctx())
                data = "".join(f"data: {line}\n" for line in html.splitlines())
                await resp.write(f"event: overview\n{data}\n".encode())
                for _ in range(int(OVERVIEW_EVERY_S / STREAM_POLL_S)):
                    if self.api.health.draining:
                        break
                    await asyncio.sleep(STREAM_POLL_S)
        except ConnectionResetError:
            pass
        finally:
            self.overview_streams -= 1
        return resp

    async def routes(self, request: web.BaseRequest) -> web.StreamResponse:
        caller = await self._who(request)
        if isinstance(caller, web.Response):
            return caller
        table = await self.admin.routes()
        return self._page(request, "routes.html", caller=caller, table=table)

    async def tail(self, request: web.BaseRequest) -> web.StreamResponse:
        caller = await self._who(request)
        if isinstance(caller, web.Response):
            return caller
        q = request.query
        wanted = {k: q.get(k, "") for k in ("type", "source", "route", "when")}
        stream = "/admin/tail?" + urlencode({k: v for k, v in wanted.items() if v})
        payloads = bool(caller.roles & self.admin.payload_roles)
        names = [str(r.get("name")) for r in _rows(await self.admin.status(), "routes")]
        return self._page(
            request, "tail.html", caller=caller, wanted=wanted, stream=stream, payloads=payloads, routes=names
        )

    async def letters(self, request: web.BaseRequest) -> web.StreamResponse:
        caller = await self._who(request)
        if isinstance(caller, web.Response):
            return caller
        reason, outbound = request.query.get("reason", ""), request.query.get("outbound", "")
        letters, audit, status = await asyncio.gather(
            self.api.filtered_letters(500, reason, outbound), self.admin.audit(50), self.admin.status()
        )
        outbounds = [str(o.get("name")) for o in _rows(status, "outbounds")]
        return self._page(
            request, "letters.html", caller=caller, letters=letters, audit=audit, reason=reason,
            outbound=outbound, outbounds=outbounds, notice=request.query.get("notice", ""),
        )  # fmt: skip

    async def letter(self, request: web.BaseRequest) -> web.StreamResponse:
        caller = await self._who(request)
        if isinstance(caller, web.Response):
            return caller
        found = await self.admin.dead_letter(path_id(request))
        if found is None:
            return self._page(request, "refused.html", status=404, caller=caller, reason="no such dead letter")
        return self._page(request, "letter.html", caller=caller, dl=found)

    async def history(self, request: web.BaseRequest) -> web.StreamResponse:
        caller = await self._who(request)
        if isinstance(caller, web.Response):
            return caller
        return self._page(request, "history.html", caller=caller)

    # ------------------------------------------------------------------ actions (POST + CSRF)
    async def edit_replay(self, request: web.BaseRequest) -> web.StreamResponse:
        got = await self._acting(request)
        if isinstance(got, web.Response):
            return got
        caller, form = got
        body: dict[str, object] = {}
        if "data" in form and form.get("data") != form.get("original_data"):
            body["data"] = form["data"].replace("\r\n", "\n")  # a textarea sends CRLF line ends
        attributes = _attribute_lines(form.get("attributes", ""), form.get("original_attributes", ""))
        if isinstance(attributes, str):
            return self._page(request, "refused.html", status=400, caller=caller, reason=attributes)
        if attributes:
            body["attributes"] = attributes
        parsed = parse_edit(body)
        if isinstance(parsed, str):
            return self._page(request, "refused.html", status=400, caller=caller, reason=parsed)
        answer = await self.api.do_edit_replay(path_id(request), *parsed, caller)
        if answer.status != 200:
            return self._page(request, "refused.html", status=answer.status, caller=caller, reason=_reason(answer))
        notice = f"dead letter {path_id(request)} edited and replayed"
        return _see_other("/admin/ui/dead-letters?" + urlencode({"notice": notice}))

    async def replay(self, request: web.BaseRequest) -> web.StreamResponse:
        got = await self._acting(request)
        if isinstance(got, web.Response):
            return got
        caller, form = got
        ids = _ids(form)
        if ids is None and form.get("all") != "yes":
            return _see_other("/admin/ui/dead-letters?" + urlencode({"notice": "choose dead letters to replay"}))
        count = await self.admin.replay(ids, caller.who)
        return _see_other("/admin/ui/dead-letters?" + urlencode({"notice": f"{count} replayed"}))

    async def delete(self, request: web.BaseRequest) -> web.StreamResponse:
        got = await self._acting(request)
        if isinstance(got, web.Response):
            return got
        caller, form = got
        ids = _ids(form)
        if not ids:
            return _see_other("/admin/ui/dead-letters?" + urlencode({"notice": "choose dead letters to delete"}))
        count = await self.admin.delete(ids, caller.who)
        return _see_other("/admin/ui/dead-letters?" + urlencode({"notice": f"{count} deleted"}))

    # ------------------------------------------------------------------ session
    async def login_page(self, request: web.BaseRequest) -> web.StreamResponse:
        return self._page(request, "login.html", reason="", next=request.query.get("next", "/admin/"))

    async def login(self, request: web.BaseRequest) -> web.StreamResponse:
        """Checks the credential (the admin token, or a bearer credential of a principal with an admin role)
        as an ``Authorization`` header would be, then keeps it in an HttpOnly, SameSite=Strict cookie."""
        form = await request.post()
        if not self.api.csrf_ok(request, str(form.get(CSRF_FIELD, ""))):
            return self._page(request, "refused.html", status=403, reason="missing or wrong CSRF token")
        credential = str(form.get("credential", "")).strip()
        found = await self.api.caller(request, credential)
        if not credential or isinstance(found, web.Response):
            status = found.status if isinstance(found, web.Response) else 401
            reason = _reason(found) if isinstance(found, web.Response) else "enter a credential"
            return self._page(request, "login.html", status=status, reason=reason, next="/admin/")
        target = str(form.get("next", "/admin/"))
        resp = _see_other(target if target.startswith("/admin/") else "/admin/")
        resp.set_cookie(SESSION_COOKIE, credential, path="/admin", httponly=True, samesite="Strict",
                        secure=self.api.secure)  # fmt: skip
        return resp

    async def logout(self, request: web.BaseRequest) -> web.StreamResponse:
        form = await request.post()
        if not self.api.csrf_ok(request, str(form.get(CSRF_FIELD, ""))):
            return self._page(request, "refused.html", status=403, reason="missing or wrong CSRF token")
        resp = _see_other("/admin/ui/login")
        resp.del_cookie(SESSION_COOKIE, path="/admin")
        return resp

    async def static(self, request: web.BaseRequest) -> web.StreamResponse:
        name = request.rel_url.path.rsplit("/", 1)[-1]
        kind = STATIC.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        body = files("adapters.http.dashboard").joinpath("static", name).read_bytes()
        resp = web.Response(body=body, content_type=kind, headers={"Cache-Control": "max-age=300"})
        resp.headers["Content-Security-Policy"] = "default-src 'none'"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp


def _rows(doc: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    rows = doc.get(key)
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []


def _reason(resp: web.Response) -> str:
    try:
        return str(json.loads(resp.text or "{}").get("reason", resp.reason))
    except ValueError:
        return resp.reason


def _see_other(location: str) -> web.Response:
    return with_security(web.Response(status=303, headers={hdrs.LOCATION: location}))  # type: ignore[return-value]


def _ids(form: Mapping[str, str]) -> list[int] | None:
    try:
        ids = [int(i) for i in form.get("ids", "").split(",") if i.strip()]
    except ValueError:
        return None
    return ids or None


def _attribute_lines(text: str, original: str) -> dict[str, str] | str:
    """The attribute edits of the form's ``name = value`` lines: changed or new values, and "" for a line
    the operator removed; or what is wrong with a line."""

    def parse(block: str) -> dict[str, str] | str:
        out: dict[str, str] = {}
        for n, line in enumerate(block.splitlines(), 1):
            if not line.strip():
                continue
            name, sep, value = line.partition("=")
            if not sep or not name.strip():
                return f"attributes line {n}: write name = value"
            out[name.strip()] = value.strip()
        return out

    new, old = parse(text), parse(original)
    if isinstance(new, str):
        return new
    if isinstance(old, str):
        old = {}
    changes = {k: v for k, v in new.items() if old.get(k) != v}
    changes.update({k: "" for k in old if k not in new and k not in ("id", "specversion")})
    return changes


__all__: Sequence[str] = ("Dashboard",)
