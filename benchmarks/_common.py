"""Helpers shared by the benchmark scripts (run under the project venv *and* the peers venv:
imports nothing from chronicle_integrations at module level)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = Path(os.environ.get("BENCH_WORK", HERE / ".work"))
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
PEERS_PY = HERE / ".peers-venv" / "bin" / "python"
#: 1/5/15-minute load averages when the script started (quoted in BENCHMARKS.md).
LOAD_AT_START = os.getloadavg()


def peers_ready() -> bool:
    """benchmarks/setup_peers.sh completed."""
    return (HERE / ".peers-venv" / ".complete-v2").exists()


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and count (what BENCHMARKS.md quotes)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def versions(*names: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def machine() -> dict[str, Any]:
    """nproc, memory, disk, load, python: recorded with every result."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }
    try:
        import psutil

        info["mem_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    WORK.mkdir(parents=True, exist_ok=True)
    du = shutil.disk_usage(WORK)
    info["disk"] = {
        "path": str(WORK),
        "total_gib": round(du.total / 2**30),
        "free_gib": round(du.free / 2**30),
    }
    with contextlib.suppress(Exception):
        dev = (
            subprocess.run(
                ["df", "--output=source,fstype", str(WORK)], capture_output=True, text=True
            )
            .stdout.splitlines()[-1]
            .split()
        )
        info["disk"]["device"], info["disk"]["fstype"] = dev[0], dev[1]
    with contextlib.suppress(Exception), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def save(name: str, data: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` (with the machine facts) and print a summary line."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "name": name,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "load_at_start": LOAD_AT_START,
        "machine": machine(),
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Server:
    """A server subprocess on a free loopback port; stopped (by its own pid) on exit."""

    def __init__(
        self,
        argv: list[str],
        health_path: str,
        port: int,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            wait_http(self.url + health_path, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The server process and its children (MLflow's uvicorn/gunicorn workers)."""
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # its own session: only what it started
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The PostgreSQL server the PostgreSQL figures use (each in a scratch database of its own).
PG_ADMIN = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def scratch_postgres(name: str) -> Any:
    """A fresh database ``chronicle_bench_<name>_<pid>`` on ``PG_ADMIN``'s server; yields its
    URL and drops it afterwards (whatever still holds connections to it)."""
    import sqlalchemy as sa

    dbname = f"chronicle_bench_{name}_{os.getpid()}"
    admin = sa.create_engine(
        PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{dbname}"'))
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + dbname
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()


def chronicle_server(
    store_url: str,
    assets: Path,
    log: Path,
    port: int | None = None,
    extra: list[str] | None = None,
    patches: str = "",
) -> Server:
    """``python -m chronicle_integrations.server``; with ``patches``, benchmarks/
    patched_server.py (a proposed fix applied by monkeypatching, see that file)."""
    port = port or free_port()
    entry = (
        ["-m", "chronicle_integrations.server"]
        if not patches
        else [str(HERE / "patched_server.py")]
    )
    argv = [
        str(PROJECT_PY),
        *entry,
        "--port",
        str(port),
        "--store",
        store_url,
        "--assets",
        str(assets),
        "--log-level",
        "warning",
        *(extra or []),
    ]
    return Server(argv, "/openapi.json", port, log, env={"BENCH_PATCHES": patches})


def mlflow_server(
    backend: str, artifacts: Path, log: Path, port: int | None = None, workers: int | None = None
) -> Server:
    """``mlflow server --serve-artifacts`` from the peers venv."""
    port = port or free_port()
    argv = [
        str(HERE / ".peers-venv" / "bin" / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
    ]
    if workers:
        argv += ["--workers", str(workers)]
    return Server(argv, "/health", port, log, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


class RssSampler:
    """Peak RSS of some processes, sampled every ``interval`` seconds on a thread."""

    def __init__(self, pids: dict[str, list[int]], interval: float = 0.02) -> None:
        import psutil

        self._procs = {k: [psutil.Process(p) for p in v] for k, v in pids.items()}
        self.interval = interval
        self.base = self._sample()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> dict[str, int]:
        out = {}
        for key, procs in self._procs.items():
            total = 0
            for p in procs:
                with contextlib.suppress(Exception):
                    total += p.memory_info().rss
            out[key] = total
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for k, v in self._sample().items():
                if v > self.peak[k]:
                    self.peak[k] = v

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mib(self) -> dict[str, float]:
        return {k: (self.peak[k] - self.base[k]) / 2**20 for k in self.base}


def make_file(path: Path, size: int) -> Path:
    """A file of incompressible bytes (made once, reused across the run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == size:
        return path
    block = os.urandom(16 << 20)
    with open(path + ".tmp" if isinstance(path, str) else path.with_suffix(".tmp"), "wb") as fh:
        left = size
        i = 0
        while left > 0:
            # vary each block so no dedup/compression can help
            chunk = (i.to_bytes(8, "little") + block[8:])[:left]
            fh.write(chunk)
            left -= len(chunk)
            i += 1
    path.with_suffix(".tmp").replace(path)
    return path


def drop_file_cache(path: Path) -> None:
    """Evict one file from the page cache (posix_fadvise), after syncing it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def load1() -> float:
    return os.getloadavg()[0]
