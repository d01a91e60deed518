"""Fixtures of the web view tests: a real headless Chromium (Debian's, through Playwright's
Python package: a browser download is impossible here) and where screenshots go.

The browser and Playwright's driver are children of the test process; the fixture closes
them and then checks that none of their process tree is left (killing and failing if so).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

#: Debian's Chromium (installed by scripts/services.sh).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Where the browser tests save their screenshots (default: the session's pytest tmp dir).
SCREENSHOTS_ENV = "CHRONICLE_UI_SCREENSHOTS"


def _browser_tree() -> list[psutil.Process]:
    """Our descendants that belong to the browser or Playwright's driver."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            text = " ".join(child.cmdline()) + " " + child.name()
            if any(word in text for word in ("chrom", "playwright", "node")):
                found.append(child)
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module (each test opens its own context). Not for the
    session: Playwright's sync API keeps an event loop running in the main thread while it
    is started, which would break later tests that call ``asyncio.run``."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail(f"{CHROMIUM} is missing: run scripts/services.sh (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    before = {p.pid for p in _browser_tree()}
    manager = sync_playwright().start()
    try:
        chromium = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        manager.stop()
    left = [p for p in _browser_tree() if p.pid not in before]
    _, alive = psutil.wait_procs(left, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not alive, f"browser processes outlived the session: {[p.pid for p in alive]}"


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies), UTC and en-US, for one test."""
    ctx = browser.new_context(
        locale="en-US",
        timezone_id="UTC",
        viewport={"width": 1280, "height": 900},
        accept_downloads=True,
    )
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The screenshot directory: ``$CHRONICLE_UI_SCREENSHOTS``, else one in pytest's tmp."""
    named = os.environ.get(SCREENSHOTS_ENV)
    path = Path(named) if named else tmp_path_factory.mktemp("ui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
