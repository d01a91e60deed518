"""Reading the server's answers for the HTTP transport: bounded, and decoded into the
error tree (an answer of the wrong shape is a :class:`ProtocolError`, never a bare
``TypeError``; a foreign answer, e.g. a proxy's HTML page, is told from a cut one).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import requests

from .._errors import ProtocolError

#: The largest answer a JSON call reads: far above any Chronicle answer, far below what would
#: hurt a training process; beyond it the answer is a :class:`ProtocolError`.
MAX_ANSWER_BYTES = 16 * 2**20

#: What decoding an answer of the wrong shape raises (``{}``, a list, an unknown state).
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Close the decoding of an answer over the error tree: an answer of the wrong shape
    becomes one :class:`ProtocolError`, never a bare ``TypeError`` from deep inside."""
    try:
        yield
    except _SHAPE_ERRORS as exc:
        raise ProtocolError(
            f"the server's answer to {what} is not a Chronicle answer "
            f"({type(exc).__name__}: {exc}); is the URL a Chronicle server of this version?"
        ) from exc


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _answer(method: _Method) -> _Method:
    """Decorate a transport method whose result is decoded from a JSON answer."""

    @functools.wraps(method)
    def decoded(*args: Any, **kwargs: Any) -> Any:
        with _reading(method.__name__.lstrip("_")):
            return method(*args, **kwargs)

    return cast("_Method", decoded)


def _read_capped(response: requests.Response, method: str, url: str) -> None:
    """Read a streamed answer's body into ``response`` (``.content`` and ``.json()`` then
    work as usual), refusing one larger than :data:`MAX_ANSWER_BYTES`."""
    declared = response.headers.get("Content-Length", "")
    too_large = declared.isdigit() and int(declared) > MAX_ANSWER_BYTES
    parts: list[bytes] = []
    read = 0
    if not too_large:
        for block in response.iter_content(64 * 1024):
            read += len(block)
            if read > MAX_ANSWER_BYTES:
                too_large = True
                break
            parts.append(block)
    if too_large:
        response.close()
        raise ProtocolError(
            f"{method} {url}: the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB, "
            "which no Chronicle answer is; refused unread"
        )
    response._content = b"".join(parts)  # what requests itself does when it reads a body


def _snippet(response: requests.Response) -> str:
    kind = response.headers.get("Content-Type", "no content type").split(";")[0]
    text = response.content[:80].decode("utf-8", "replace")
    return f"{kind}: {text!r}"


def _looks_cut(response: requests.Response) -> bool:
    """True when an unreadable body is a JSON answer that did not arrive whole (the
    connection was cut), rather than a foreign one (a proxy's HTML error page)."""
    kind = response.headers.get("Content-Type", "")
    try:
        empty = not response.content
    except (requests.RequestException, RuntimeError):
        return True  # reading it failed: cut
    return empty or kind.startswith("application/json")


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except (ValueError, requests.RequestException, RuntimeError):
        return None
