"""The app factory in-process: no threads or engines before the lifespan, a watchdog thread that
survives failing sweeps, and a clean stop."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations.server import create_app
from chronicle_integrations.store import Store


def _watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "chronicle-watchdog"]


def test_only_the_server_package_imports_fastapi() -> None:
    code = (
        "import sys, threading\n"
        "import chronicle_integrations, chronicle_integrations.client, "
        "chronicle_integrations.cli, chronicle_integrations.store\n"
        "assert 'fastapi' not in sys.modules and 'starlette' not in sys.modules\n"
        "import chronicle_integrations.server\n"
        "assert 'fastapi' in sys.modules\n"
        "assert 'uvicorn' not in sys.modules  # only serve() needs it\n"
        "assert threading.active_count() == 1  # nothing started at import\n"
    )
    testkit.run([sys.executable, "-c", code], check=True, timeout=120)


def test_watchdog_sweeps_survives_failures_and_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(
        f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "assets", heartbeat_timeout=1.0
    )
    calls: list[float] = []

    def flaky_sweep() -> dict[str, int]:
        calls.append(time.monotonic())
        if len(calls) % 2:
            raise RuntimeError("database went away")
        return {"lost": 0, "failed_lost": 0}

    store.sweep = flaky_sweep  # type: ignore[method-assign]
    app = create_app(store, sweep_interval=0.02)
    assert not _watchdogs()  # nothing runs before the lifespan starts

    async def lifespan() -> None:
        async with app.router.lifespan_context(app):
            assert len(_watchdogs()) == 1
            deadline = time.monotonic() + 30
            while len(calls) < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    with caplog.at_level("INFO", logger="chronicle_integrations.server"):
        asyncio.run(lifespan())
    assert len(calls) >= 6  # kept sweeping after failures
    assert not _watchdogs()  # stopped with the app
    failures = [r for r in caplog.records if "sweep failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None  # the first with its traceback
    assert any("recovered" in r.getMessage() for r in caplog.records)
    store.close()


@pytest.mark.parametrize(("heartbeat_timeout", "interval"), [(8.0, 2.0), (900.0, 30.0)])
def test_default_sweep_interval(tmp_path: Path, heartbeat_timeout: float, interval: float) -> None:
    store: Any = Store.open(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        tmp_path / "assets",
        heartbeat_timeout=heartbeat_timeout,
    )
    assert create_app(store).state.sweep_interval == interval
    assert create_app(store, sweep_interval=0.5).state.sweep_interval == 0.5
    with pytest.raises(ValueError):
        create_app(store, sweep_interval=0)
    store.close()


async def _call(app: Any, method: str, path: str) -> tuple[int, bytes]:
    """One request straight through the ASGI app (no server, no HTTP client)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    messages: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:])


def test_unexpected_exception_is_a_logged_500_with_the_error_body(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "assets")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    store.page_experiments = broken  # type: ignore[method-assign]  # what the route calls
    app = create_app(store)
    with caplog.at_level("ERROR"):
        status, body = asyncio.run(_call(app, "GET", "/v1/experiments"))
    assert status == 500
    error = json.loads(body)["error"]
    assert error["code"] == "internal" and "ZeroDivisionError" in error["message"]
    assert "a bug" not in error["message"]  # details stay in the log
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert logged
    # The app still answers.
    assert asyncio.run(_call(app, "GET", "/v1/health"))[0] == 200
    store.close()
