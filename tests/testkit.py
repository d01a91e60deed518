"""Helpers every test suite shares (imported as ``testkit``: ``tests/`` is on ``sys.path``
because ``tests/conftest.py`` lives there; test directories are not packages).

* :func:`wait_until`: poll a condition with a deadline that names what was awaited;
* :func:`sha256_file` / :func:`sha256_bytes`: digests to compare assets with;
* :class:`HttpApi`: raw ``requests`` against one server (the suites add their shortcuts);
* :func:`assert_error`: an error answer with the standard body and a stable code.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import requests


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it is truthy and return its value; AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sha256_file(path: str | os.PathLike[str]) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HttpApi:
    """``requests`` against one server (with its API key when given): the raw verbs and
    :meth:`ok`. A context manager that closes its session."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> HttpApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, json=json, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        """The decoded JSON of an answer that must have ``status``."""
        resp = self.request(method, path, **kwargs)
        assert resp.status_code == status, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()


def assert_error(
    resp: requests.Response, status: int | tuple[int, ...], code: str | None = None
) -> dict[str, Any]:
    """An error answer: one of ``status``, JSON, exactly ``{"error": {...}}`` with a message
    and (when given) ``code``. Returns the ``error`` object."""
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, (
        f"expected {statuses} {code or ''}, got {resp.status_code}: {resp.text[:500]}"
    )
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def seed_runs(
    store: Any, experiments: int, variations: int, runs: int, prefix: str = "seed"
) -> list[tuple[str, int, int]]:
    """``experiments * variations * runs`` pending runs, created in bulk for the listing
    tests: experiments through the store, runs with one multi-row ``INSERT`` through its own
    engine and schema (creating thousands one by one would dominate the tests' time). The
    variations' run counters are set, so ``create_run`` continues after them. Returns the
    keys in listing order (ids ``prefix-000``, ``prefix-001``... sort the same everywhere)."""
    from chronicle_integrations.store import schema as t

    ids = [f"{prefix}-{i:03d}" for i in range(experiments)]
    for eid in ids:
        store.create_experiment(eid, [{"v": v} for v in range(variations)], eid)
    keys = [(e, v, r) for e in ids for v in range(variations) for r in range(runs)]
    now = store.clock()
    with store.engine.begin() as conn:
        conn.execute(
            t.runs.insert(),
            [
                {
                    "experiment_id": e,
                    "variation": v,
                    "run": r,
                    "state": "pending",
                    "created_at": now,
                }
                for e, v, r in keys
            ],
        )
        conn.execute(
            t.variations.update().where(t.variations.c.experiment_id.in_(ids)).values(next_run=runs)
        )
    return keys
