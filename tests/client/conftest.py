"""Fixtures for the client suite: the same tests run on the embedded store and a real server.

``chronicle`` is parametrized ``["embedded", "http"]``:

* ``embedded``: ``Chronicle(home=tmp_path / "home")`` (SQLite + local assets in-process);
* ``http``: a real server subprocess from ``server_factory`` (``tests/conftest.py``) on a
  loopback port, and ``Chronicle(url=server.url, home=tmp_path / "home")``; the client home
  still holds the upload staging and the spool.

``backend.connect()`` opens further clients on the same store (a second worker, an operator
cancelling a run); every client is closed at teardown.

A module that sets ``ON_S3 = True`` (or a set of test names) also runs those tests on a server
whose assets live in S3 (SeaweedFS, ``s3`` marker): ``backend`` gains the kind ``s3`` and
``http_server`` the variant ``s3`` (its servers get ``--assets s3://<fresh bucket>/assets``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import s3kit

from chronicle_integrations import Chronicle, Run
from chronicle_integrations.client import _direct


def _server_factory(request: pytest.FixtureRequest, name: str = "server_factory") -> Any:
    """The shared ``server_factory`` fixture, or a skip if it does not exist yet."""
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"{name} fixture (tests/conftest.py) is not available")


@pytest.fixture(scope="module")
def shared_server(request: pytest.FixtureRequest) -> Any:
    """One real server per test module for the tests that need no special server: each test
    works in its own experiment, and a server start costs about a second."""
    return _server_factory(request, "module_server_factory")()


@dataclass
class Backend:
    """Where the clients of one test write: the embedded home, or a server."""

    kind: str
    home: Path
    server: Any = None
    clients: list[Chronicle] = field(default_factory=list)

    def connect(self, home: str | os.PathLike[str] | None = None, **kwargs: Any) -> Chronicle:
        """Another client on the same store. Embedded clients share the home (that *is* the
        store); HTTP clients get their own home (staging and spool are per client)."""
        if self.kind == "embedded":
            client = Chronicle(home=home or self.home, **kwargs)
        else:
            home = home or self.home.parent / f"home-{len(self.clients)}"
            client = Chronicle(url=self.server.url, home=home, **kwargs)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in reversed(self.clients):
            client.close(timeout=10)


def _on_s3(metafunc: pytest.Metafunc) -> bool:
    wanted = getattr(metafunc.module, "ON_S3", False)
    return wanted is True or (bool(wanted) and metafunc.function.__name__ in wanted)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    on_s3 = _on_s3(metafunc)
    direct = [pytest.param("s3", marks=pytest.mark.s3)] if on_s3 else []
    proxied = [pytest.param("s3-proxied", marks=pytest.mark.s3)] if on_s3 else []
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", ["embedded", "http", *direct, *proxied], indirect=True)
    elif "http_server" in metafunc.fixturenames and on_s3:
        metafunc.parametrize("http_server", ["local", *proxied], indirect=True)


@pytest.fixture(scope="module")
def shared_s3_server(request: pytest.FixtureRequest) -> Any:
    """Like ``shared_server``, with its assets in a fresh bucket of the session's SeaweedFS
    (direct uploads, the default with S3)."""
    seaweedfs = request.getfixturevalue("seaweedfs")
    factory = _server_factory(request, "module_server_factory")
    bucket = seaweedfs.new_bucket()
    # Small parts (S3's smallest but the last): a 128 MB upload is under way for many parts.
    return factory(**s3kit.server_kwargs(seaweedfs, bucket, "--s3-part-size", str(5 * 2**20)))


@pytest.fixture(scope="module")
def shared_s3_proxied_server(request: pytest.FixtureRequest) -> Any:
    """Like ``shared_s3_server``, with ``--uploads proxied``."""
    seaweedfs = request.getfixturevalue("seaweedfs")
    factory = _server_factory(request, "module_server_factory")
    bucket = seaweedfs.new_bucket()
    return factory(**s3kit.server_kwargs(seaweedfs, bucket, "--uploads", "proxied"))


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A store to test against: ``embedded``, ``http`` (a real server subprocess), ``s3`` (a
    real server on SeaweedFS, direct uploads even of small files) or ``s3-proxied`` (kind
    ``http`` for the helpers)."""
    kind = request.param
    server = None
    if kind == "http":
        server = request.getfixturevalue("shared_server")
    elif kind == "s3":
        server = request.getfixturevalue("shared_s3_server")
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr(_direct, "DIRECT_MIN_BYTES", 1)  # every non-empty file directly
    elif kind == "s3-proxied":
        server = request.getfixturevalue("shared_s3_proxied_server")
    b = Backend("embedded" if kind == "embedded" else "http", tmp_path / "home", server)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def chronicle(backend: Backend) -> Chronicle:
    """The test's main client."""
    return backend.connect(home=backend.home)


@pytest.fixture
def http_server(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``server_factory`` for the HTTP-only tests (skips when it does not exist yet); its
    ``s3`` variant starts servers whose assets live in a fresh SeaweedFS bucket."""
    factory = _server_factory(request)
    if getattr(request, "param", "local") != "s3-proxied":
        return factory
    seaweedfs = request.getfixturevalue("seaweedfs")
    bucket = seaweedfs.new_bucket()

    def start(**kwargs: Any) -> Any:
        s3 = s3kit.server_kwargs(seaweedfs, bucket, "--uploads", "proxied")
        s3["extra_args"] = [*s3["extra_args"], *kwargs.pop("extra_args", ())]
        return factory(**s3, **kwargs)

    return start


@pytest.fixture
def experiment(chronicle: Chronicle) -> str:
    """An experiment with two variations."""
    return chronicle.create_experiment(
        "client-suite", variations=[{"lr": 0.1}, {"lr": 0.01, "bs": 32}]
    )


@pytest.fixture
def run(chronicle: Chronicle, experiment: str) -> Run:
    """A pending run (variation 0, run 0)."""
    return chronicle.create_run(experiment, 0)
