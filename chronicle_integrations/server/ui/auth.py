"""Who may see the web view, decided in the request guard (``middleware.py``), in one place.

A browser cannot send ``Authorization: Bearer`` when it follows a link, so a server with an
API key offers a login form: ``POST /ui/login`` with the key in the form body (never in a
URL) answers with a session cookie, ``HttpOnly`` (page scripts cannot read it),
``SameSite=Strict`` (no other site's page makes the browser send it), ``Secure`` over HTTPS.
The cookie does not hold the key: it is ``<expiry>.<HMAC-SHA256(key, expiry)>``, so it
expires by itself (:data:`SESSION_SECONDS`), every replica sharing the key accepts it without
shared state, and changing the key ends every session.

The cookie authorises reads only (``GET`` and ``HEAD``: the pages, and the ``/v1`` reads the
pages link to, such as asset downloads); every change still needs the bearer key. Without an
API key (a loopback-only server) the view is open like the API, behind the guard's ``Host``
and ``Origin`` checks.

Every answer under ``/ui`` carries :data:`SECURITY_HEADERS`: a Content-Security-Policy that
allows only the server's own style sheet and script (no inline script, no inline style, no
other origin), no framing, no referrer to other sites, no MIME sniffing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote

from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

__all__ = [
    "COOKIE_NAME",
    "CSP",
    "LOGIN_PATH",
    "SECURITY_HEADERS",
    "SESSION_SECONDS",
    "UiAuth",
    "is_ui_path",
]

COOKIE_NAME = "chronicle_session"
#: How long a login lasts.
SESSION_SECONDS = 12 * 3600
LOGIN_PATH = "/ui/login"
LOGOUT_PATH = "/ui/logout"
STATIC_PREFIX = "/ui/static/"
#: The login form's body is a key and a path: anything larger is refused unread.
MAX_FORM_BYTES = 8192

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    # (same-origin, not no-referrer: with no-referrer the browser sends "Origin: null"
    # on the login form, which the cross-site check must then refuse)
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]

_NEXT = re.compile(r"/ui(?:/[A-Za-z0-9._~%/-]*)?(?:\?[A-Za-z0-9._~%&=+-]*)?")


def is_ui_path(path: str) -> bool:
    """The web view's paths: ``/`` (a redirect to it) and everything under ``/ui``."""
    return path in ("/", "/ui") or path.startswith("/ui/")


def safe_next(value: str | None) -> str:
    """Where to go after the login: a path of the view, else the view's front page (no
    open redirect to another site, no scheme, no ``//host``)."""
    if value and _NEXT.fullmatch(value) and "//" not in value:
        return value
    return "/ui"


class UiAuth:
    """The web view's part of the guard: sessions for a server with an API key."""

    def __init__(self, api_key: bytes | None, clock: Callable[[], float] = time.time) -> None:
        self.api_key = api_key
        self.clock = clock

    # ------------------------------------------------------------------ sessions
    def issue(self) -> str:
        """A new session token (``<expiry>.<mac>``)."""
        expiry = str(int(self.clock()) + SESSION_SECONDS)
        return f"{expiry}.{self._mac(expiry)}"

    def valid(self, token: str | None) -> bool:
        """True for a token :meth:`issue` made with this key that has not expired."""
        if self.api_key is None or not token:
            return False
        expiry, _, mac = token.partition(".")
        if not expiry.isdigit() or len(expiry) > 12:
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(expiry).encode()):
            return False
        return int(expiry) > self.clock()

    def _mac(self, expiry: str) -> str:
        assert self.api_key is not None
        message = b"chronicle-ui:" + expiry.encode()
        return hmac.new(self.api_key, message, hashlib.sha256).hexdigest()

    def has_session(self, method: str, headers: dict[bytes, bytes]) -> bool:
        """True for a read (``GET``/``HEAD``) carrying a valid session cookie."""
        if method not in ("GET", "HEAD"):
            return False
        raw = headers.get(b"cookie")
        if not raw:
            return False
        cookies = SimpleCookie()
        try:
            cookies.load(raw.decode("latin-1"))
        except Exception:  # (http.cookies.CookieError) a malformed header is no session
            return False
        morsel = cookies.get(COOKIE_NAME)
        return morsel is not None and self.valid(morsel.value)

    # ------------------------------------------------------------------ the guard's hook
    async def admit(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        bearer_ok: bool,
    ) -> bool:
        """Decide a request for a view path: True lets it through to the routes; False means
        it was answered here (a login, a logout, a redirect to the login form, a 401)."""
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "POST" and path == LOGIN_PATH:
            await self._login(scope, receive, send, headers)
            return False
        if method == "POST" and path == LOGOUT_PATH:
            await _redirect(send, LOGIN_PATH, self._cookie(scope, "", 0))
            return False
        if self.api_key is None or bearer_ok or self.has_session(method, headers):
            return True
        if method in ("GET", "HEAD") and (
            path in ("/", LOGIN_PATH) or path.startswith(STATIC_PREFIX)
        ):
            return True  # the front door, the form and its style sheet hold no data
        if method in ("GET", "HEAD"):
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            await _redirect(send, f"{LOGIN_PATH}?next={quote(safe_next(target), safe='')}")
            return False
        await _plain(send, 401, b"log in first: POST /ui/login")
        return False

    async def _login(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]
    ) -> None:
        origin = headers.get(b"origin")
        host = headers.get(b"host", b"")
        if origin is not None and origin.split(b"://", 1)[-1] != host:
            await _plain(send, 403, b"cross-site login refused")
            return
        body = await _read_form(receive)
        if body is None:
            await _plain(send, 413, b"the login form is larger than expected")
            return
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        goal = safe_next((form.get("next") or [""])[0])
        if self.api_key is None:
            await _redirect(send, goal)  # nothing to log into
            return
        given = (form.get("key") or [""])[0].strip().encode("utf-8")
        if not hmac.compare_digest(given, self.api_key):
            await _redirect(send, f"{LOGIN_PATH}?failed=1&next={quote(goal, safe='')}")
            return
        await _redirect(send, goal, self._cookie(scope, self.issue(), SESSION_SECONDS))

    @staticmethod
    def _cookie(scope: Scope, value: str, max_age: int) -> bytes:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        return (
            f"{COOKIE_NAME}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
        ).encode()


def with_security_headers(send: Send) -> Send:
    """``send`` that adds :data:`SECURITY_HEADERS` to the response's head."""

    async def secured(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return secured


async def _read_form(receive: Receive) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _redirect(send: Send, location: str, cookie: bytes | None = None) -> None:
    headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0")]
    if cookie is not None:
        headers.append((b"set-cookie", cookie))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _plain(send: Send, status: int, text: bytes) -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(text)).encode()),
    ]
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})
