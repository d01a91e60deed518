"""``serve()`` and ``python -m chronicle_integrations.server``: defaults, the loopback rule,
configuration errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import testkit

from chronicle_integrations._errors import ConfigurationError
from chronicle_integrations.server import serve
from chronicle_integrations.server.runner import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("192.168.0.10", False),
        ("no-such-host.invalid", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_serve_refuses_public_host_without_key(
    host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHRONICLE_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="API key"):
        serve(host=host, port=0, home=tmp_path / "home")
    with pytest.raises(ConfigurationError, match="API key"):
        serve(host=host, port=0, home=tmp_path / "home", api_key="")
    assert not (tmp_path / "home").exists()  # refused before touching anything


def _run_main(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "CHRONICLE_API_KEY"}
    return testkit.run(
        [sys.executable, "-m", "chronicle_integrations.server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def test_main_exits_2_on_public_host_without_key(tmp_path: Path) -> None:
    result = _run_main("--host", "0.0.0.0", "--home", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API key" in lines[0], result.stderr
    assert lines[0].startswith("chronicle server: error:")


def test_main_exits_2_on_bad_settings(tmp_path: Path) -> None:
    result = _run_main("--heartbeat-timeout", "0", "--home", str(tmp_path), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "heartbeat_timeout" in result.stderr
    result = _run_main("--store", "nonsense://", "--home", str(tmp_path), "--port", "0")
    assert result.returncode == 2, result.stderr


def test_main_exits_2_when_the_port_is_taken(server_factory: Any, tmp_path: Path) -> None:
    running = server_factory()
    result = _run_main("--port", str(running.port), "--home", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "could not serve" in result.stderr
    assert requests.get(f"{running.url}/v1/health", timeout=10).status_code == 200


def test_defaults_from_home_and_env_key(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp_path / "home"
    env = dict(os.environ)
    env.update(CHRONICLE_HOME=str(home), CHRONICLE_API_KEY="env-key-123456")
    log = (tmp_path / "log").open("wb")
    proc = testkit.spawn(
        [sys.executable, "-m", "chronicle_integrations.server", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/v1/health", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "log"
                ).read_text()
                time.sleep(0.05)
        assert requests.get(f"{url}/v1/experiments", timeout=10).status_code == 401
        resp = requests.post(
            f"{url}/v1/experiments",
            json={"name": "x"},
            timeout=10,
            headers={"Authorization": "Bearer env-key-123456"},
        )
        assert resp.status_code == 201
        assert (home / "chronicle.db").is_file() and (home / "assets").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    output = (tmp_path / "log").read_text()
    assert f"http://127.0.0.1:{port}" in output
    assert "env-key-123456" not in output
    # A graceful shutdown on SIGTERM (uvicorn then re-raises the signal it caught).
    assert "Application shutdown complete" in output, output
    assert "Traceback" not in output


# ---------------------------------------------------------------------- one set of options
def _options(parser: Any) -> dict[str, tuple[str, Any, Any]]:
    """``--flag`` -> (dest, default, metavar) of every option of ``parser`` but ``--help``."""
    return {
        flag: (action.dest, action.default, action.metavar)
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


def test_both_entry_points_offer_the_same_server_options() -> None:
    import argparse

    from chronicle_integrations.cli import build_parser as cli_parser
    from chronicle_integrations.server.__main__ import build_parser as server_parser

    sub = next(
        a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["server"]
    cli_options, server_options = _options(sub), _options(server_parser())
    assert cli_options == server_options
    assert {"--max-json-bytes", "--max-chunk-bytes", "--max-asset-bytes", "--api-key"} <= set(
        server_options
    )
    # The defaults are the settings module's and serve()'s own (None: serve() applies its own).
    from chronicle_integrations import _config

    assert server_options["--heartbeat-timeout"][1] == _config.DEFAULT_HEARTBEAT_TIMEOUT
    assert server_options["--lost-grace"][1] == _config.DEFAULT_LOST_GRACE
    assert server_options["--stall-timeout"][1] == _config.DEFAULT_STALL_TIMEOUT
    assert server_options["--api-key"][1] is None  # read from $CHRONICLE_API_KEY, not argv


def test_main_rejects_bad_values_before_touching_the_home(tmp_path: Path) -> None:
    for option, value in [
        ("--upload-expiry", "0"),
        ("--lost-grace", "-5"),
        ("--max-json-bytes", "0"),
        ("--upload-min-rate", "nan"),
        ("--max-asset-bytes", "-1"),
    ]:
        home = tmp_path / option.strip("-")
        result = _run_main(option, value, "--home", str(home), "--port", "0")
        assert result.returncode == 2, (option, result.stderr)
        assert option.strip("-").replace("-", "_") in result.stderr.splitlines()[-1]
        assert not home.exists(), option  # a usage error: nothing was created
