"""The store shared by the embedded client and the reference server (needs the ``embedded``
extra: SQLAlchemy). Import it only when the store is really used: the core client does not."""

from __future__ import annotations

from .blobs import BlobStore, LocalBlobStore, open_blob_store
from .core import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_LOST_GRACE,
    DEFAULT_MAX_ASSET_BYTES,
    DEFAULT_UPLOAD_EXPIRY,
    ChunkWriter,
    DatabaseOptions,
    Store,
    make_engine,
)

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_LOST_GRACE",
    "DEFAULT_MAX_ASSET_BYTES",
    "DEFAULT_UPLOAD_EXPIRY",
    "BlobStore",
    "ChunkWriter",
    "DatabaseOptions",
    "LocalBlobStore",
    "Store",
    "make_engine",
    "open_blob_store",
]
