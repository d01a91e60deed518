"""Validation of names and numbers, shared by the client (early errors) and the store (the law).

Everything here raises :class:`~chronicle_integrations._errors.InvalidRequest` with a message
that says what was wrong and what is allowed.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from ._errors import InvalidRequest
from .lifecycle import RunState

EXPERIMENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Variation and run numbers are stored as 32-bit signed integers (portable across databases).
MAX_NUMBER = 2**31 - 1
MAX_ASSET_NAME = 1024
MAX_ASSET_SEGMENT = 255
#: ``fail()`` messages are truncated (keeping the end, where a traceback's cause is) to this.
MAX_MESSAGE_BYTES = 64 * 1024
#: A variation config, serialised, may not exceed this.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_NAME = 256
FAIL_REASONS = ("crash", "abandoned")
#: Listings come in pages: this many items when the caller names no ``limit``, at most
#: ``MAX_PAGE_SIZE`` however many it asks for (a page also stops at ``MAX_PAGE_BYTES``).
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
#: About this many bytes of JSON per page at most: a page of runs with 64 KiB failure
#: messages holds fewer runs (always at least one).
MAX_PAGE_BYTES = 4 * 2**20


def experiment_id(value: Any) -> str:
    """Check an experiment id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""
    if not isinstance(value, str) or not EXPERIMENT_ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"invalid experiment_id {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit",
            field="experiment_id",
        )
    return value


def number(value: Any, field: str) -> int:
    """Check a variation or run number: an integer in [0, 2**31 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NUMBER:
        raise InvalidRequest(
            f"invalid {field} {value!r}: must be an integer from 0 to {MAX_NUMBER}", field=field
        )
    return value


def name(value: Any, field: str = "name") -> str:
    """Check a human-readable name (experiment names): non-empty, bounded, no control chars."""
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_NAME
        or any(ord(c) < 32 for c in value)
    ):
        raise InvalidRequest(
            f"invalid {field} {value!r}: 1-{MAX_NAME} printable characters", field=field
        )
    return value


def asset_name(value: Any) -> str:
    """Check an asset name: a relative POSIX path with no ``..``, ``.``, empty segments,
    backslashes, NUL or control characters, at most 1024 characters."""
    problem = None
    if not isinstance(value, str) or not value:
        problem = "must be a non-empty string"
    elif len(value) > MAX_ASSET_NAME:
        problem = f"longer than {MAX_ASSET_NAME} characters"
    elif value.startswith("/"):
        problem = "absolute paths are not allowed"
    elif "\\" in value:
        problem = "backslashes are not allowed (use /)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "control characters (including NUL) are not allowed"
    else:
        for segment in value.split("/"):
            if segment in ("", ".", ".."):
                problem = "empty, '.' and '..' path segments are not allowed"
                break
            if len(segment.encode("utf-8", "surrogatepass")) > MAX_ASSET_SEGMENT:
                problem = f"a path segment is longer than {MAX_ASSET_SEGMENT} bytes"
                break
        else:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                problem = "not valid UTF-8"
    if problem:
        raise InvalidRequest(f"invalid asset name {value!r}: {problem}", field="name")
    return str(value)


def config(value: Any) -> dict[str, Any]:
    """Check a variation config: a JSON object of bounded size."""
    if not isinstance(value, dict):
        raise InvalidRequest("a variation config must be a JSON object (a dict)", field="config")
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"variation config is not JSON-serialisable: {exc}", field="config"
        ) from exc
    if len(encoded) > MAX_CONFIG_BYTES:
        raise InvalidRequest(
            f"variation config is larger than {MAX_CONFIG_BYTES} bytes", field="config"
        )
    return value


def run_state(value: Any) -> RunState:
    """Check a state filter: one of the seven run states (a :class:`RunState` or its value)."""
    try:
        return RunState(value)
    except ValueError:
        raise InvalidRequest(
            f"invalid state {value!r}: one of " + ", ".join(s.value for s in RunState),
            field="state",
        ) from None


def page_limit(value: Any) -> int:
    """Check a listing's page size: ``None`` means the default, else 1 to ``MAX_PAGE_SIZE``."""
    if value is None:
        return DEFAULT_PAGE_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidRequest(
            f"invalid limit {value!r}: must be an integer from 1 to {MAX_PAGE_SIZE}", field="limit"
        )
    return value


