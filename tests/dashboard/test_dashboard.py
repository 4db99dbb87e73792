"""The operator's dashboard in a real browser (Debian's Chromium through Playwright) against one real daemon:
the quickstart config on a listener that authenticates with API keys, an admin key (roles admin and
payloads) and a publisher key without the admin role. The refusal matrix and the CSP header are checked
with aiohttp (fast); what a person sees is checked in the browser, and each page is screenshotted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.browser import chromium, screenshot_path
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

ADMIN_KEY = "mk_dash-admin-" + "a" * 30
VIEWER_KEY = "mk_dash-viewer-" + "b" * 30
ORDER = "com.example.order.created"


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = f"""
[[keys]]
principal = "ops-alice"
sha256 = "{_sha(ADMIN_KEY)}"
roles = ["admin", "payloads"]

[[keys]]
principal = "viewer-bob"
sha256 = "{_sha(VIEWER_KEY)}"
roles = ["publisher"]
"""
SECURITY = """
[auth.keys]
kind = "api_key"
keys_file = "api-keys.toml"

[security]
payload_roles = ["payloads"]
"""


class Dash:
    def __init__(self, qs: Quickstart, proc: DaemonProcess, browser: Browser) -> None:
        self.qs = qs
        self.proc = proc
        self.browser = browser
        self.base = f"http://127.0.0.1:{qs.http_port}"

    async def post_order(self, http: aiohttp.ClientSession, order: int) -> str:
        headers = {"X-API-Key": ADMIN_KEY}
        async with http.post(f"{self.base}/orders", json={"order": order}, headers=headers) as resp:
            assert resp.status == 202, await resp.text()
            event_id: str = (await resp.json())["id"]
            return event_id

    async def context(self, key: str = ADMIN_KEY) -> BrowserContext:
        """A browser context (a fresh profile) logged in through the login form with ``key``."""
        ctx = await self.browser.new_context(viewport={"width": 1280, "height": 900})
        page = await ctx.new_page()
        await page.goto(f"{self.base}/admin/")
        await expect(page.locator("h1")).to_have_text("Admin credential required")
        await page.fill("input[name=credential]", key)
        async with page.expect_navigation():
            await page.click("button[type=submit]")
        await expect(page.locator("header .who span")).to_have_text("ops-alice")
        await page.close()
        return ctx


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dash(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[Dash]:
    tmp = tmp_path_factory.mktemp("dashboard")
    (tmp / "api-keys.toml").write_text(KEYS)
    qs = Quickstart(tmp, extra_toml=SECURITY, overrides={"listeners.http": {"auth": ["keys"]}})
    proc = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
    await proc.start()
    try:
        async with chromium() as browser:
            yield Dash(qs, proc, browser)
    finally:
        code = await proc.stop()
        assert code == 0, proc.logs()


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(screenshot_path(name)), full_page=True)


# ---------------------------------------------------------------- refusals (aiohttp: fast)

GUARDED_GETS = [
    "/admin/", "/admin/ui/routes", "/admin/ui/tail", "/admin/ui/dead-letters", "/admin/ui/dead-letters/1",
    "/admin/status", "/admin/dead-letters", "/admin/dead-letters/1", "/admin/audit", "/admin/routes",
    "/admin/rates", "/admin/tail",
]  # fmt: skip
FORM_POSTS = ["/admin/ui/dead-letters/replay", "/admin/ui/dead-letters/delete", "/admin/ui/dead-letters/1/replay"]
JSON_POSTS = ["/admin/dead-letters/replay", "/admin/dead-letters/delete", "/admin/dead-letters/1/replay"]


async def test_every_guarded_action_refuses_and_every_page_has_a_csp(dash: Dash) -> None:
    async with aiohttp.ClientSession() as http:
        for path in GUARDED_GETS:
            async with http.get(dash.base + path) as resp:
                assert resp.status == 401, path
            async with http.get(dash.base + path, headers={"X-API-Key": VIEWER_KEY}) as resp:
                assert resp.status == 403, path
        for path in FORM_POSTS + JSON_POSTS:
            async with http.post(dash.base + path, json={"ids": [1]}) as resp:
                assert resp.status == 401, path
            async with http.post(dash.base + path, json={"ids": [1]}, headers={"X-API-Key": VIEWER_KEY}) as resp:
                assert resp.status == 403, path
    # The admin's browser session (the cookie) without the CSRF token: 403 for every form and JSON POST.
    async with aiohttp.ClientSession(cookies={"mediator_admin": ADMIN_KEY, "mediator_csrf": "t0ken"}) as http:
        for path in FORM_POSTS:
            async with http.post(dash.base + path, data={"ids": "1"}) as resp:
                assert resp.status == 403, path
                assert "CSRF" in await resp.text()
            async with http.post(dash.base + path, data={"ids": "1", "csrf": "wrong"}) as resp:
                assert resp.status == 403, path
        for path in JSON_POSTS:
            async with http.post(dash.base + path, json={"ids": [1]}) as resp:
                assert resp.status == 403, path
        # A form a page of another site could send is never a JSON action, whoever sends it.
        async with http.post(dash.base + JSON_POSTS[0], data="{}", headers={"X-API-Key": ADMIN_KEY}) as resp:
            assert resp.status == 415
        for path in ["/admin/", "/admin/ui/routes", "/admin/ui/tail", "/admin/ui/dead-letters", "/admin/ui/history"]:
            async with http.get(dash.base + path) as resp:
                assert resp.status == 200, path
                csp = resp.headers["Content-Security-Policy"]
                for directive in (
                    "default-src 'none'",
                    "script-src 'self'",
                    "style-src 'self'",
                    "frame-ancestors 'none'",
                ):
                    assert directive in csp, (path, csp)
                assert "<script>" not in await resp.text()  # nothing inline: the CSP would block it
        async with http.get(dash.base + "/admin/status") as resp:
            assert resp.status == 200  # GETs take the session cookie
            assert "Content-Security-Policy" in resp.headers


# ---------------------------------------------------------------- in the browser


async def test_overview_shows_listeners_and_a_rate_that_moves(dash: Dash) -> None:
    ctx = await dash.context()
    page = await ctx.new_page()
    await page.goto(f"{dash.base}/admin/")
    listeners = page.locator("#listeners tbody tr")
    await expect(listeners).to_have_count(3)  # the shipped config's http, grpc and the schema registry's
    await expect(listeners.nth(0)).to_contain_text("http")
    await expect(listeners.nth(0)).to_contain_text("up")
    await expect(listeners.nth(1)).to_contain_text("grpc")
    await expect(listeners.nth(2)).to_contain_text("registry")
    await expect(page.locator("#brokers")).to_contain_text("rabbit")
    rate = page.locator('.rate[data-series="orders-http"]')
    accepted_before = int(await page.locator("#inbounds tr", has_text="orders-http").locator(".accepted").inner_text())
    async with aiohttp.ClientSession() as http:
        for i in range(20):
            await dash.post_order(http, i)
    # The page is live (SSE): no reload. The counter moves, then the sampled rate (every 2 s) does.
    await expect(page.locator("#inbounds tr", has_text="orders-http").locator(".accepted")).to_have_text(
        str(accepted_before + 20), timeout=10_000
    )
    await expect(rate).not_to_have_text("0.0", timeout=10_000)
    assert float(await rate.inner_text()) > 0
    assert await page.locator(".chart polyline").count() >= 2
    await shot(page, "overview")
    await page.goto(f"{dash.base}/admin/ui/routes")
    orders = page.locator("#routes tbody tr", has_text="orders-exchange")
    await expect(orders.first).to_contain_text("orders.created")
    assert int(await orders.first.locator(".routed").inner_text()) >= 20
    await expect(page.locator("#written")).to_contain_text('"outbound": "orders-exchange"')
    await shot(page, "routes")
    await ctx.close()


async def test_live_tail_filters_and_pauses(dash: Dash) -> None:
    ctx = await dash.context()
    page = await ctx.new_page()
    await page.goto(f"{dash.base}/admin/ui/tail")
    await page.fill("input[name=type]", ORDER)
    await page.fill("input[name=when]", "data.order >= 700")
    await page.click("#tail-filter button[type=submit]")
    await expect(page.locator("#tail-state")).to_have_text("streaming")
    rows = page.locator("#tail tbody tr")
    async with aiohttp.ClientSession() as http:
        skipped = await dash.post_order(http, 5)  # the CEL filter leaves it out
        shown = await dash.post_order(http, 701)
        await expect(page.locator(f'#tail tr[data-id="{shown}"]')).to_be_visible()
        await expect(rows).to_have_count(1)
        assert await page.locator(f'#tail tr[data-id="{skipped}"]').count() == 0
        row = page.locator(f'#tail tr[data-id="{shown}"]')
        await expect(row.locator(".type")).to_have_text(ORDER)
        await expect(row).to_contain_text("orders")
        await expect(row.locator(".data")).to_contain_text('"order": 701')  # ops-alice has a payload role
        await page.click("#pause")
        held = await dash.post_order(http, 702)
        await expect(page.locator("#tail-state")).to_have_text("paused (1 held)")
        assert await page.locator(f'#tail tr[data-id="{held}"]').count() == 0
        await page.click("#pause")
        await expect(page.locator(f'#tail tr[data-id="{held}"]')).to_be_visible()
    await shot(page, "live-tail")
    await ctx.close()


async def test_dead_letter_is_edited_replayed_and_arrives(dash: Dash) -> None:
    qs = dash.qs
    async with aiohttp.ClientSession() as http:
        # Nothing is bound to the orders exchange yet: RabbitMQ returns the mandatory publish.
        event_id = await dash.post_order(http, 4242)
    ctx = await dash.context()
    page = await ctx.new_page()
    await page.goto(f"{dash.base}/admin/ui/dead-letters?reason=unroutable&outbound=orders-exchange")
    row = page.locator(f'#letters tr[data-event="{event_id}"]')
    for _ in range(100):  # the first delivery attempt has to fail first
        if await row.count():
            break
        await asyncio.sleep(0.2)
        await page.reload()
    await expect(row).to_contain_text("unroutable")
    await shot(page, "dead-letters")
    await row.locator("a").click()
    await expect(page.locator("#event-id")).to_have_text(event_id)
    await expect(page.locator("#reason")).to_contain_text("unroutable")
    await expect(page.locator("#data")).to_have_value(json.dumps({"order": 4242}, indent=2))
    await page.fill("#data", json.dumps({"order": 4242, "fixed": True}))
    attributes = await page.locator("#attributes").input_value()
    await page.fill("#attributes", attributes + "\nsubject = fixed-by-ops")
    await shot(page, "dead-letter-edit")
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        channel = await conn.channel()
        queue = await bound_queue(channel, qs.orders_exchange, "orders.created")
        await page.click("#replay")
        await expect(page.locator("#notice")).to_contain_text("edited and replayed")
        msg = await get_one(queue)
    assert msg.message_id == event_id
    assert json.loads(msg.body) == {"order": 4242, "fixed": True}
    assert "fixed-by-ops" in {str(v) for v in (msg.headers or {}).values()}
    assert await page.locator(f'#letters tr[data-event="{event_id}"]').count() == 0
    audit = page.locator("#audit tbody tr")
    await expect(audit.nth(0).locator(".action")).to_have_text("replay")
    await expect(audit.nth(1).locator(".action")).to_have_text("edit")
    await expect(audit.nth(1).locator(".who")).to_have_text("ops-alice")
    await expect(audit.nth(1)).to_contain_text("subject")
    await shot(page, "audit-log")
    await ctx.close()
    # The CLI reads the same audit log through the same admin API.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "dead-letters", "audit", "--config", str(dash.proc.config),
        "--api-key-env", "DASH_ADMIN_KEY", stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "DASH_ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    edits = [e for e in json.loads(out)["audit"] if e["action"] == "edit" and e["detail"]["event_id"] == event_id]
    assert [e["who"] for e in edits] == ["ops-alice"]


async def test_without_the_admin_role_the_dashboard_refuses(dash: Dash) -> None:
    ctx = await dash.browser.new_context()
    page = await ctx.new_page()
    await page.goto(f"{dash.base}/admin/ui/login")
    await page.fill("input[name=credential]", VIEWER_KEY)
    await page.click("button[type=submit]")
    await expect(page.locator("#refusal")).to_contain_text("admin needs one of the roles admin")
    # With the viewer's key as the session anyway, every page and action is refused.
    await ctx.add_cookies([{"name": "mediator_admin", "value": VIEWER_KEY, "url": dash.base + "/admin"}])
    response = await page.goto(f"{dash.base}/admin/ui/dead-letters")
    assert response is not None
    assert response.status == 403
    await expect(page.locator("#refusal")).to_contain_text("admin needs one of the roles")
    await shot(page, "refused")
    await ctx.close()
