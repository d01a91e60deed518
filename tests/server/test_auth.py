"""The API key: every route but the health check refuses a missing or wrong key, before doing
anything (nothing is persisted, no body is read)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from server_helpers import Api, assert_error

KEY = "test-key-" + "k" * 24

BAD_AUTH = {
    "missing": {},
    "wrong key": {"Authorization": "Bearer not-the-key"},
    "key prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
    "key plus more": {"Authorization": f"Bearer {KEY}x"},
    "wrong scheme": {"Authorization": f"Basic {KEY}"},
    "bare key": {"Authorization": KEY},
    "empty bearer": {"Authorization": "Bearer "},
    "non-ascii": {"Authorization": "Bearer cl\u00e9"},
}


@pytest.fixture(scope="module")
def keyed_server(module_server_factory: Any, module_store_url: str) -> Iterator[Any]:
    process = module_server_factory(store_url=module_store_url, api_key=KEY)
    yield process
    process.stop()


def _routes(url: str) -> list[tuple[str, str]]:
    """Every (method, concrete path) of the API, from its (public) OpenAPI schema."""
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    values = {
        "experiment_id": "some-exp",
        "variation": "0",
        "run": "0",
        "upload_id": "some-upload-id",
        "name": "dir/model.ckpt",
    }
    out = []
    for template, item in schema["paths"].items():
        path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)
        out += [(method.upper(), path) for method in item]
    return out


@pytest.mark.parametrize("auth", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
def test_every_route_needs_the_key(keyed_server: Any, auth: dict[str, str]) -> None:
    routes = _routes(keyed_server.url)
    assert len(routes) == 27
    for method, path in routes:
        if path in ("/v1/health", "/v1/ready"):  # probes of a load balancer: public
            continue
        body: dict[str, Any] = {}
        if method == "PUT":
            body["data"] = b"x" * 1000
            path += "?offset=0"
        elif method == "POST":
            body["json"] = {"name": "n", "config": {}, "reason": "abandoned", "sha256": "0" * 64}
        resp = requests.request(method, keyed_server.url + path, headers=auth, timeout=30, **body)
        assert_error(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # Unknown routes too: nothing is revealed without the key.
    assert_error(
        requests.get(f"{keyed_server.url}/v1/nowhere", headers=auth, timeout=30),
        401,
        "unauthorized",
    )


def test_health_and_docs_are_public_and_nothing_was_persisted(keyed_server: Any) -> None:
    assert requests.get(f"{keyed_server.url}/v1/health", timeout=30).json()["status"] == "ok"
    assert requests.get(f"{keyed_server.url}/v1/ready", timeout=30).json()["status"] == "ready"
    assert requests.get(f"{keyed_server.url}/openapi.json", timeout=30).status_code == 200
    with Api(keyed_server.url, api_key=KEY) as api:
        # The refused POSTs above created nothing (this module's store is fresh).
        assert api.ok("GET", "/v1/experiments") == {"experiments": []}
        assert api.ok("GET", "/v1/runs") == {"runs": []}


def test_the_key_opens_everything(keyed_server: Any) -> None:
    with Api(keyed_server.url, api_key=KEY) as api:
        path, lease = api.started()
        api.ok("POST", f"{path}/heartbeat", json={"lease": lease})
        asset = api.upload(path, "out/model.bin", b"weights", lease)
        assert asset["sha256"] == hashlib.sha256(b"weights").hexdigest()
        assert api.get(f"{path}/assets/out/model.bin").content == b"weights"
        api.ok("POST", f"{path}/succeed", json={"lease": lease})
    # The scheme name is case-insensitive.
    resp = requests.get(
        f"{keyed_server.url}/v1/runs", timeout=30, headers={"Authorization": f"bearer {KEY}"}
    )
    assert resp.status_code == 200
    assert "Traceback" not in keyed_server.output()
