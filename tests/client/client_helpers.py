"""Helpers shared by the client suite (imported by the test modules)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from testkit import sha256_bytes, sha256_file, wait_until

from chronicle_integrations import Run

__all__ = ["sha256_bytes", "sha256_file", "transitions", "wait_until", "write_random"]


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
            piece = piece[: size - written]
            fh.write(piece)
            hasher.update(piece)
            written += len(piece)
            counter += 1
    return hasher.hexdigest()
