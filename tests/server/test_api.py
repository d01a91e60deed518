"""Every route's happy path against a real server, on SQLite and PostgreSQL, and the OpenAPI
schema that documents them."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from server_helpers import Api, assert_error

from chronicle_integrations import _models
from chronicle_integrations._version import __version__
from chronicle_integrations.lifecycle import RunState

RUN_FIELDS = {f.name for f in dataclasses.fields(_models.RunInfo)}


def test_health(api: Api) -> None:
    assert api.ok("GET", "/v1/health") == {"status": "ok", "version": __version__}


def test_experiments(api: Api) -> None:
    body = {
        "name": "lr sweep",
        "variations": [{"lr": 0.1}, {"lr": 0.01, "nested": {"a": [1]}}],
        "experiment_id": "lr-sweep-api",
    }
    created = api.ok("POST", "/v1/experiments", 201, json=body)
    assert created["experiment_id"] == "lr-sweep-api"
    assert created["name"] == "lr sweep" and created["variations"] == 2
    assert isinstance(created["created_at"], float)
    # The same definition again is a success with no effect (a retried request).
    assert api.ok("POST", "/v1/experiments", 201, json=body) == created
    assert api.ok("GET", "/v1/experiments/lr-sweep-api") == created
    listed = api.ok("GET", "/v1/experiments")["experiments"]
    assert created in listed
    # A different definition under the same id is refused.
    assert_error(
        api.post("/v1/experiments", json={**body, "variations": [{"lr": 1}]}), 409, "already_exists"
    )
    assert_error(api.post("/v1/experiments", json={**body, "name": "other"}), 409, "already_exists")

    # Derived id, no variations, unknown extra fields ignored.
    derived = api.ok("POST", "/v1/experiments", 201, json={"name": "My run!", "future": 1})
    assert derived["experiment_id"].startswith("My-run-") and derived["variations"] == 0


def test_variations(api: Api) -> None:
    eid = api.experiment([{"lr": 0.1}])
    assert api.ok("GET", f"/v1/experiments/{eid}/variations/0") == {
        "experiment_id": eid,
        "variation": 0,
        "config": {"lr": 0.1},
    }
    added = api.ok(
        "POST",
        f"/v1/experiments/{eid}/variations",
        201,
        json={"config": {"lr": 0.5, "layers": [64, 64]}},
    )
    assert added == {"experiment_id": eid, "variation": 1}
    assert api.ok("GET", f"/v1/experiments/{eid}/variations/1")["config"] == {
        "lr": 0.5,
        "layers": [64, 64],
    }
    # request_id makes a retried add_variation return the first answer.
    body = {"config": {"lr": 1.0}, "request_id": "req-variation-1"}
    first = api.ok("POST", f"/v1/experiments/{eid}/variations", 201, json=body)
    assert api.ok("POST", f"/v1/experiments/{eid}/variations", 201, json=body) == first
    assert api.ok("GET", f"/v1/experiments/{eid}")["variations"] == 3


def test_runs_create_get_list(api: Api) -> None:
    eid = api.experiment(2)
    first = api.ok("POST", f"/v1/experiments/{eid}/variations/1/runs", 201)
    assert set(first) == RUN_FIELDS
    assert (first["experiment_id"], first["variation"], first["run"]) == (eid, 1, 0)
    assert first["state"] == "pending" and first["lease"] is None
    second = api.ok("POST", f"/v1/experiments/{eid}/variations/1/runs", 201, json={})
    assert second["run"] == 1
    # request_id: a retry returns the same run instead of creating a ghost.
    body = {"request_id": "create-run-retry"}
    third = api.ok("POST", f"/v1/experiments/{eid}/variations/1/runs", 201, json=body)
    assert (
        api.ok("POST", f"/v1/experiments/{eid}/variations/1/runs", 201, json=body)["run"]
        == third["run"]
        == 2
    )
    assert api.ok("GET", f"/v1/runs/{eid}/1/0") == first

    runs = api.ok("GET", "/v1/runs", params={"experiment_id": eid})["runs"]
    assert [(r["variation"], r["run"]) for r in runs] == [(1, 0), (1, 1), (1, 2)]
    api.ok("POST", f"/v1/runs/{eid}/1/1/start")
    running = api.ok("GET", "/v1/runs", params={"experiment_id": eid, "state": "running"})
    assert [r["run"] for r in running["runs"]] == [1]
    assert all(r["lease"] is None for r in running["runs"])  # leases only in start's answer
    everything = api.ok("GET", "/v1/runs")["runs"]
    assert {(r["experiment_id"], r["run"]) for r in runs} <= {
        (r["experiment_id"], r["run"]) for r in everything
    }


def test_run_lifecycle_routes(api: Api) -> None:
    path = api.run()
    started = api.ok("POST", f"{path}/start", json={"holder": "host-1:123"})
    assert started["state"] == "running" and started["lease_holder"] == "host-1:123"
    lease = started["lease"]
    assert isinstance(lease, str) and len(lease) >= 8
    beat = api.ok("POST", f"{path}/heartbeat", json={"lease": lease})
    assert beat["state"] == "running" and beat["lease"] is None
    assert beat["last_heartbeat_at"] >= started["started_at"]
    done = api.ok("POST", f"{path}/succeed", json={"lease": lease})
    assert done["state"] == "succeeded" and done["ended_at"] is not None

    failed_path = api.run()
    lease = api.ok("POST", f"{failed_path}/start")["lease"]
    failed = api.ok(
        "POST",
        f"{failed_path}/fail",
        json={"reason": "crash", "message": "ValueError: boom", "lease": lease},
    )
    assert (failed["state"], failed["reason"], failed["message"]) == (
        "failed_crash",
        "crash",
        "ValueError: boom",
    )

    events = api.ok("GET", f"{path}/events")["events"]
    assert [(e["from_state"], e["to_state"], e["cause"]) for e in events] == [
        (None, "pending", "create"),
        ("pending", "running", "start"),
        ("running", "succeeded", "succeed"),
    ]
    assert all(e["kind"] == "transition" and isinstance(e["at"], float) for e in events)


def test_start_with_proposed_lease_is_idempotent(api: Api) -> None:
    path = api.run()
    body = {"lease": "my-chosen-lease-0001", "holder": "w"}
    first = api.ok("POST", f"{path}/start", json=body)
    assert first["lease"] == "my-chosen-lease-0001"
    again = api.ok("POST", f"{path}/start", json=body)  # a retried start: no effect
    assert again["state"] == "running" and again["lease"] == first["lease"]
    assert len(api.ok("GET", f"{path}/events")["events"]) == 2


def test_upload_download_and_assets(api: Api) -> None:
    path, lease = api.started()
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes
    digest = hashlib.sha256(data).hexdigest()
    status = api.ok(
        "POST",
        f"{path}/uploads",
        201,
        json={"name": "ckpt/epoch=1.ckpt", "size": len(data), "lease": lease},
    )
    uid = status["upload_id"]
    assert status == {
        "upload_id": uid,
        "name": "ckpt/epoch=1.ckpt",
        "offset": 0,
        "size": len(data),
        "completed": False,
        "sha256": None,
    }
    half = 300_000
    put = api.ok(
        "PUT",
        f"/v1/uploads/{uid}",
        params={"offset": 0},
        data=data[:half],
        headers={"Content-Type": "application/octet-stream"},
    )
    assert put["offset"] == half
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == half
    # Nothing is visible before completion.
    assert api.ok("GET", f"{path}/assets") == {"assets": []}
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": half}, data=data[half:])
    asset = api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest})
    assert asset["name"] == "ckpt/epoch=1.ckpt" and asset["size"] == len(data)
    assert asset["sha256"] == digest
    # Completing again returns the asset again.
    assert api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest}) == asset
    assert api.ok("GET", f"/v1/uploads/{uid}")["completed"] is True

    assert api.ok("GET", f"{path}/assets") == {"assets": [asset]}
    assert api.ok("GET", path)["asset_count"] == 1
    resp = api.get(f"{path}/assets/ckpt/epoch=1.ckpt")
    assert resp.status_code == 200 and resp.content == data
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["X-Chronicle-SHA256"] == digest
    assert resp.headers["ETag"] == f'"{digest}"'
    assert resp.headers["Accept-Ranges"] == "bytes"
    events = api.ok("GET", f"{path}/events")["events"]
    assert events[-1]["kind"] == "asset"
    assert events[-1]["detail"] == {
        "name": "ckpt/epoch=1.ckpt",
        "sha256": digest,
        "size": len(data),
    }


def test_download_ranges(api: Api) -> None:
    path, lease = api.started()
    data = bytes(range(256)) * 40  # 10240 bytes
    api.upload(path, "blob.bin", data, lease)
    url = f"{path}/assets/blob.bin"
    size = len(data)
    for header, (start, end) in {
        "bytes=0-99": (0, 100),
        "bytes=100-": (100, size),
        "bytes=-10": (size - 10, size),
        "bytes=10000-99999": (10000, size),
        "bytes=5-5": (5, 6),
    }.items():
        resp = api.get(url, headers={"Range": header})
        assert resp.status_code == 206, (header, resp.text)
        assert resp.content == data[start:end], header
        assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
        assert resp.headers["Content-Length"] == str(end - start)
    for header in ("bytes=10240-", "bytes=99999-", "bytes=5-2", "bytes=-0", "bytes=abc"):
        resp = api.get(url, headers={"Range": header})
        error = assert_error(resp, 416, "invalid_request")
        assert resp.headers["Content-Range"] == f"bytes */{size}", header
        assert error["size"] == size
    # Several ranges, or another unit: the whole asset (a server may ignore Range).
    for header in ("bytes=0-1,5-6", "items=0-1"):
        resp = api.get(url, headers={"Range": header})
        assert resp.status_code == 200 and resp.content == data
    # If-Range with another version's ETag: the whole asset.
    resp = api.get(url, headers={"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert resp.status_code == 200 and resp.content == data
    resp = api.get(url, headers={"Range": "bytes=0-9", "If-Range": resp.headers["ETag"]})
    assert resp.status_code == 206 and resp.content == data[:10]


def test_reupload_replaces_asset_and_empty_asset(api: Api) -> None:
    path, lease = api.started()
    first = api.upload(path, "model.pt", b"version one", lease)
    second = api.upload(path, "model.pt", b"version two, longer", lease)
    assert first["sha256"] != second["sha256"]
    assert api.get(f"{path}/assets/model.pt").content == b"version two, longer"
    assert [a["sha256"] for a in api.ok("GET", f"{path}/assets")["assets"]] == [second["sha256"]]
    digests = [
        e["detail"]["sha256"]
        for e in api.ok("GET", f"{path}/events")["events"]
        if e["kind"] == "asset"
    ]
    assert digests == [first["sha256"], second["sha256"]]

    empty = api.upload(path, "empty.txt", b"", lease)
    assert empty["size"] == 0
    resp = api.get(f"{path}/assets/empty.txt")
    assert resp.status_code == 200 and resp.content == b""


def test_chunked_upload_without_content_length(api: Api) -> None:
    path, lease = api.started()
    pieces = [bytes([i]) * 70_000 for i in range(40)]  # ~2.8 MiB, sent chunked
    data = b"".join(pieces)
    uid = api.ok("POST", f"{path}/uploads", 201, json={"name": "chunked.bin", "lease": lease})[
        "upload_id"
    ]
    resp = api.put(f"/v1/uploads/{uid}", params={"offset": 0}, data=iter(pieces))
    assert resp.status_code == 200, resp.text
    assert resp.json()["offset"] == len(data)
    asset = api.ok(
        "POST", f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(data).hexdigest()}
    )
    assert asset["size"] == len(data)
    assert api.get(f"{path}/assets/chunked.bin").content == data


def test_reopen_upload_by_id(api: Api) -> None:
    path, lease = api.started()
    body = {"name": "resumable.bin", "upload_id": "client-chosen-upload-1", "lease": lease}
    assert api.ok("POST", f"{path}/uploads", 201, json=body)["offset"] == 0
    api.ok("PUT", "/v1/uploads/client-chosen-upload-1", params={"offset": 0}, data=b"abc")
    again = api.ok("POST", f"{path}/uploads", 201, json=body)
    assert again["upload_id"] == "client-chosen-upload-1" and again["offset"] == 3


def test_openapi_documents_the_api(api: Api) -> None:
    schema = api.ok("GET", "/openapi.json")
    paths = schema["paths"]
    expected = {
        ("/v1/health", "get"),
        ("/v1/ready", "get"),
        ("/v1/experiments", "post"),
        ("/v1/experiments", "get"),
        ("/v1/experiments/{experiment_id}", "get"),
        ("/v1/experiments/{experiment_id}/objective", "put"),
        ("/v1/experiments/{experiment_id}/best", "get"),
        ("/v1/experiments/{experiment_id}/variations", "post"),
        ("/v1/experiments/{experiment_id}/variations/{variation}", "get"),
        ("/v1/experiments/{experiment_id}/variations/{variation}/runs", "post"),
        ("/v1/runs", "get"),
        ("/v1/runs/{experiment_id}/{variation}/{run}", "get"),
        *(
            (f"/v1/runs/{{experiment_id}}/{{variation}}/{{run}}/{action}", "post")
            for action in ("start", "heartbeat", "succeed", "fail", "uploads")
        ),
        ("/v1/runs/{experiment_id}/{variation}/{run}/events", "get"),
        ("/v1/runs/{experiment_id}/{variation}/{run}/events", "post"),
        ("/v1/runs/{experiment_id}/{variation}/{run}/assets", "get"),
        ("/v1/runs/{experiment_id}/{variation}/{run}/assets/{name}", "get"),
        ("/v1/uploads/{upload_id}", "get"),
        ("/v1/uploads/{upload_id}", "put"),
        ("/v1/uploads/{upload_id}", "delete"),
        ("/v1/uploads/{upload_id}/complete", "post"),
        ("/v1/uploads/{upload_id}/direct", "get"),  # direct uploads to S3
        ("/v1/uploads/{upload_id}/direct", "post"),
    }
    documented = {(p, m) for p, item in paths.items() for m in item}
    assert documented == expected
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components  # our 400s replace FastAPI's 422s
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert paths["/v1/health"]["get"]["security"] == []
    for p, m in expected:
        responses = paths[p][m]["responses"]
        assert "400" in responses, (p, m)
        assert "ErrorResponse" in str(responses["400"]), (p, m)
        if "{" in p or m == "post":
            assert "422" not in responses or "DigestMismatch" not in str(responses["422"])
    fail = paths["/v1/runs/{experiment_id}/{variation}/{run}/fail"]["post"]
    assert "FailRequest" in str(fail["requestBody"])
    assert components["FailRequest"]["properties"]["reason"]["enum"] == ["crash", "abandoned"]
    put = paths["/v1/uploads/{upload_id}"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    assert any(p["name"] == "offset" for p in put["parameters"])
    assert "422" in paths["/v1/uploads/{upload_id}/complete"]["post"]["responses"]
    variation = next(
        p
        for p in paths["/v1/runs/{experiment_id}/{variation}/{run}"]["get"]["parameters"]
        if p["name"] == "variation"
    )
    assert variation["schema"]["minimum"] == 0 and variation["schema"]["maximum"] == 2**31 - 1
    state_enum = components["RunState"]["enum"]
    assert sorted(state_enum) == sorted(s.value for s in RunState)


@pytest.mark.parametrize(
    ("model", "record"),
    [
        ("Run", _models.RunInfo),
        ("Experiment", _models.ExperimentInfo),
        ("Event", _models.Event),
        ("Asset", _models.AssetInfo),
        ("UploadStatus", _models.UploadStatus),
    ],
)
def test_response_models_match_records(model: str, record: type) -> None:
    from chronicle_integrations.server import wire as schemas

    fields = set(getattr(schemas, model).model_fields)
    assert fields == {f.name for f in dataclasses.fields(record)}
