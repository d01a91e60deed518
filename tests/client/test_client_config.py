"""How ``Chronicle()`` picks its store: arguments, then ``$CHRONICLE_URL`` / ``$CHRONICLE_HOME``
/ ``$CHRONICLE_API_KEY``, else the embedded store in ``./chronicle``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chronicle_integrations import Chronicle, ConfigurationError, RunState, Unauthorized


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHRONICLE_URL", "CHRONICLE_HOME", "CHRONICLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_embedded_in_chronicle_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHRONICLE_HOME", str(tmp_path / "from-env"))
    with Chronicle() as chronicle:
        assert chronicle.target == f"embedded:{tmp_path / 'from-env'}"
        exp = chronicle.create_experiment("env", [{}])
        chronicle.create_run(exp, 0).start().succeed()
    assert (tmp_path / "from-env").is_dir()
    with Chronicle(home=tmp_path / "from-env") as again:  # the same store, reopened
        assert [r.state for r in again.runs(exp)] == [RunState.SUCCEEDED]


def test_default_home_is_relative_to_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with Chronicle() as chronicle:
        assert chronicle.target == f"embedded:{tmp_path / 'chronicle'}"
    monkeypatch.chdir("/")  # made absolute at construction: a later chdir changes nothing
    assert chronicle.home == tmp_path / "chronicle"


def test_url_and_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, http_server: Any
) -> None:
    server = http_server(api_key="env-key-123")
    monkeypatch.setenv("CHRONICLE_URL", server.url)
    with Chronicle(home=tmp_path / "h1", timeout=5) as keyless:
        assert keyless.target == server.url
        with pytest.raises(Unauthorized):
            keyless.experiments()
    monkeypatch.setenv("CHRONICLE_API_KEY", "env-key-123")
    with Chronicle(home=tmp_path / "h2") as chronicle:
        exp = chronicle.create_experiment("env", [{}])
        assert chronicle.create_run(exp, 0).start().succeed().state is RunState.SUCCEEDED
    # a trailing slash is the same target (spooled work stays addressed to it)
    with Chronicle(url=server.url + "/", home=tmp_path / "h3") as slashed:
        assert slashed.target == server.url
        assert exp in [e.experiment_id for e in slashed.experiments()]
    # an explicit url wins over the environment (no I/O at construction)
    with Chronicle(url="http://127.0.0.1:9", home=tmp_path / "h4") as explicit:
        assert explicit.target == "http://127.0.0.1:9"


@pytest.mark.parametrize("url", ["ftp://example.com", "127.0.0.1:8765", "localhost"])
def test_bad_url_is_a_configuration_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError):
        Chronicle(url=url, home=tmp_path / "home")


def test_close_is_idempotent(tmp_path: Path) -> None:
    chronicle = Chronicle(home=tmp_path / "home")
    chronicle.close()
    chronicle.close()
    with Chronicle(home=tmp_path / "home") as again:
        again.close()
