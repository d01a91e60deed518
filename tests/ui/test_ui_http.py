"""The web view over plain HTTP (no browser), against real server subprocesses: the states
shown are the API's, the timeline is the event log's, hostile data stays text, every page has
the CSP, pagination walks every run once, and a server with a key shows nothing without it."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import testkit
import ui_helpers as ui
from ui_helpers import Api, Elements

REPO = Path(__file__).resolve().parents[2]
UI_PACKAGE = REPO / "chronicle_integrations" / "server" / "ui"


@pytest.fixture(scope="module")
def sweep_server(module_server_factory: Any) -> Iterator[tuple[Any, ui.Sweep]]:
    """A keyless server with the seeded sweep (its stalled and live runs kept beating)."""
    server = module_server_factory(
        heartbeat_timeout=ui.HEARTBEAT_TIMEOUT, extra_args=ui.SERVER_ARGS
    )
    with Api(server.url) as api:
        sweep = ui.seed_sweep(api, f"sweep-{secrets.token_hex(4)}", name=ui.HOSTILE)
        with ui.beating(api, sweep.runs, sweep.leases):
            yield server, sweep
    server.stop()


def get(server: Any, path: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("allow_redirects", False)
    return requests.get(server.url + path, timeout=30, **kwargs)


def test_front_door_redirects_to_the_view(sweep_server: Any) -> None:
    server, _ = sweep_server
    resp = get(server, "/")
    assert resp.status_code in (302, 303, 307) and resp.headers["location"] == "/ui"
    assert get(server, "/ui/").status_code == 200


def test_experiment_grid_shows_the_apis_states(sweep_server: Any) -> None:
    server, sweep = sweep_server
    with Api(server.url) as api:
        resp = get(server, f"/ui/experiments/{sweep.experiment_id}")
        listed = api.ok("GET", "/v1/runs", params={"experiment_id": sweep.experiment_id})["runs"]
    assert resp.status_code == 200
    cells = {a["data-run"]: a for a in Elements(resp.text).find("a", data_run="*")}
    api_states = {f"{r['experiment_id']}/{r['variation']}/{r['run']}": r for r in listed}
    assert set(cells) == set(api_states)
    for key, run in api_states.items():
        assert cells[key]["data-state"] == run["state"], key
        assert ("data-stalled" in cells[key]) == run["stalled"], key
    by_role = {role: cells[key]["data-state"] for role, key in sweep.runs.items()}
    assert by_role == {
        "succeeded": "succeeded",
        "crashed": "failed_crash",
        "abandoned": "failed_abandoned",
        "lost": "lost",
        "stalled": "running",
        "live": "running",
        "pending": "pending",
    }
    assert "data-stalled" in cells[sweep.runs["stalled"]]
    # the config differences: lr and optimizer.name differ, optimizer.beta is shared
    text = html.unescape(resp.text)
    assert "optimizer.name" in text and '"sgd"' in text
    shared = re.search(r"<details class=\"shared\">(.*?)</details>", resp.text, re.S)
    assert shared and "optimizer.beta" in shared.group(1)
    # a live run is on the page: it refreshes itself
    assert 'data-refresh="' in resp.text


def test_experiments_page_counts_per_state(sweep_server: Any) -> None:
    server, sweep = sweep_server
    resp = get(server, "/ui")
    assert resp.status_code == 200
    page = Elements(resp.text)
    row = page.find("tr", data_experiment=sweep.experiment_id)
    assert row
    counts = re.search(
        rf'<tr data-experiment="{re.escape(sweep.experiment_id)}">(.*?)</tr>', resp.text, re.S
    )
    assert counts is not None
    found = dict(re.findall(r'data-state="([a-z_]+)"[^>]*>[a-z_]+ (\d+)<', counts.group(1)))
    assert found == {
        "pending": "1",
        "running": "2",
        "succeeded": "1",
        "failed_crash": "1",
        "failed_abandoned": "1",
        "lost": "1",
        "stalled": "1",
    }


def test_state_filter_uses_the_apis_filter(sweep_server: Any) -> None:
    server, sweep = sweep_server
    resp = get(server, f"/ui/experiments/{sweep.experiment_id}?state=lost")
    cells = Elements(resp.text).find("a", data_run="*")
    assert [c["data-run"] for c in cells] == [sweep.runs["lost"]]
    bad = get(server, f"/ui/experiments/{sweep.experiment_id}?state=bogus")
    assert bad.status_code == 400 and "invalid state" in bad.text
    assert "text/html" in bad.headers["content-type"]


def test_crashed_run_page_shows_message_timeline_and_assets(sweep_server: Any) -> None:
    server, sweep = sweep_server
    key = sweep.runs["crashed"]
    with Api(server.url) as api:
        events = api.events(key)
        info = api.info(key)
    resp = get(server, f"/ui/runs/{key}")
    assert resp.status_code == 200
    page = Elements(resp.text)
    # the message, as text
    assert ui.escaped(ui.CRASH_MESSAGE) in resp.text
    # the spans are the event log's: pending, running, lost, running (then the crash)
    spans = [(r["data-state"], float(r["data-start"])) for r in page.find("rect", data_state="*")]
    assert spans == ui.expected_spans(events)
    assert [s for s, _ in spans] == ["pending", "running", "lost", "running"]
    ends = [float(r["data-end"]) for r in page.find("rect", data_state="*")]
    assert ends[-1] == pytest.approx(float(events[-1]["at"]))
    # the watchdog's silence: heartbeat_timeout long, ending when it declared the run lost
    gaps = page.find("rect", data_gap="true")
    lost_at = next(float(e["at"]) for e in events if e["to_state"] == "lost")
    assert len(gaps) == 1
    assert float(gaps[0]["data-end"]) == pytest.approx(lost_at)
    assert float(gaps[0]["data-start"]) == pytest.approx(lost_at - ui.HEARTBEAT_TIMEOUT)
    # one mark per event, uploads among them
    marks = page.find("circle", data_event="*")
    assert [int(m["data-event"]) for m in marks] == [e["id"] for e in events]
    assert sum(m["data-kind"] == "asset" for m in marks) == len(sweep.assets)
    # the assets: size, SHA-256, a download link that serves those bytes
    assert info["asset_count"] == len(sweep.assets)
    for name, data in sweep.assets.items():
        row = re.search(
            rf'<tr data-asset="{re.escape(ui.escaped(name))}">(.*?)</tr>', resp.text, re.S
        )
        assert row, name
        digest = hashlib.sha256(data).hexdigest()
        assert f'data-sha256="{digest}"' in row.group(1)
        href = html.unescape(re.search(r'class="download" href="([^"]+)"', row.group(1)).group(1))
        got = get(server, href)
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == digest
    # a terminal run does not refresh itself
    assert "data-refresh" not in resp.text


def test_run_pages_agree_with_chronicle_show(sweep_server: Any) -> None:
    """Each run page's state and stalled flag are what ``chronicle show --json`` says."""
    server, sweep = sweep_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    for role in ("crashed", "lost", "stalled", "abandoned"):
        key = sweep.runs[role]
        shown = testkit.run(
            [
                sys.executable,
                "-m",
                "chronicle_integrations.cli",
                "--url",
                server.url,
                "show",
                key,
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        page = get(server, f"/ui/runs/{key}").text
        chip = Elements(page).find("span", data_state="*")[0]
        assert chip["data-state"] == record["state"], role
        assert ('class="chip stalled"' in page) == record["stalled"], role


def test_lost_and_stalled_show_their_evidence(sweep_server: Any) -> None:
    server, sweep = sweep_server
    lost = get(server, f"/ui/runs/{sweep.runs['lost']}").text
    assert "Lost: no heartbeat since" in lost
    assert 'data-refresh="' in lost
    gaps = Elements(lost).find("rect", data_gap="true")
    assert gaps and gaps[-1].get("class") == "gap live"
    stalled = get(server, f"/ui/runs/{sweep.runs['stalled']}").text
    assert "Stalled: heartbeats arrive" in stalled and "step=7" in stalled
    assert re.search(r"\d+s ago</b> on the store's clock", stalled)


def test_hostile_strings_are_inert_text(sweep_server: Any) -> None:
    server, sweep = sweep_server
    pages = [
        "/ui",
        f"/ui/experiments/{sweep.experiment_id}",
        f"/ui/runs/{sweep.runs['crashed']}",
        f"/ui/runs/{sweep.runs['succeeded']}",
    ]
    for path in pages:
        resp = get(server, path)
        assert resp.status_code == 200, path
        assert "<script>alert" not in resp.text and "onerror=alert(1)>" not in resp.text
        ui.no_live_markup(resp.text)
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert resp.headers["x-content-type-options"] == "nosniff"
    # ... and present as text: the name, the config value, the message, the asset name
    experiment = get(server, f"/ui/experiments/{sweep.experiment_id}").text
    assert ui.escaped(ui.HOSTILE) in experiment
    crashed = get(server, f"/ui/runs/{sweep.runs['crashed']}").text
    assert ui.escaped(ui.HOSTILE_ASSET) in crashed
    succeeded = get(server, f"/ui/runs/{sweep.runs['succeeded']}").text
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in succeeded  # the config


@pytest.mark.parametrize(
    "path,status",
    [
        ("/ui/runs/nope/0/0", 404),
        ("/ui/runs/{e}/9/0", 404),
        ("/ui/runs/{e}/x/0", 400),
        ("/ui/runs/{e}/0/-1", 400),
        ("/ui/runs/{e}/0/99999999999", 400),
        ("/ui/runs/..%2F..%2Fetc/0/0", 404),
        ("/ui/no/such/page", 404),
        ("/ui/experiments/%3Cscript%3E", 400),
        ("/ui/experiments/{e}?cursor=forged", 400),
        ("/ui/experiments/{e}?limit=0", 400),
        ("/ui/?cursor=%22%3E%3Cimg", 400),
    ],
)
def test_bad_addresses_are_html_4xx(sweep_server: Any, path: str, status: int) -> None:
    server, sweep = sweep_server
    resp = get(server, path.replace("{e}", sweep.experiment_id))
    assert resp.status_code == status, resp.text
    assert "text/html" in resp.headers["content-type"]
    assert "content-security-policy" in resp.headers
    ui.no_live_markup(resp.text)


def test_the_view_is_read_only(sweep_server: Any) -> None:
    server, sweep = sweep_server
    resp = requests.post(f"{server.url}/ui/runs/{sweep.runs['live']}", timeout=30)
    assert resp.status_code in (404, 405)
    with Api(server.url) as api:
        assert api.info(sweep.runs["live"])["state"] == "running"


def test_keyset_pages_walk_every_run_once(module_server_factory: Any, tmp_path: Path) -> None:
    """450 runs in pages of 100: every run exactly once, in order, following the page's own
    next link; the state filter pages the same way."""
    server = module_server_factory()
    from chronicle_integrations.store import Store

    store = Store.open(server.store_url, tmp_path / "unused-assets")
    try:
        keys = testkit.seed_runs(store, 1, 3, 150, prefix=f"pages-{secrets.token_hex(3)}")
    finally:
        store.close()
    eid = keys[0][0]
    with Api(server.url) as api:
        for r in range(0, 150, 10):  # some cancelled, for the filtered walk
            api.ok("POST", f"/v1/runs/{eid}/1/{r}/fail", json={"reason": "abandoned"})
    for state, expected in (
        (None, [f"{e}/{v}/{r}" for e, v, r in keys]),
        ("failed_abandoned", [f"{eid}/1/{r}" for r in range(0, 150, 10)]),
    ):
        seen: list[str] = []
        url: str | None = f"/ui/experiments/{eid}?limit=100" + (f"&state={state}" if state else "")
        pages = 0
        while url:
            resp = get(server, url)
            assert resp.status_code == 200
            cells = Elements(resp.text).find("a", data_run="*")
            assert len(cells) <= 100
            seen += [c["data-run"] for c in cells]
            nxt = re.search(r'<a href="([^"]+)" rel="next">', resp.text)
            url = html.unescape(nxt.group(1)) if nxt else None
            if url:
                query = parse_qs(urlsplit(url).query)
                assert query.get("state", [None])[0] == state and "cursor" in query
            pages += 1
        assert seen == expected
        assert pages == max(1, -(-len(expected) // 100))


def test_templates_and_static_files_ship_in_the_wheel() -> None:
    """Every file of the view matches a package-data pattern (else an installed server shows
    an unstyled page)."""
    text = (REPO / "pyproject.toml").read_text()  # (no tomllib on Python 3.10)
    block = re.search(
        r"\[tool\.setuptools\.package-data\]\nchronicle_integrations = \[(.*?)\]", text, re.S
    )
    assert block, "no package-data for chronicle_integrations"
    patterns = re.findall(r'"([^"]+)"', block.group(1))
    files = [p for p in UI_PACKAGE.rglob("*") if p.is_file() and p.suffix != ".py"]
    files = [p for p in files if "__pycache__" not in p.parts]
    assert files
    root = REPO / "chronicle_integrations"
    for path in files:
        relative = path.relative_to(root)
        assert any(relative.match(p) for p in patterns), relative
    server_extra = re.search(r"\nserver = \[(.*?)\n\]", text, re.S)
    assert server_extra and '"jinja2' in server_extra.group(1)


# ------------------------------------------------------------------------------- auth
KEY = "s3cret-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def keyed(module_server_factory: Any) -> Iterator[tuple[Any, str, str]]:
    """A server with an API key, an experiment and a run with an asset."""
    server = module_server_factory(api_key=KEY)
    with Api(server.url, KEY) as api:
        eid = api.experiment(ui.HOSTILE, [{"lr": 1}], f"keyed-{secrets.token_hex(4)}")
        key = api.new_run(eid, 0)
        lease = api.start(key)
        api.upload(key, lease, "weights.bin", b"\x00\x01" * 1000)
    yield server, eid, key
    server.stop()


def login(server: Any, key: str, next_path: str = "/ui") -> requests.Response:
    return requests.post(
        f"{server.url}/ui/login",
        data={"key": key, "next": next_path},
        allow_redirects=False,
        timeout=30,
    )


def test_without_the_key_no_page_and_no_asset(keyed: Any) -> None:
    server, eid, key = keyed
    for path in ("/ui", f"/ui/experiments/{eid}", f"/ui/runs/{key}"):
        resp = get(server, path)
        assert resp.status_code == 303, path
        target = urlsplit(resp.headers["location"])
        assert target.path == "/ui/login" and parse_qs(target.query)["next"] == [path]
        assert eid not in resp.text and resp.content == b""
        assert "content-security-policy" in resp.headers
    asset = get(server, f"/v1/runs/{key}/assets/weights.bin")
    assert asset.status_code == 401
    # the form itself and its style sheet hold no data
    form = get(server, "/ui/login")
    assert form.status_code == 200 and 'method="post"' in form.text and eid not in form.text
    assert get(server, "/ui/static/ui.css").status_code == 200
    # a key in the URL does nothing
    assert "set-cookie" not in get(server, f"/ui/login?key={KEY}").headers


def test_login_exchanges_the_key_for_a_cookie(keyed: Any) -> None:
    server, eid, key = keyed
    wrong = login(server, "not-the-key", f"/ui/experiments/{eid}")
    assert wrong.status_code == 303 and "failed=1" in wrong.headers["location"]
    assert "set-cookie" not in wrong.headers
    assert "not this server" in get(server, wrong.headers["location"]).text
    # an off-site next is not followed
    assert login(server, KEY, "https://evil.example/").headers["location"] == "/ui"
    assert login(server, KEY, "//evil.example/ui").headers["location"] == "/ui"
    ok = login(server, KEY, f"/ui/experiments/{eid}")
    assert ok.status_code == 303 and ok.headers["location"] == f"/ui/experiments/{eid}"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert KEY not in cookie
    jar = {"chronicle_session": ok.cookies["chronicle_session"]}
    for path in ("/ui", f"/ui/experiments/{eid}", f"/ui/runs/{key}"):
        resp = get(server, path, cookies=jar)
        assert resp.status_code == 200, path
        ui.no_live_markup(resp.text)
    asset = get(server, f"/v1/runs/{key}/assets/weights.bin", cookies=jar)
    assert asset.status_code == 200 and asset.content == b"\x00\x01" * 1000
    # the cookie authorises reads only: a change still needs the bearer key
    cancel = requests.post(
        f"{server.url}/v1/runs/{key}/fail", json={"reason": "abandoned"}, cookies=jar, timeout=30
    )
    assert cancel.status_code == 401
    # forged and tampered sessions are no sessions
    value = jar["chronicle_session"]
    expiry, _, mac = value.partition(".")
    for forged in (f"{int(expiry) + 1000}.{mac}", f"{expiry}.{'0' * len(mac)}", KEY, ""):
        resp = get(server, "/ui", cookies={"chronicle_session": forged})
        assert resp.status_code == 303, forged
    # a cross-site login form is refused
    cross = requests.post(
        f"{server.url}/ui/login",
        data={"key": KEY},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
        timeout=30,
    )
    assert cross.status_code == 403 and "set-cookie" not in cross.headers
    # logging out clears the cookie
    out = requests.post(f"{server.url}/ui/logout", cookies=jar, allow_redirects=False, timeout=30)
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]


def test_bearer_key_reads_pages_too(keyed: Any) -> None:
    server, eid, _ = keyed
    resp = get(server, f"/ui/experiments/{eid}", headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200


# ------------------------------------------------------------------------------- chronicle ui
def test_chronicle_ui_serves_an_embedded_home(tmp_path: Path) -> None:
    from chronicle_integrations import Chronicle

    home = tmp_path / "home"
    with Chronicle(home=home) as chronicle:
        eid = chronicle.create_experiment("embedded sweep", variations=[{"lr": 0.1}])
        run = chronicle.create_run(eid, 0).start()
        run.fail("crash", message="boom <b>")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    proc = testkit.spawn(
        [
            sys.executable,
            "-m",
            "chronicle_integrations.cli",
            "ui",
            "--home",
            str(home),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def page() -> requests.Response | None:
            try:
                return requests.get(f"{url}/ui/runs/{eid}/0/0", timeout=5)
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                return None

        resp = testkit.wait_until(page, timeout=60, what="chronicle ui to answer")
        assert resp.status_code == 200
        assert "failed_crash" in resp.text and "boom &lt;b&gt;" in resp.text
        front = requests.get(f"{url}/ui", timeout=5).text
        assert "embedded sweep" in front
    finally:
        testkit.reap(proc, signal.SIGTERM, grace=15)


def test_chronicle_ui_without_a_home_is_a_usage_error(tmp_path: Path) -> None:
    done = testkit.run(
        [
            sys.executable,
            "-m",
            "chronicle_integrations.cli",
            "ui",
            "--home",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "no Chronicle store" in done.stderr
