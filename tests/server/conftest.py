"""Fixtures for the server tests: a real server per module and backend, and a small HTTP helper.

Tests share a module's server; each creates its own experiments (unique ids), so they do not
interfere. Servers that need special settings (short watchdog timeouts, an API key, small body
limits) are started by the modules that need them.

A module that sets ``ON_S3 = True`` runs its tests that use ``server`` twice more per backend:
``server_assets`` ``local`` (a directory) and ``s3`` (a fresh bucket of the session's
SeaweedFS, ``s3`` marker).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import s3kit
from server_helpers import Api


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames and getattr(metafunc.module, "ON_S3", False):
        kinds = ["local", pytest.param("s3", marks=pytest.mark.s3)]
        metafunc.parametrize("server_assets", kinds, indirect=True, scope="module")


@pytest.fixture(scope="module")
def server_assets(request: pytest.FixtureRequest) -> str:
    """Where the module server keeps its assets: ``local`` (default) or ``s3``."""
    return str(getattr(request, "param", "local"))


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest,
    module_server_factory: Any,
    module_store_url: str,
    server_assets: str,
) -> Iterator[Any]:
    """A default server (no API key, production timeouts) on this module's store."""
    extra: dict[str, Any] = {}
    if server_assets == "s3":
        seaweedfs = request.getfixturevalue("seaweedfs")
        extra = s3kit.server_kwargs(seaweedfs, seaweedfs.new_bucket())
    process = module_server_factory(store_url=module_store_url, **extra)
    yield process
    process.stop()


@pytest.fixture
def api(server: Any) -> Iterator[Api]:
    client = Api(server.url)
    yield client
    client.close()
