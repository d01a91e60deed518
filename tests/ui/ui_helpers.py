"""What the web view tests share (imported as ``ui_helpers``): a sweep seeded through the real
server's API with a run in every state the view must show, the beats that keep its live runs
alive, hostile strings, and the timeline the event log implies (derived here independently of
the view's code, so the tests can catch the view drawing something else)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

from testkit import HttpApi

#: Every hostile string the view must render as inert text.
HOSTILE = '<script>alert("pwned")</script>"><img src=x onerror=alert(1)>'
#: An asset name that is a valid relative path yet holds markup and URL metacharacters.
HOSTILE_ASSET = '"><img src=x onerror=alert(2)> ?#%.txt'
#: The crash message: a traceback ending in markup.
CRASH_MESSAGE = (
    "Traceback (most recent call last):\n"
    '  File "train.py", line 12, in <module>\n'
    f"ValueError: loss is nan {HOSTILE}"
)

#: Server settings of the seeded sweeps: quick watchdog, quicker stall flag.
HEARTBEAT_TIMEOUT = 3.0
STALL_TIMEOUT = 1.0
SERVER_ARGS = ["--stall-timeout", str(STALL_TIMEOUT)]


class Api(HttpApi):
    """The API calls the sweep is made of."""

    def experiment(self, name: str, configs: list[dict[str, Any]], eid: str) -> str:
        body = {"name": name, "variations": configs, "experiment_id": eid}
        return str(self.ok("POST", "/v1/experiments", 201, json=body)["experiment_id"])

    def new_run(self, eid: str, variation: int) -> str:
        info = self.ok("POST", f"/v1/experiments/{eid}/variations/{variation}/runs", 201)
        return f"{eid}/{variation}/{info['run']}"

    def start(self, key: str) -> str:
        return str(self.ok("POST", f"/v1/runs/{key}/start")["lease"])

    def beat(self, key: str, lease: str, progress: dict[str, Any] | None = None) -> Any:
        body: dict[str, Any] = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        return self.ok("POST", f"/v1/runs/{key}/heartbeat", json=body)

    def upload(self, key: str, lease: str, name: str, data: bytes) -> dict[str, Any]:
        status = self.ok(
            "POST",
            f"/v1/runs/{key}/uploads",
            201,
            json={"name": name, "size": len(data), "lease": lease},
        )
        uid = status["upload_id"]
        self.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data)
        digest = hashlib.sha256(data).hexdigest()
        return dict(self.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest}))

    def info(self, key: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"/v1/runs/{key}"))

    def events(self, key: str) -> list[dict[str, Any]]:
        return list(self.ok("GET", f"/v1/runs/{key}/events", params={"limit": 1000})["events"])


@dataclasses.dataclass
class Sweep:
    """The seeded sweep: its id, and the run key of each role."""

    experiment_id: str
    runs: dict[str, str]
    leases: dict[str, str]
    #: The bytes of the crashed run's assets, by name.
    assets: dict[str, bytes]


def seed_sweep(api: Api, eid: str, *, name: str = "lr sweep") -> Sweep:
    """A sweep of three variations with a succeeded, a crashed (that was lost once and came
    back), an abandoned, a lost, a stalled, a live running and a pending run. Takes about
    ``HEARTBEAT_TIMEOUT`` seconds (the lost runs must really go quiet). The stalled and the
    live run must then be kept beating (:func:`beating`)."""
    api.experiment(
        name,
        [
            {"lr": 0.1, "optimizer": {"name": "adam", "beta": 0.9}, "note": HOSTILE},
            {"lr": 0.01, "optimizer": {"name": "adam", "beta": 0.9}, "note": "plain"},
            {"lr": 0.001, "optimizer": {"name": "sgd", "beta": 0.9}, "note": "plain"},
        ],
        eid,
    )
    runs: dict[str, str] = {}
    leases: dict[str, str] = {}
    assets = {"model.ckpt": b"weights " * 4096, HOSTILE_ASSET: b"hostile name, plain bytes\n"}
    for role, variation in (
        ("succeeded", 0),
        ("crashed", 0),
        ("abandoned", 1),
        ("lost", 1),
        ("stalled", 2),
        ("live", 2),
        ("pending", 2),
    ):
        runs[role] = api.new_run(eid, variation)
    for role in ("succeeded", "crashed", "lost", "stalled", "live"):
        leases[role] = api.start(runs[role])
    api.beat(runs["succeeded"], leases["succeeded"], {"step": 100, "epoch": 2})
    api.upload(runs["succeeded"], leases["succeeded"], "model.ckpt", assets["model.ckpt"])
    api.ok(
        "POST",
        f"/v1/runs/{runs['succeeded']}/succeed",
        json={"lease": leases["succeeded"], "progress": {"step": 120, "epoch": 3}},
    )
    api.ok("POST", f"/v1/runs/{runs['abandoned']}/fail", json={"reason": "abandoned"})
    api.beat(runs["stalled"], leases["stalled"], {"step": 7})
    # The crashed and the lost run go quiet past the watchdog's timeout (the others beat).
    with beating(api, runs, leases):
        time.sleep(HEARTBEAT_TIMEOUT + 1.0)
    crashed, lease = runs["crashed"], leases["crashed"]
    assert api.info(crashed)["state"] == "lost"
    api.beat(crashed, lease, {"step": 40})  # back: lost -> running
    for asset, data in assets.items():
        api.upload(crashed, lease, asset, data)
    api.ok(
        "POST",
        f"/v1/runs/{crashed}/fail",
        json={"reason": "crash", "message": CRASH_MESSAGE, "lease": lease},
    )
    return Sweep(eid, runs, leases, assets)


@contextlib.contextmanager
def beating(api: Api, runs: dict[str, str], leases: dict[str, str]) -> Iterator[None]:
    """Keep the ``stalled`` run beating without progress and the ``live`` one advancing, in
    a thread, for the ``with`` block (beats every sixth of the watchdog's timeout)."""
    stop = threading.Event()
    session = Api(api.url)
    session.session.headers.update(api.session.headers)

    def beat() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            with contextlib.suppress(Exception):  # the test's own asserts tell what broke
                session.beat(runs["stalled"], leases["stalled"], {"step": 7})
                if "live" in leases:
                    session.beat(runs["live"], leases["live"], {"step": step})
            stop.wait(HEARTBEAT_TIMEOUT / 6)

    thread = threading.Thread(target=beat, name="ui-test-beats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        session.close()


def expected_spans(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """``(state, start)`` of each span the event log implies: each transition into a new
    non-terminal state starts one (a repeat of the same state continues it)."""
    spans: list[tuple[str, float]] = []
    terminal = {"succeeded", "failed_crash", "failed_abandoned", "failed_lost"}
    for event in events:
        to = event.get("to_state")
        if event["kind"] != "transition" or to is None or to in terminal:
            continue
        if not spans or spans[-1][0] != to:
            spans.append((to, float(event["at"])))
    return spans


class Elements(HTMLParser):
    """Every start tag of a page, with its attributes (for assertions on ``data-*``)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **wanted: str) -> list[dict[str, str]]:
        """Tags named ``tag`` whose attributes include ``wanted`` (``data_x`` = ``data-x``;
        a value of ``"*"`` only requires the attribute)."""
        out = []
        for name, attrs in self.tags:
            if name != tag:
                continue
            if all(
                k.replace("_", "-") in attrs and (v == "*" or attrs[k.replace("_", "-")] == v)
                for k, v in wanted.items()
            ):
                out.append(attrs)
        return out


def escaped(text: str) -> str:
    """``text`` as the view's templates escape it (Jinja2's autoescape: MarkupSafe)."""
    import markupsafe

    return str(markupsafe.escape(text))


def no_live_markup(html: str) -> None:
    """Assert that no hostile string reached the page as markup: no script element but the
    view's own, no element with an event handler attribute, no raw ``<img`` tag."""
    page = Elements(html)
    scripts = [a for tag, a in page.tags if tag == "script"]
    assert scripts == [{"src": "/ui/static/ui.js", "defer": ""}], scripts
    handlers = [(tag, a) for tag, a in page.tags if any(k.startswith("on") for k in a)]
    assert not handlers, handlers
    assert not [tag for tag, _ in page.tags if tag == "img"]
    assert not re.search(r"<img\b", html)
