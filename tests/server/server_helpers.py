"""HTTP helpers for the server tests (imported as ``server_helpers``: a unique module name,
since test directories are not packages)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import requests


class Api:
    """``requests`` against one server, plus shortcuts for the common setup steps."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw verbs ---------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, json=json, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    # -- expectations ------------------------------------------------------------------------
    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        assert resp.status_code == status, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    # -- setup shortcuts ---------------------------------------------------------------------
    def experiment(self, variations: int | list[dict[str, Any]] = 1,
                   name: str = "test") -> str:
        configs = ([{"i": i} for i in range(variations)] if isinstance(variations, int)
                   else variations)
        eid = f"exp-{secrets.token_hex(6)}"
        self.ok("POST", "/v1/experiments", 201,
                json={"name": name, "variations": configs, "experiment_id": eid})
        return eid

    def run(self, experiment_id: str | None = None, variation: int = 0) -> str:
        """A new pending run; returns its path ``/v1/runs/e/v/r``."""
        eid = experiment_id or self.experiment()
        info = self.ok("POST", f"/v1/experiments/{eid}/variations/{variation}/runs", 201)
        return f"/v1/runs/{eid}/{variation}/{info['run']}"

    def started(self, experiment_id: str | None = None, **start: Any) -> tuple[str, str]:
        """A new running run; returns its path and lease."""
        path = self.run(experiment_id)
        info = self.ok("POST", f"{path}/start", json=start or None)
        assert info["state"] == "running" and info["lease"]
        return path, info["lease"]

    def state(self, path: str) -> str:
        return str(self.ok("GET", path)["state"])

    def upload(self, run_path: str, name: str, data: bytes, lease: str | None = None) -> Any:
        """A whole upload in one chunk; returns the AssetInfo."""
        status = self.ok("POST", f"{run_path}/uploads", 201,
                         json={"name": name, "size": len(data), "lease": lease})
        uid = status["upload_id"]
        self.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data)
        return self.ok("POST", f"/v1/uploads/{uid}/complete",
                       json={"sha256": hashlib.sha256(data).hexdigest()})


def assert_error(resp: requests.Response, status: int, code: str) -> dict[str, Any]:
    """Check an error answer: status, the standard body and its code; returns ``error``."""
    assert resp.status_code == status, f"expected {status} {code}, got {resp.status_code}: " \
                                       f"{resp.text[:500]}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return dict(error)
