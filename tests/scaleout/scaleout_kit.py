"""The scale-out suite's kit, whose fixtures its modules import: a fresh PostgreSQL database,
HAProxy and pgbouncer rendered from the sample configurations in ``deploy/`` (the very files
the README shows), each a real process started and reaped through :mod:`testkit`.

Replicas share one assets directory on this machine (one host): the S3 asset store of the
object-storage work slots in as the ``--assets`` of every replica instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import testkit
from testkit import POSTGRES_ENV, free_port, fresh_store_url

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` for the duration (a server spawned meanwhile inherits
    them, e.g. a ``PYTHONPATH`` with a ``sitecustomize``), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def with_path(directory: Path) -> str:
    """``$PYTHONPATH`` with ``directory`` first."""
    return os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)


def render(template: Path, dest: Path, **values: Any) -> Path:
    """``template`` (a ``deploy/`` file) with its ``$placeholders`` filled in, at ``dest``."""
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    dest.write_text(text)
    dest.chmod(0o644)
    return dest


def _wait_port(port: int, proc: subprocess.Popen[Any], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}:\n{log.read_text()}")


class HAProxy:
    """A real HAProxy from ``deploy/haproxy.cfg`` in front of replica ports."""

    def __init__(self, directory: Path, backends: list[int]) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(
            f"    server replica{i} 127.0.0.1:{port} check" for i, port in enumerate(backends)
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.config = render(
            DEPLOY / "haproxy.cfg",
            directory / "haproxy.cfg",
            listen=f"127.0.0.1:{self.port}",
            servers=servers,
        )
        testkit.run([binary, "-c", "-f", str(self.config)], check=True, timeout=30)
        self.log = directory / "haproxy.log"
        with self.log.open("wb") as out:
            # -db: stay in the foreground (testkit owns the process and its group)
            self.proc = testkit.spawn(
                [binary, "-db", "-f", str(self.config)],
                managed=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_port(self.port, self.proc, self.log, "haproxy")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the balancer answers a readiness check through some replica."""

        def ok() -> bool:
            try:
                return requests.get(f"{self.url}/v1/ready", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        testkit.wait_until(ok, timeout, what="a ready replica behind haproxy")

    def close(self) -> None:
        testkit.reap(self.proc, signal.SIGTERM, grace=10)


class PgBouncer:
    """A real pgbouncer in transaction mode from ``deploy/pgbouncer.ini``."""

    def __init__(self, directory: Path, pg_url: str, pool_size: int = 20) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        url = sa.engine.make_url(pg_url)
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)  # read again after it dropped root (below)
        self.config = render(
            DEPLOY / "pgbouncer.ini",
            directory / "pgbouncer.ini",
            port=self.port,
            pg_host=url.host or "127.0.0.1",
            pg_port=url.port or 5432,
            pg_user=url.username or "postgres",
            pool_size=pool_size,
            max_client_conn=1000,
        )
        args = [binary]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root: drop to an unprivileged user
            args += ["-u", _unprivileged_user()]
        args.append(str(self.config))
        self.log = directory / "pgbouncer.log"
        with self.log.open("wb") as out:
            self.proc = testkit.spawn(args, managed=True, stdout=out, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, self.log, "pgbouncer")
        #: ``pg_url`` through pgbouncer, flagged so the store never prepares statements.
        self.url = url.set(port=self.port, query={"pgbouncer": "true"}).render_as_string(
            hide_password=False
        )
        self.raw_url = url.set(port=self.port).render_as_string(hide_password=False)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        testkit.reap(self.proc, signal.SIGTERM, grace=10)


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user to run pgbouncer as")


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL database that the replicas share (this suite needs PostgreSQL)."""
    if not os.environ.get(POSTGRES_ENV):
        pytest.fail(f"the scale-out tests need PostgreSQL: set {POSTGRES_ENV}")
    with fresh_store_url("postgres", tmp_path / "store") as url:
        yield url


@pytest.fixture
def haproxy_factory(tmp_path: Path) -> Iterator[Any]:
    """``haproxy_factory(ports)``: a started :class:`HAProxy` (reaped at teardown)."""
    started: list[HAProxy] = []

    def make(backends: list[int]) -> HAProxy:
        proxy = HAProxy(tmp_path / f"haproxy{len(started)}", backends)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.close()


@pytest.fixture
def pgbouncer_factory(tmp_path: Path) -> Iterator[Any]:
    """``pgbouncer_factory(pg_url)``: a started :class:`PgBouncer` (reaped at teardown)."""
    started: list[PgBouncer] = []

    def make(url: str, pool_size: int = 20) -> PgBouncer:
        bouncer = PgBouncer(tmp_path / f"pgbouncer{len(started)}", url, pool_size)
        started.append(bouncer)
        return bouncer

    yield make
    for bouncer in started:
        bouncer.close()
