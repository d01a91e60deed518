"""Faults between the worker and S3 in direct mode: the fault proxy sits in front of SeaweedFS
and the server presigns for the proxy (``--s3-public-endpoint-url``), so every part the worker
sends crosses connections that are cut, reset and delayed at random byte offsets. Every upload
must end byte-identical (the bucket's object hashed independently), nothing half-written may
be visible, and no multipart upload may be left behind.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import s3kit
from rel_helpers import FaultyProxy

from chronicle_integrations import Chronicle

pytestmark = pytest.mark.s3
MiB = 2**20


def test_direct_parts_through_a_faulty_network_end_byte_identical(
    server_factory: Any,
    seaweedfs: s3kit.SeaweedServer,
    s3_bucket: str,
    tmp_path: Path,
    rng: Any,
    figures: Any,
) -> None:
    s3_port = int(urlsplit(seaweedfs.endpoint).port or 0)
    with FaultyProxy(s3_port, rng, mean_up=8 * MiB, mean_down=64 * 1024) as proxy:
        extra = ("--s3-public-endpoint-url", proxy.url, "--s3-part-size", str(5 * MiB))
        server = server_factory(**s3kit.server_kwargs(seaweedfs, s3_bucket, *extra))
        files = []
        for i in range(4):
            data = os.urandom(rng.randint(12 * MiB, 24 * MiB))
            path = tmp_path / f"ckpt-{i}.bin"
            path.write_bytes(data)
            files.append((path, hashlib.sha256(data).hexdigest()))
        with Chronicle(url=server.url, home=tmp_path / "home", timeout=120) as chronicle:
            run = chronicle.create_run(chronicle.create_experiment("s3f", variations=[{}]), 0)
            run.start()
            handles = [run.upload_asset(path) for path, _ in files]
            infos = [h.result(600) for h in handles]
            run.succeed()
        faults = proxy.faults()
    assert faults > 0, "the proxy injected no fault: the test proved nothing"
    figures["faults injected (S3 direct parts)"] += faults
    client = seaweedfs.client()
    for info, (_, sha) in zip(infos, files, strict=True):
        assert info.sha256 == sha
        body = client.get_object(Bucket=s3_bucket, Key=f"assets/objects/{sha[:2]}/{sha}")
        assert hashlib.sha256(body["Body"].read()).hexdigest() == sha
        figures["uploads verified"] += 1
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert "PUT /v1/uploads/" not in server.output(), "a part went through the server"
