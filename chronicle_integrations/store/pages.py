"""Keyset pages of the store's listings: opaque cursors (encoding, checked decoding) and the
cutting of a fetched ``limit + 1`` rows into a :class:`~chronicle_integrations._models.Page`."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _validation as check
from .._errors import InvalidRequest
from .._models import Page

#: A cursor is short (the longest key is an asset name of 1024 characters).
MAX_CURSOR = 4096

_R = TypeVar("_R")


def _encode_cursor(kind: str, key: tuple[Any, ...]) -> str:
    """The opaque cursor after ``key``: URL-safe base64 of ``[kind, *key]`` as JSON. The
    kind makes a cursor of one listing an error on another instead of a silent misread."""
    return _b64(json.dumps([kind, *key], separators=(",", ":"), allow_nan=False).encode())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _cursor_key(cursor: Any, kind: str, *checks: Callable[[Any], Any]) -> list[Any]:
    """The key a cursor of listing ``kind`` holds, each part checked by its ``checks``
    entry (so a forged cursor is a 400 ``invalid_request``, never a SQL error)."""
    refused = InvalidRequest(
        f"invalid cursor {str(cursor)[:64]!r}: pass the next_cursor of the previous page "
        f"of this listing unchanged",
        field="cursor",
    )
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if _b64(raw) != cursor:  # one spelling per key: no padding, no junk
            raise ValueError(cursor)
        value = json.loads(raw, parse_constant=_no_constant)
        if not isinstance(value, list) or len(value) != len(checks) + 1 or value[0] != kind:
            raise ValueError(cursor)
        return [check_part(part) for check_part, part in zip(checks, value[1:], strict=True)]
    except (ValueError, TypeError, InvalidRequest):  # binascii.Error is a ValueError
        raise refused from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(value)
    return float(value)


def _event_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(value)
    return value


def _page(
    items: list[_R],
    limit: int,
    kind: str,
    key: Callable[[_R], tuple[Any, ...]],
    size: Callable[[_R], int] | None = None,
) -> Page[_R]:
    """Cut the ``limit + 1`` items a query fetched into a page: at most ``limit`` items (and,
    with ``size``, at most about ``MAX_PAGE_BYTES``, never fewer than one); the extra item
    only tells that a next page exists, and the cursor holds the last key kept."""
    kept = items[:limit]
    if size is not None:
        total = 0
        for index, item in enumerate(kept):
            total += size(item)
            if total > check.MAX_PAGE_BYTES and index > 0:
                kept = kept[:index]
                break
    more = len(kept) < len(items)
    return Page(kept, _encode_cursor(kind, key(kept[-1])) if more else None)
