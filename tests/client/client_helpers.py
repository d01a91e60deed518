"""Helpers shared by the client suite (imported by the test modules)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chronicle_integrations import Run


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sha256_file(path: str | os.PathLike[str]) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def transitions(run: Run) -> list[tuple[str | None, str]]:
    """The (from, to) edges of a run's timeline."""
    return [(e.from_state, e.to_state) for e in run.events() if e.kind == "transition"]


def write_random(path: Path, size: int, block: int = 1 << 20) -> str:
    """Write ``size`` bytes of real (non-sparse) random-ish data; return its SHA-256."""
    hasher = hashlib.sha256()
    chunk = os.urandom(min(block, size))
    with open(path, "wb") as fh:
        written = 0
        counter = 0
        while written < size:
            # Vary each block a little so equal blocks do not line up with chunk boundaries.
            piece = counter.to_bytes(8, "little") + chunk[8:]
            piece = piece[:size - written]
            fh.write(piece)
            hasher.update(piece)
            written += len(piece)
            counter += 1
    return hasher.hexdigest()
