"""The error tree shared by the client, the store and the server.

::

    ChronicleError
     ├── ConfigurationError        bad settings or a missing optional dependency (client side)
     ├── TransportError            the server could not be reached within the retry budget
     │    └── ProtocolError         an answer that is no Chronicle answer: malformed, too
     │                              large, a redirect, a proxy's page (kept for ``sync``)
     ├── UploadError               an asset upload finally failed (the staged copy is kept)
     └── APIError                  the store refused a request; has a stable ``code``
          ├── InvalidRequest        invalid_request      400  bad names, JSON, numbers
          │    └── InvalidMetric    invalid_request      400  a metric name or value refused
          ├── Unauthorized          unauthorized         401  missing or wrong API key
          ├── Forbidden             forbidden            403  a keyless server refused a
          │                                                   foreign Host or a web page's Origin
          ├── NotFound              not_found            404  unknown experiment/variation/run
          ├── InvalidTransition     invalid_transition   409  not allowed from the run's state
          ├── LeaseConflict         lease_conflict       409  another worker holds the run
          ├── AlreadyExists         already_exists       409  experiment id taken
          ├── OffsetMismatch        offset_mismatch      409  upload chunk at the wrong offset
          ├── RequestTimeout        request_timeout      408  upload chunk body stalled (or
          │                                                   stopped by a shutdown)
          ├── PayloadTooLarge       payload_too_large    413  body over the server's limit
          ├── DigestMismatch        digest_mismatch      422  upload content != declared SHA-256
          ├── StorageFull           storage_full         507  the asset store ran out of space
          ├── Unavailable           unavailable          503  this replica's database does not
          │                                                   answer, or it is shutting down
          │                                                   (readiness check)
          └── ServerError           internal             500  a bug: please report it

The server sends ``{"error": {"code": ..., "message": ..., **details}}`` with the status above;
:func:`error_from_body` rebuilds the same class on the client, so code that catches
``LeaseConflict`` works identically against the embedded store and a remote server.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "APIError",
    "AlreadyExists",
    "ChronicleError",
    "ConfigurationError",
    "DigestMismatch",
    "Forbidden",
    "InvalidMetric",
    "InvalidRequest",
    "InvalidTransition",
    "LeaseConflict",
    "NotFound",
    "OffsetMismatch",
    "PayloadTooLarge",
    "ProtocolError",
    "RequestTimeout",
    "ServerError",
    "StorageFull",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "UploadError",
    "chronicle_error",
    "error_from_body",
]


class ChronicleError(Exception):
    """Root of every error raised by chronicle_integrations."""


class ConfigurationError(ChronicleError):
    """Invalid configuration, or an optional dependency that is not installed."""


class TransportError(ChronicleError):
    """The server could not be reached (or kept failing) within the retry budget."""


class ProtocolError(TransportError):
    """The server's answer could not be understood: not JSON, not the shape this client
    expects, larger than any Chronicle answer, a redirect, or an error page without a
    Chronicle error code (a proxy's, or another web server's). A :class:`TransportError`:
    a terminal transition that met one is spooled for ``chronicle sync``, not lost."""


class UploadError(ChronicleError):
    """An asset upload failed for good. ``staged_path`` is kept for ``chronicle sync``."""

    def __init__(
        self, message: str, *, name: str | None = None, staged_path: str | None = None
    ) -> None:
        super().__init__(message)
        self.name = name
        self.staged_path = staged_path


class SourceChanged(UploadError):
    """The file being uploaded was rewritten in place meanwhile (internal: the upload worker
    then captures a complete later version instead of publishing a torn one)."""


class APIError(ChronicleError):
    """The store refused a request. ``code`` is stable; ``details`` carries structured context."""

    code: ClassVar[str] = "api_error"
    status: ClassVar[int] = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_body(self) -> dict[str, Any]:
        """The JSON error body the server sends for this error."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return {"error": body}

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (ddp_spawn, spool)
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls: type[APIError], message: str, details: dict[str, Any]) -> APIError:
    return cls(message, **details)


class InvalidRequest(APIError):
    """The request is malformed: a bad name, a bad number, malformed JSON, a missing field."""

    code = "invalid_request"
    status = 400


#: ``details["reason"]`` of the :class:`InvalidRequest` that completes an upload whose store
#: holds fewer bytes than declared (``details["offset"]``: what it holds): the client sends
#: the rest again instead of giving up (a replica that held the tail may have died).
INCOMPLETE = "incomplete"

