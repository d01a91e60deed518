"""The web view in a real headless Chromium: a person's path through a sweep, a live page
that refreshes itself, and the login / hostile-data / CSP guarantees as a browser enforces
them. Screenshots are saved as artifacts (see ``conftest.screenshots``)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ui_helpers as ui
from ui_helpers import Api

pytestmark = pytest.mark.browser

#: Generous bound for what the page must show (a busy 2-core machine).
SHOWN = 20_000


@pytest.fixture(scope="module")
def sweep_server(module_server_factory: Any) -> Iterator[tuple[Any, ui.Sweep]]:
    server = module_server_factory(
        heartbeat_timeout=ui.HEARTBEAT_TIMEOUT, extra_args=ui.SERVER_ARGS
    )
    with Api(server.url) as api:
        sweep = ui.seed_sweep(api, f"browser-{secrets.token_hex(4)}", name="lr sweep (browser)")
        with ui.beating(api, sweep.runs, sweep.leases):
            yield server, sweep
    server.stop()


def watch(page: Any) -> dict[str, list[str]]:
    """Collect what must stay empty: dialogs (an executed ``alert``) and page errors."""
    seen: dict[str, list[str]] = {"dialogs": [], "errors": []}

    def on_dialog(dialog: Any) -> None:
        seen["dialogs"].append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
    return seen


def test_a_sweep_from_the_front_page_to_a_crashed_runs_asset(
    sweep_server: Any, context: Any, screenshots: Path
) -> None:
    from playwright.sync_api import expect

    server, sweep = sweep_server
    page = context.new_page()
    seen = watch(page)
    response = page.goto(f"{server.url}/")
    assert response is not None and page.url == f"{server.url}/ui"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    row = page.locator(f'tr[data-experiment="{sweep.experiment_id}"]')
    expect(row).to_contain_text("lr sweep (browser)")
    expect(row.locator('[data-state="lost"]')).to_have_text("lost 1")
    page.screenshot(path=screenshots / "experiments.png", full_page=True)

    row.get_by_role("link", name="lr sweep (browser)").click()
    page.wait_for_url(f"**/ui/experiments/{sweep.experiment_id}")
    expected = {
        "succeeded": "succeeded",
        "crashed": "failed_crash",
        "abandoned": "failed_abandoned",
        "lost": "lost",
        "stalled": "running",
        "live": "running",
        "pending": "pending",
    }
    for role, state in expected.items():
        cell = page.locator(f'a[data-run="{sweep.runs[role]}"]')
        expect(cell).to_have_attribute("data-state", state, timeout=SHOWN)
    stalled = page.locator(f'a[data-run="{sweep.runs["stalled"]}"]')
    expect(stalled).to_have_attribute("data-stalled", "true")
    expect(stalled.locator(".flag")).to_have_text("stalled")
    page.screenshot(path=screenshots / "experiment.png", full_page=True)

    page.locator(f'a[data-run="{sweep.runs["crashed"]}"]').click()
    page.wait_for_url(f"**/ui/runs/{sweep.runs['crashed']}")
    message = page.locator("pre.message")
    expect(message).to_be_visible()
    assert message.text_content() == ui.CRASH_MESSAGE
    # the drawn spans are the event log's, and the browser really laid them out
    with Api(server.url) as api:
        events = api.events(sweep.runs["crashed"])
    drawn = page.eval_on_selector_all(
        "svg.timeline rect[data-state]",
        "els => els.map(e => [e.dataset.state, Number(e.dataset.start), e.getBBox().width])",
    )
    assert [(s, pytest.approx(a)) for s, a, _ in drawn] == ui.expected_spans(events)
    assert all(width > 0 for _, _, width in drawn)
    assert page.locator("svg.timeline rect[data-gap]").count() == 1
    marks = page.locator("svg.timeline circle[data-event]")
    assert marks.count() == len(events)
    page.screenshot(path=screenshots / "run-crashed.png", full_page=True)

    for name, data in sweep.assets.items():
        link = page.locator("tr[data-asset] a.download").nth(sorted(sweep.assets).index(name))
        with page.expect_download() as download:
            link.click()
        path = download.value.path()
        assert path is not None
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert digest == hashlib.sha256(data).hexdigest(), name
        shown = page.locator(f'code[data-sha256="{digest}"]')
        expect(shown).to_have_text(digest)
    assert seen == {"dialogs": [], "errors": []}


def test_a_live_page_refreshes_when_the_run_changes(
    server_factory: Any, context: Any, screenshots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import expect

    monkeypatch.setenv("CHRONICLE_UI_REFRESH", "1")
    server = server_factory()
    with Api(server.url) as api:
        eid = api.experiment("live sweep", [{"lr": 0.1}], f"live-{secrets.token_hex(4)}")
        key = api.new_run(eid, 0)
        lease = api.start(key)
        api.beat(key, lease, {"step": 1})
        run_page = context.new_page()
        run_page.goto(f"{server.url}/ui/runs/{key}")
        grid_page = context.new_page()
        grid_page.goto(f"{server.url}/ui/experiments/{eid}")
        chip = run_page.locator("h1 .chip[data-state]")
        expect(chip).to_have_text("running")
        assert run_page.locator("body").get_attribute("data-refresh") == "1"
        # a marker that a reload would wipe: the refresh swaps the content, in place
        run_page.evaluate("() => { window.__notReloaded = true; }")
        api.beat(key, lease, {"step": 2})
        expect(run_page.locator('[data-field="progress"]')).to_contain_text("step=2", timeout=SHOWN)
        api.ok("POST", f"/v1/runs/{key}/succeed", json={"lease": lease})
        expect(chip).to_have_text("succeeded", timeout=SHOWN)
        expect(grid_page.locator(f'a[data-run="{key}"]')).to_have_attribute(
            "data-state", "succeeded", timeout=SHOWN
        )
        assert run_page.evaluate("() => window.__notReloaded") is True
        # terminal: the page stops refreshing
        expect(run_page.locator("body")).not_to_have_attribute("data-refresh", "1")
        run_page.screenshot(path=screenshots / "run-live-succeeded.png", full_page=True)


def test_login_hostile_data_and_csp_in_the_browser(
    server_factory: Any, context: Any, browser: Any, screenshots: Path
) -> None:
    from playwright.sync_api import expect

    key = "k-" + secrets.token_hex(12)
    server = server_factory(api_key=key)
    with Api(server.url, key) as api:
        eid = api.experiment(ui.HOSTILE, [{"note": ui.HOSTILE}], f"hostile-{secrets.token_hex(4)}")
        run = api.new_run(eid, 0)
        lease = api.start(run)
        api.upload(run, lease, ui.HOSTILE_ASSET, b"payload")
        api.ok(
            "POST",
            f"/v1/runs/{run}/fail",
            json={"reason": "crash", "message": ui.HOSTILE, "lease": lease},
        )
    page = context.new_page()
    seen = watch(page)
    page.goto(f"{server.url}/ui/runs/{run}")
    assert "/ui/login" in page.url  # no page without the key
    page.fill("#key", "wrong")
    page.click("form.login button")
    expect(page.locator(".alert")).to_contain_text("not this server's key")
    page.fill("#key", key)
    page.click("form.login button")
    page.wait_for_url(f"**/ui/runs/{run}")
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: no script reads it
    assert page.locator("pre.message").text_content() == ui.HOSTILE
    assert (
        page.locator('[data-field="config"]')
        .text_content()
        .count('<script>alert(\\"pwned\\")</script>')
        == 1
    )
    expect(page.locator("tr[data-asset] td code").first).to_have_text(ui.HOSTILE_ASSET)
    assert page.locator("img").count() == 0
    # the CSP really holds: an injected inline script does not run
    ran = page.evaluate(
        """() => { const s = document.createElement('script');
                   s.textContent = 'window.__inline = 1'; document.body.appendChild(s);
                   return window.__inline === 1; }"""
    )
    assert ran is False
    page.screenshot(path=screenshots / "run-hostile.png", full_page=True)
    # the asset with the session downloads; another browser without it gets nothing
    with page.expect_download() as download:
        page.locator("a.download").click()
    assert Path(str(download.value.path())).read_bytes() == b"payload"
    stranger = browser.new_context()
    try:
        href = page.locator("a.download").get_attribute("href")
        assert stranger.request.get(f"{server.url}{href}").status == 401
        resp = stranger.request.get(f"{server.url}/ui/experiments/{eid}", max_redirects=0)
        assert resp.status == 303 and ui.HOSTILE not in resp.text()
    finally:
        stranger.close()
    home = page.goto(f"{server.url}/ui")
    assert home is not None and "content-security-policy" in home.headers
    expect(page.locator(f'tr[data-experiment="{eid}"] a').first).to_have_text(ui.HOSTILE)
    assert seen == {"dialogs": [], "errors": []}
