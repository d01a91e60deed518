"""chronicle-integrations: a truthful run lifecycle for ML training.

Example::

    from chronicle_integrations import Chronicle

    with Chronicle() as chronicle:       # $CHRONICLE_URL, else the embedded store in ./chronicle
        exp = chronicle.create_experiment("lr-sweep", variations=[{"lr": 0.1}])
        with chronicle.create_run(exp, 0).start() as run:
            run.upload_asset("model.ckpt")

Importing this package imports no ML framework, no web framework and no SQL library: the
embedded store, the server and the integrations are loaded only when used.
"""

from __future__ import annotations

from ._errors import (
    AlreadyExists,
    APIError,
    ChronicleError,
    ConfigurationError,
    DigestMismatch,
    Forbidden,
    InvalidRequest,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    OffsetMismatch,
    PayloadTooLarge,
    ProtocolError,
    RequestTimeout,
    ServerError,
    StorageFull,
    TransportError,
    Unauthorized,
    UploadError,
)
from ._models import AssetInfo, Event, ExperimentInfo, RunInfo
from ._version import __version__
from .client import Chronicle, Run
from .client._heartbeat import KeepAlive
from .client._spool import SyncReport
from .client._uploads import UploadHandle
from .lifecycle import RunState

__all__ = [
    "APIError",
    "AlreadyExists",
    "AssetInfo",
    "Chronicle",
    "ChronicleError",
    "ConfigurationError",
    "DigestMismatch",
    "Event",
    "ExperimentInfo",
    "Forbidden",
    "InvalidRequest",
    "InvalidTransition",
    "KeepAlive",
    "LeaseConflict",
    "NotFound",
    "OffsetMismatch",
    "PayloadTooLarge",
    "ProtocolError",
    "RequestTimeout",
    "Run",
    "RunInfo",
    "RunState",
    "ServerError",
    "StorageFull",
    "SyncReport",
    "TransportError",
    "Unauthorized",
    "UploadError",
    "UploadHandle",
    "__version__",
]