def fail_reason(value: Any) -> str:
    """Check a ``fail()`` reason: ``"crash"`` or ``"abandoned"``."""
    if value not in FAIL_REASONS:
        raise InvalidRequest(
            f"invalid reason {value!r}: use 'crash' or 'abandoned'", field="reason"
        )
    return str(value)


def message(value: Any) -> str | None:
    """Bound a ``fail()`` message to 64 KiB, keeping its end (the traceback's last lines)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("message must be a string", field="message")
    data = value.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return value
    tail = data[-(MAX_MESSAGE_BYTES - 64) :].decode("utf-8", "ignore")
    return f"[... {len(data) - len(tail.encode())} bytes truncated ...]\n{tail}"


def token(value: Any, field: str) -> str:
    """Check an opaque client-chosen token (lease, request id, upload id): 8-128 URL-safe chars."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{8,128}", value):
        raise InvalidRequest(f"invalid {field}: 8-128 characters from A-Z a-z 0-9 _ -", field=field)
    return value


def sha256_hex(value: Any) -> str:
    """Check a SHA-256 hex digest (64 lowercase hex characters)."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InvalidRequest("sha256 must be 64 lowercase hex characters", field="sha256")
    return value


def derive_experiment_id(name: str) -> str:
    """An experiment id from a name: a slug plus a random suffix (``lr-sweep-1a2b3c4d``)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:100] or "experiment"
    return f"{slug}-{secrets.token_hex(4)}"


MAX_PROGRESS_KEYS = 16


def progress(value: Any) -> dict[str, Any]:
    """Check heartbeat progress: a small JSON object of names to numbers or short strings."""
    if not isinstance(value, dict) or len(value) > MAX_PROGRESS_KEYS:
        raise InvalidRequest(
            f"progress must be a JSON object with at most {MAX_PROGRESS_KEYS} "
            'keys, e.g. {"step": 120, "epoch": 3}',
            field="progress",
        )
    for key, item in value.items():
        ok_item = (
            isinstance(item, (int, float))
            and not isinstance(item, bool)
            and item == item
            and abs(item) != float("inf")
        ) or (isinstance(item, str) and len(item) <= 64)
        if not isinstance(key, str) or len(key) > 64 or not ok_item:
            raise InvalidRequest(
                f"invalid progress entry {key!r}: {item!r} (names up to 64 "
                "characters, finite numbers or strings up to 64)",
                field="progress",
            )
    return value


#: Events a worker's supervisor may add to a run's timeline (``kind`` -> allowed causes).
#: They never change the run's state: teardown is the executor's act, not a transition.
WORKER_EVENTS: dict[str, tuple[str, ...]] = {
    "teardown": ("teardown_requested", "teardown_done", "teardown_failed"),
    # A managed worker names itself (a local process, a SLURM job) for its executor.
    "worker": ("worker_started",),
}
MAX_EVENT_DETAIL_BYTES = 4096


def worker_event(kind: Any, cause: Any, detail: Any) -> dict[str, Any]:
    """Check a supervisor's event: a known ``kind`` and ``cause`` and a small JSON object."""
    causes = WORKER_EVENTS.get(kind) if isinstance(kind, str) else None
    if causes is None:
        raise InvalidRequest(
            f"invalid event kind {kind!r}: use one of {', '.join(WORKER_EVENTS)}", field="kind"
        )
    if cause not in causes:
        raise InvalidRequest(
            f"invalid cause {cause!r} for a {kind} event: use one of {', '.join(causes)}",
            field="cause",
        )
    detail = {} if detail is None else detail
    if not isinstance(detail, dict):
        raise InvalidRequest("detail must be a JSON object", field="detail")
    try:
        encoded = json.dumps(detail, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"detail is not JSON-serialisable: {exc}", field="detail") from exc
    if len(encoded) > MAX_EVENT_DETAIL_BYTES:
        raise InvalidRequest(
            f"detail is larger than {MAX_EVENT_DETAIL_BYTES} bytes", field="detail"
        )
    return detail
