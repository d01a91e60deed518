"""Crash windows, made deterministic: the server is SIGKILLed at an exact point of a request by
holding the database's write lock from the test (SQLite ``BEGIN IMMEDIATE``), so the request
blocks right where the interesting window is, then killing the server there.

Window: ``complete_upload`` publishes the blob (``os.replace`` of the partial file into
``objects/``) *before* the SQL transaction that records the asset. A crash (or any database
error) between the two must not lose the upload: the client's retry of ``complete`` has to
succeed, since the bytes are all there, verified.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import requests
from rel_helpers import Api, wait_until


def test_crash_between_blob_publish_and_asset_row(
    server_factory: Any, tmp_path: Path, figures: Any
) -> None:
    server = server_factory()
    api = Api(server.url)
    key = api.run(api.experiment())
    path = f"/v1/runs/{key[0]}/{key[1]}/{key[2]}"
    lease = api.ok("POST", path + "/start")["lease"]
    data = os.urandom(256 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    uid = api.ok(
        "POST",
        path + "/uploads",
        201,
        json={"name": "model.ckpt", "size": len(data), "lease": lease},
    )["upload_id"]
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data)

    database = server.store_url.removeprefix("sqlite:///")
    lock = sqlite3.connect(database, timeout=30, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the server's next write transaction now waits
    answers: list[Any] = []

    def complete() -> None:
        try:
            answers.append(
                requests.post(
                    server.url + f"/v1/uploads/{uid}/complete", json={"sha256": digest}, timeout=60
                )
            )
        except requests.RequestException as exc:
            answers.append(exc)

    thread = threading.Thread(target=complete)
    thread.start()
    try:
        published = server.assets / "objects" / digest[:2] / digest
        wait_until(published.exists, timeout=30, what="the blob to be published")
        server.kill(signal.SIGKILL)  # inside the window: blob published, asset not recorded
        figures["fault:server_sigkill"] += 1
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    thread.join(timeout=60)
    assert answers and isinstance(answers[0], requests.RequestException), answers
    server.start(port=server.port)

    # The client's retry (what HttpTransport does after a transport error).
    resp = api.request("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest})
    assert resp.status_code == 200, resp.text
    assert api.assets(key)["model.ckpt"]["sha256"] == digest
    assert api.download_sha(key, "model.ckpt") == digest
    api.close()