#: ``details["reason"]`` of an answer a replica gives because it is shutting down: 503
#: :class:`Unavailable` from its readiness check (send new work elsewhere), 408
#: :class:`RequestTimeout` for an upload chunk it stopped (resume at ``details["offset"]``).
SHUTTING_DOWN = "shutting_down"


class InvalidMetric(InvalidRequest):
    """A metric was refused: a value that is not a number, an invalid name, more names than
    a run may have (64), or a bad objective / checkpoint record. Raised at once by
    ``run.log_metrics``; the store's refusal (``invalid_request`` with ``field`` =
    ``metrics``, ``checkpoints``, ``objective`` or ``mode``) comes back as this class too."""


#: The ``field`` of an ``invalid_request`` that makes it an :class:`InvalidMetric`.
METRIC_FIELDS = ("metrics", "checkpoints", "objective", "mode")


class Unauthorized(APIError):
    """The API key is missing or wrong."""

    code = "unauthorized"
    status = 401


class Forbidden(APIError):
    """A server without an API key refused a request that did not come from this machine's
    own clients: a ``Host`` that is not its loopback name (DNS rebinding) or a cross-site
    ``Origin`` (a web page)."""

    code = "forbidden"
    status = 403


class NotFound(APIError):
    """The experiment, variation, run, asset or upload does not exist."""

    code = "not_found"
    status = 404


class InvalidTransition(APIError):
    """The transition is not allowed from the run's current state (``details["state"]``)."""

    code = "invalid_transition"
    status = 409

    @property
    def state(self) -> str | None:
        """The run's state when the transition was refused."""
        value = self.details.get("state")
        return str(value) if value is not None else None


class LeaseConflict(APIError):
    """The run is held under another lease: another worker started or resumed it."""

    code = "lease_conflict"
    status = 409


class AlreadyExists(APIError):
    """An experiment with that id exists with a different definition."""

    code = "already_exists"
    status = 409


class OffsetMismatch(APIError):
    """An upload chunk was sent at the wrong offset; ``details["offset"]`` is the right one."""

    code = "offset_mismatch"
    status = 409


class RequestTimeout(APIError):
    """An upload chunk's body went silent (or too slow) and was abandoned, or did not arrive
    before its server shut down (``details["reason"]`` :data:`SHUTTING_DOWN`); the bytes
    received were kept: resume at ``details["offset"]``."""

    code = "request_timeout"
    status = 408


class PayloadTooLarge(APIError):
    """The request body exceeds the server's limit."""

    code = "payload_too_large"
    status = 413


class DigestMismatch(APIError):
    """The uploaded bytes do not hash to the declared SHA-256; nothing was stored."""

    code = "digest_mismatch"
    status = 422


class StorageFull(APIError):
    """The asset store ran out of space; the upload can resume once space is freed."""

    code = "storage_full"
    status = 507


class Unavailable(APIError):
    """The server cannot serve now (its database or its object store does not answer, or it
    is shutting down: ``details["reason"]`` :data:`SHUTTING_DOWN`): try another replica, or
    again later. The readiness check's answer (``GET /v1/ready``); uploads wait it out."""

    code = "unavailable"
    status = 503


class ServerError(APIError):
    """An unexpected server-side failure (a bug, or an outage the retries did not outlast)."""

    code = "internal"
    status = 500


_BY_CODE: dict[str, type[APIError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        InvalidTransition,
        LeaseConflict,
        AlreadyExists,
        OffsetMismatch,
        RequestTimeout,
        PayloadTooLarge,
        DigestMismatch,
        StorageFull,
        Unavailable,
        ServerError,
    )
}


def chronicle_error(status: int, body: Any) -> APIError | None:
    """The typed error of an answer that carries a Chronicle error code
    (``{"error": {"code": "...", ...}}``), or None for any other body: a proxy's HTML page or
    a foreign server's JSON is not the store's verdict and must never be taken as final."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("code"), str) or not err["code"]:
        return None
    return error_from_body(status, body)


def error_from_body(status: int, body: Any) -> APIError:
    """Rebuild the typed error from a server response (status and decoded JSON body)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        cls: type[APIError] = ServerError if status >= 500 else InvalidRequest
        return cls(f"HTTP {status} with an unexpected body: {str(body)[:200]!r}", status=status)
    details = {k: v for k, v in err.items() if k not in ("code", "message")}
    code = str(err.get("code", ""))
    cls = _BY_CODE.get(code, ServerError if status >= 500 else InvalidRequest)
    if cls is InvalidRequest and details.get("field") in METRIC_FIELDS:
        cls = InvalidMetric
    return cls(str(err.get("message", code)), **details)
