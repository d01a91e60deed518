"""Helpers every test suite shares (imported as ``testkit``: ``tests/`` is on ``sys.path``
because ``tests/conftest.py`` lives there; test directories are not packages).

* :func:`free_port` / :func:`fresh_store_url`: a loopback port, an empty store (SQLite file or
  a PostgreSQL database created and dropped; ``tests/conftest.py``'s fixtures use them);
* :func:`wait_until`: poll a condition with a deadline that names what was awaited;
* :func:`sha256_file` / :func:`sha256_bytes`: digests to compare assets with;
* :class:`HttpApi`: raw ``requests`` against one server (the suites add their shortcuts);
* :func:`assert_error`: an error answer with the standard body and a stable code;
* :func:`spawn` / :func:`reap` / :func:`run`: every process a test starts lives in a session of
  its own and is killed with its whole tree (DDP ranks, Hydra's submitit children, servers a CLI
  started); :func:`reap_all` is the suite's last net for what a test did not reap itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import requests


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it is truthy and return its value; AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sha256_file(path: str | os.PathLike[str]) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HttpApi:
    """``requests`` against one server (with its API key when given): the raw verbs and
    :meth:`ok`. A context manager that closes its session."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> HttpApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, json=json, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        """The decoded JSON of an answer that must have ``status``."""
        resp = self.request(method, path, **kwargs)
        assert resp.status_code == status, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()


def assert_error(
    resp: requests.Response, status: int | tuple[int, ...], code: str | None = None
) -> dict[str, Any]:
    """An error answer: one of ``status``, JSON, exactly ``{"error": {...}}`` with a message
    and (when given) ``code``. Returns the ``error`` object."""
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, (
        f"expected {statuses} {code or ''}, got {resp.status_code}: {resp.text[:500]}"
    )
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


# ------------------------------------------------------------------------------- ports, stores
#: The PostgreSQL server the suite creates its databases on (PostgreSQL tests skip without it).
POSTGRES_ENV = "CHRONICLE_TEST_POSTGRES_URL"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def fresh_store_url(kind: str, directory: Path) -> Iterator[str]:
    """A SQLAlchemy URL of an empty store: a SQLite file in ``directory``, or a new PostgreSQL
    database created via ``$CHRONICLE_TEST_POSTGRES_URL`` and dropped on exit."""
    if kind == "sqlite":
        directory.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{directory / 'chronicle.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        import pytest

        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        )
    import sqlalchemy as sa

    admin_url = sa.engine.make_url(base)
    if admin_url.drivername == "postgresql":
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    name = f"chronicle_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


# ------------------------------------------------------------------------------- processes
#: Every process :func:`spawn` started that may still be alive (a weak set: reaped ones go).
_SPAWNED: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()
#: Those an owner outlives a test with (module-scoped servers): reaped by their owner.
_MANAGED: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()


def spawn(args: Sequence[str], managed: bool = False, **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` in a new session (so its process group is its whole tree, whatever
    it forks) and registered for :func:`reap_all`. Stop it with :func:`reap`. ``managed``: an
    owner object (a fixture's server) reaps it, possibly after the test that started it."""
    kwargs["start_new_session"] = True
    proc: subprocess.Popen[Any] = subprocess.Popen(list(args), **kwargs)
    _SPAWNED.add(proc)
    if managed:
        _MANAGED.add(proc)
    return proc


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reap(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
    """Stop ``proc`` and every process of its group: ``sig`` to the group, ``grace`` seconds,
    then SIGKILL to the group. The group is signalled even when the leader already exited, since
    its children (a hung DDP rank, say) may live on. Returns the leader's exit code."""
    pgid = proc.pid  # spawn() made the leader a session (and group) leader
    if proc.poll() is None or _signal_group(pgid, 0):
        _signal_group(pgid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _signal_group(pgid, 0):
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.1)
            else:
                time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    _SPAWNED.discard(proc)
    return proc.returncode


def run(
    args: Sequence[str],
    *,
    timeout: float = 300.0,
    check: bool = False,
    input: str | bytes | None = None,
    capture_output: bool = False,
    text: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` whose child runs in its own session and whose whole tree is killed
    when it times out or the test is interrupted (``subprocess.run`` kills only the child)."""
    if capture_output:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    proc = spawn(args, text=text, **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        reap(proc, signal.SIGKILL, grace=0)
        raise
    # The leader ended; anything it left in its group (a daemonised server, a stray rank) goes.
    reap(proc, signal.SIGKILL, grace=0)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def reap_all() -> list[int]:
    """Kill every spawned process group still alive; return the leaders' pids (leaks)."""
    leaked = []
    for proc in list(_SPAWNED):
        if proc.poll() is None or _signal_group(proc.pid, 0):
            leaked.append(proc.pid)
        reap(proc, signal.SIGKILL, grace=0)
    return leaked


def seed_runs(
    store: Any, experiments: int, variations: int, runs: int, prefix: str = "seed"
) -> list[tuple[str, int, int]]:
    """``experiments * variations * runs`` pending runs, created in bulk for the listing
    tests: experiments through the store, runs with one multi-row ``INSERT`` through its own
    engine and schema (creating thousands one by one would dominate the tests' time). The
    variations' run counters are set, so ``create_run`` continues after them. Returns the
    keys in listing order (ids ``prefix-000``, ``prefix-001``... sort the same everywhere)."""
    from chronicle_integrations.store import schema as t

    ids = [f"{prefix}-{i:03d}" for i in range(experiments)]
    for eid in ids:
        store.create_experiment(eid, [{"v": v} for v in range(variations)], eid)
    keys = [(e, v, r) for e in ids for v in range(variations) for r in range(runs)]
    now = store.clock()
    with store.engine.begin() as conn:
        conn.execute(
            t.runs.insert(),
            [
                {
                    "experiment_id": e,
                    "variation": v,
                    "run": r,
                    "state": "pending",
                    "created_at": now,
                }
                for e, v, r in keys
            ],
        )
        conn.execute(
            t.variations.update().where(t.variations.c.experiment_id.in_(ids)).values(next_run=runs)
        )
    return keys


# ------------------------------------------------------------------------------- bounded calls
@dataclasses.dataclass
class Outcome:
    """What a call run by :func:`bounded_call` did: ``finished`` in time, with ``value`` or
    ``error``."""

    finished: bool
    value: Any = None
    error: BaseException | None = None


def bounded_call(fn: Callable[[], Any], timeout: float) -> Outcome:
    """Run ``fn`` on a daemon thread and wait at most ``timeout`` seconds for it: a call that
    hangs fails the test instead of hanging it (the thread ends with the peer's sockets)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return Outcome(False)
    return Outcome(True, box.get("value"), box.get("error"))
