"""The public surface is pinned, and importing the package stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import chronicle_integrations

EXPECTED_ALL = [
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

HEAVY = [
    "torch",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "hydra",
    "fastapi",
    "sqlalchemy",
    "uvicorn",
]


def _modules_after(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter; return the top-level modules it imported."""
    script = (
        code + "\nimport json, sys\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_all_is_pinned() -> None:
    assert chronicle_integrations.__all__ == EXPECTED_ALL
    for name in EXPECTED_ALL:
        assert hasattr(chronicle_integrations, name), name
    assert isinstance(chronicle_integrations.__version__, str)


def test_error_tree() -> None:
    ci = chronicle_integrations
    for name in ("ConfigurationError", "TransportError", "UploadError", "APIError"):
        assert issubclass(getattr(ci, name), ci.ChronicleError)
    codes = {
        "InvalidRequest": "invalid_request",
        "Unauthorized": "unauthorized",
        "Forbidden": "forbidden",
        "RequestTimeout": "request_timeout",
        "NotFound": "not_found",
        "InvalidTransition": "invalid_transition",
        "LeaseConflict": "lease_conflict",
        "AlreadyExists": "already_exists",
        "OffsetMismatch": "offset_mismatch",
        "PayloadTooLarge": "payload_too_large",
        "DigestMismatch": "digest_mismatch",
        "StorageFull": "storage_full",
        "ServerError": "internal",
    }
    for name, code in codes.items():
        cls = getattr(ci, name)
        assert issubclass(cls, ci.APIError)
        assert cls.code == code
    assert issubclass(ci.ProtocolError, ci.TransportError)


def test_import_is_light() -> None:
    loaded = _modules_after("import chronicle_integrations")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_constructing_an_http_client_is_light() -> None:
    loaded = _modules_after(
        "from chronicle_integrations import Chronicle\n"
        "import tempfile\n"
        "c = Chronicle(url='http://127.0.0.1:9', home=tempfile.mkdtemp(), timeout=0.1)\n"
        "c.run('exp', 0, 0)\n"
        "c.close()\n"
    )
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_http_client_never_imports_the_store() -> None:
    """The HTTP client needs only requests: creating an experiment must not load SQLAlchemy."""
    loaded = _modules_after(
        "from chronicle_integrations import Chronicle, TransportError\n"
        "import tempfile\n"
        "c = Chronicle(url='http://127.0.0.1:9', home=tempfile.mkdtemp(), timeout=0.1)\n"
        "try:\n"
        "    c.create_experiment('sweep', [{'lr': 0.1}])\n"
        "except TransportError:\n"
        "    pass\n"
        "c.close()\n"
    )
    assert "sqlalchemy" not in loaded
