"""Fixtures for the server tests: a real server per module and backend, and a small HTTP helper.

Tests share a module's server; each creates its own experiments (unique ids), so they do not
interfere. Servers that need special settings (short watchdog timeouts, an API key, small body
limits) are started by the modules that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from server_helpers import Api


@pytest.fixture(scope="module")
def server(module_server_factory: Any, module_store_url: str) -> Iterator[Any]:
    """A default server (no API key, production timeouts) on this module's store."""
    process = module_server_factory(store_url=module_store_url)
    yield process
    process.stop()


@pytest.fixture
def api(server: Any) -> Iterator[Api]:
    client = Api(server.url)
    yield client
    client.close()
