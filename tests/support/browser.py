"""Debian's Chromium driven by Playwright's async API (the suite's loop is asyncio's: pytest-playwright's sync
fixtures would run a loop of their own). Playwright's own browser build is never downloaded: ``make test``
installs /usr/bin/chromium where it is missing (scripts/services.sh)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from tests.support.daemon import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "test-results" / "dashboard"
"""Where the browser tests leave their screenshots for a person to look at (not committed)."""


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """One headless Chromium; every context it opens starts from a fresh profile (Playwright gives each
    launch a new temporary user-data-dir)."""
    if not CHROMIUM.exists():  # noqa: ASYNC240 (one stat, before anything runs)
        pytest.fail(f"{CHROMIUM} is missing; `make test` installs it (scripts/services.sh: apt-get install chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{re.sub(r'[^a-z0-9-]+', '-', name.lower())}.png"
