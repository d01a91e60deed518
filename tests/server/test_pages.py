"""Every listing of the ``/v1`` API comes in pages, through a real server on SQLite and
PostgreSQL: ``?limit=N&cursor=C``, a bounded default, ``next_cursor`` until the last page,
every run exactly once while runs are created between pages, and a 400 ``invalid_request``
for a malformed limit or cursor.

The thousands of runs are seeded into the server's own database through the store (one bulk
``INSERT``); everything else goes through HTTP.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from server_helpers import Api, assert_error
from testkit import seed_runs

from chronicle_integrations._validation import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from chronicle_integrations.store import Store


@pytest.fixture(scope="module")
def seeded(module_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """2,500 runs (5 experiments x 5 variations x 100) in the module's database; their
    experiment ids start with the prefix this fixture returns."""
    prefix = f"pg{secrets.token_hex(3)}"
    store = Store.open(module_store_url, tmp_path_factory.mktemp("seed-assets"))
    try:
        seed_runs(store, experiments=5, variations=5, runs=100, prefix=prefix)
    finally:
        store.close()
    yield prefix


def _key(run: dict[str, Any]) -> tuple[str, int, int]:
    return (run["experiment_id"], run["variation"], run["run"])


def test_get_runs_pages_through_every_run_once_in_order(api: Api, seeded: str) -> None:
    first = api.get("/v1/runs")
    assert first.status_code == 200
    body = first.json()
    assert len(body["runs"]) == DEFAULT_PAGE_SIZE and isinstance(body["next_cursor"], str)
    assert len(first.content) < 1024 * 1024, len(first.content)  # a page, not the store
    keys, cursor, pages, created = [], None, 0, []
    while True:
        params: dict[str, Any] = {"limit": 400}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.ok("GET", "/v1/runs", params=params)
        pages += 1
        assert 0 < len(page["runs"]) <= 400 or "next_cursor" not in page
        keys += [_key(r) for r in page["runs"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            assert set(page) == {"runs"}  # the last page: the old shape, no cursor
            break
        # Runs created meanwhile, behind the cursor and ahead of it.
        for eid, variation in ((f"{seeded}-000", 0), (f"{seeded}-004", 4)):
            path = f"/v1/experiments/{eid}/variations/{variation}/runs"
            created.append(_key(api.ok("POST", path, 201)))
    mine = [k for k in keys if k[0].startswith(seeded)]
    expected = {(f"{seeded}-{e:03d}", v, r) for e in range(5) for v in range(5) for r in range(100)}
    assert len(keys) == len(set(keys)), "a run came twice"
    assert mine == sorted(mine) and expected <= set(mine)
    assert set(mine) - expected <= set(created)
    assert pages >= 7


def test_every_listing_has_pages(api: Api) -> None:
    eid = api.experiment()
    for _ in range(5):
        api.ok("POST", "/v1/experiments", 201, json={"name": "more"})
    path, lease = api.started(eid)
    for i in range(5):
        api.upload(path, f"a/{i}.bin", b"x" * (i + 1), lease)
    for listing, field in (
        ("/v1/experiments", "experiments"),
        (f"{path}/events", "events"),
        (f"{path}/assets", "assets"),
        (f"/v1/runs?experiment_id={eid}", "runs"),
    ):
        got, cursor = [], None
        while True:
            page = api.ok("GET", listing, params={"limit": 2, "cursor": cursor})
            assert len(page[field]) <= 2
            got += page[field]
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        whole = api.ok("GET", listing, params={"limit": MAX_PAGE_SIZE})
        if field != "experiments":  # (other tests add experiments meanwhile)
            assert got == whole[field], listing
        assert len(got) >= (1 if field == "runs" else 5), listing


def _forged(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": str(MAX_PAGE_SIZE + 1)}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": "9" * 30}, "limit"),
        ({"cursor": ""}, "cursor"),
        ({"cursor": "%%%"}, "cursor"),
        ({"cursor": "W10"}, "cursor"),  # "[]"
        ({"cursor": _forged("runs", "e", 0, 2**62)}, "cursor"),
        ({"cursor": _forged("events", -5)}, "cursor"),
        ({"cursor": _forged("experiments", "1.0", "e")}, "cursor"),
        ({"cursor": _forged("assets", "../x")}, "cursor"),
        ({"cursor": "Z" * 10_000}, "cursor"),
    ],
)
def test_a_malformed_limit_or_cursor_is_invalid_request(
    api: Api, params: dict[str, str], field: str
) -> None:
    path, _ = api.started()
    for listing in ("/v1/runs", "/v1/experiments", f"{path}/events", f"{path}/assets"):
        error = assert_error(api.get(listing, params=params), 400, "invalid_request")
        assert error.get("field") == field, (listing, error)
    assert api.ok("GET", "/v1/runs", params={"limit": 1})["runs"]  # still serving


def test_openapi_documents_the_pages(api: Api) -> None:
    schema = api.ok("GET", "/openapi.json")
    for path in (
        "/v1/runs",
        "/v1/experiments",
        "/v1/runs/{experiment_id}/{variation}/{run}/events",
        "/v1/runs/{experiment_id}/{variation}/{run}/assets",
    ):
        params = {p["name"]: p for p in schema["paths"][path]["get"]["parameters"]}
        assert {"limit", "cursor"} <= set(params), path
        limit = params["limit"]["schema"]
        assert str(MAX_PAGE_SIZE) in json.dumps(limit), limit
    for model in ("RunList", "ExperimentList", "EventList", "AssetList"):
        assert "next_cursor" in schema["components"]["schemas"][model]["properties"], model
