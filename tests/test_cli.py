"""The ``chronicle`` command line, run for real as a subprocess against an embedded store
seeded with the Python client (and against a real HTTP server where the fixture exists)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle, RunInfo
from chronicle_integrations._models import AssetInfo, Event, ExperimentInfo
from chronicle_integrations.cli import (
    ProgressBar,
    format_ago,
    format_size,
    main,
    run_id,
    table,
)
from chronicle_integrations.client._spool import Spool

RUN_FIELDS = {f.name for f in dataclasses.fields(RunInfo)} - {"lease"}


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env["CHRONICLE_HOME"] = str(home)
    env.update(extra)
    return env


def cli(
    home: Path, *args: str, cwd: Path | None = None, stderr: Any = subprocess.PIPE, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m chronicle_integrations.cli ARGS`` with ``CHRONICLE_HOME=home``."""
    return testkit.run(
        [sys.executable, "-m", "chronicle_integrations.cli", *args],
        env=_env(home, **env),
        cwd=cwd or home.parent,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``chronicle: error:`` line (no traceback without -v)."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("chronicle: error: "), result.stderr
    return lines[0]


@dataclasses.dataclass
class Seed:
    home: Path
    exp: str
    done: str  # succeeded, one asset
    pending: str
    crashed: str  # failed_crash with a two-line message
    running: str  # started by a worker that holds the lease
    payload: bytes
    message: str


@pytest.fixture
def seed(tmp_path: Path) -> Seed:
    home = tmp_path / "home"
    payload = os.urandom(100_000)
    (tmp_path / "model.bin").write_bytes(payload)
    message = "ValueError: boom\n\nTraceback (most recent call last):\n  line 2"
    with Chronicle(home=home) as chronicle:
        exp = chronicle.create_experiment("lr sweep", variations=[{"lr": 0.1}, {"lr": 0.01}])
        done = chronicle.create_run(exp, 0).start()
        done.upload_asset(tmp_path / "model.bin").result()
        done.succeed()
        pending = chronicle.create_run(exp, 0)
        crashed = chronicle.create_run(exp, 1).start().fail("crash", message)
        running = chronicle.create_run(exp, 1).start().heartbeat()
    return Seed(home, exp, done.key, pending.key, crashed.key, running.key, payload, message)


# ---------------------------------------------------------------------- usage
def test_help_lists_commands_and_exit_codes(tmp_path: Path) -> None:
    out = ok(cli(tmp_path, "--help"))
    for command in (
        "server",
        "experiments",
        "runs",
        "show",
        "events",
        "cancel",
        "rerun",
        "assets",
        "download",
        "sync",
    ):
        assert command in out
    assert "exit codes" in out and "3  not found" in out and "4  invalid transition" in out


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    result = cli(tmp_path)
    assert result.returncode == 2
    assert "usage: chronicle" in result.stderr


@pytest.mark.parametrize(
    "bad",
    [
        "exp/0",
        "exp/0/1/2",
        "exp/a/1",
        "exp/0/-1",
        "/0/1",
        "_bad/0/1",
        "exp/0/ 1",
        "exp/0/99999999999",
    ],
)
def test_bad_run_identifier(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", bad]) == 2  # in-process: argparse rejects it before any I/O
    assert "expected EXPERIMENT/VARIATION/RUN, e.g. lr-sweep-1a2b/0/3" in capsys.readouterr().err


def test_bad_run_identifier_from_the_shell(tmp_path: Path) -> None:
    result = cli(tmp_path, "events", "exp/0")
    assert result.returncode == 2
    assert "invalid run 'exp/0': expected EXPERIMENT/VARIATION/RUN, e.g. lr-sweep-1a2b/0/3" in (
        result.stderr
    )


def test_missing_home_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = cli(missing, "runs")
    assert result.returncode == 2
    assert str(missing) in error_line(result)
    assert not missing.exists()  # a read did not create an empty store in the wrong place


def test_bad_url_is_a_configuration_error(seed: Seed) -> None:
    result = cli(seed.home, "--url", "ftp://example.invalid", "runs")
    assert result.returncode == 2
    assert "invalid Chronicle URL" in error_line(result)


def test_unreachable_server_exits_1(seed: Seed) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = cli(seed.home, "--url", f"http://127.0.0.1:{port}", "--timeout", "0.5", "runs")
    assert result.returncode == 1
    error_line(result)


def test_verbose_shows_the_traceback(seed: Seed) -> None:
    result = cli(seed.home, "-v", "show", f"{seed.exp}/7/0")
    assert result.returncode == 3
    assert "Traceback" in result.stderr and "NotFound" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("chronicle: error: ")


# ---------------------------------------------------------------------- listings
def test_experiments(seed: Seed) -> None:
    out = ok(cli(seed.home, "experiments"))
    header, row = out.splitlines()
    assert header.split() == ["EXPERIMENT", "NAME", "VARIATIONS", "CREATED"]
    assert row.startswith(seed.exp) and "lr sweep" in row and " 2 " in row

    data = json.loads(ok(cli(seed.home, "experiments", "--json")))
    assert isinstance(data, list) and len(data) == 1
    assert set(data[0]) == {f.name for f in dataclasses.fields(ExperimentInfo)}
    assert data[0]["experiment_id"] == seed.exp
    assert data[0]["name"] == "lr sweep" and data[0]["variations"] == 2


def test_experiments_empty(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert json.loads(ok(cli(home, "experiments", "--json"))) == []
    assert ok(cli(home, "runs")) == ""


def test_runs_table(seed: Seed) -> None:
    lines = ok(cli(seed.home, "runs")).splitlines()
    header = lines[0]
    assert [c.strip() for c in header.split("  ") if c.strip()] == [
        "RUN",
        "STATE",
        "STARTED",
        "LAST HEARTBEAT",
        "PROGRESS",
        "ENDED",
        "ASSETS",
        "REASON",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {seed.done, seed.pending, seed.crashed, seed.running}
    assert rows[seed.done].split()[1] == "succeeded"
    assert rows[seed.pending].split()[1] == "pending"
    assert "crash (ValueError: boom)" in rows[seed.crashed]
    assert rows[seed.running].split()[1] == "running"
    # aligned: every column starts at the same offset on every line
    state_col = header.index("STATE")
    assert all(
        line[state_col - 2 : state_col] == "  " and line[state_col] != " " for line in lines[1:]
    )
    heartbeat_col = header.index("LAST HEARTBEAT")
    assert re.match(r"\d+[smhd] ago ", rows[seed.running][heartbeat_col:])
    assert rows[seed.pending][heartbeat_col:].startswith("- ")


def test_runs_json_has_stable_keys_and_no_lease(seed: Seed) -> None:
    out = ok(cli(seed.home, "runs", "--json"))
    assert 'lease"' not in out.replace("lease_holder", "")
    data = json.loads(out)
    assert len(data) == 4
    for item in data:
        assert set(item) == RUN_FIELDS
    by_key = {f"{d['experiment_id']}/{d['variation']}/{d['run']}": d for d in data}
    assert by_key[seed.done]["state"] == "succeeded"
    assert by_key[seed.done]["asset_count"] == 1
    assert by_key[seed.crashed]["reason"] == "crash"
    assert by_key[seed.crashed]["message"] == seed.message


def test_runs_filters(seed: Seed) -> None:
    data = json.loads(ok(cli(seed.home, "runs", "--state", "failed_crash", "--json")))
    assert [(d["variation"], d["run"]) for d in data] == [(1, 0)]
    data = json.loads(
        ok(cli(seed.home, "runs", "--experiment", seed.exp, "--state", "PENDING", "--json"))
    )
    assert [(d["variation"], d["run"]) for d in data] == [(0, 1)]
    result = cli(seed.home, "runs", "--experiment", "other-exp", "--json")
    error = json.loads(result.stderr)["error"]  # --json: the error is JSON too
    assert result.returncode == 3 and error["code"] == "not_found"
    assert "other-exp" in error["message"]


def test_client_options_are_accepted_after_the_command(seed: Seed, tmp_path: Path) -> None:
    elsewhere = tmp_path / "empty-home"
    elsewhere.mkdir()
    # CHRONICLE_HOME points to an empty store; --home after the command wins
    data = json.loads(ok(cli(elsewhere, "runs", "--json", "--home", str(seed.home))))
    assert len(data) == 4
    data = json.loads(ok(cli(elsewhere, "--home", str(seed.home), "experiments", "--json")))
    assert [e["experiment_id"] for e in data] == [seed.exp]


def test_runs_invalid_state(seed: Seed) -> None:
    result = cli(seed.home, "runs", "--state", "done")
    assert result.returncode == 2
    assert "invalid state 'done'" in result.stderr
    assert "failed_abandoned" in result.stderr and "failed_lost" in result.stderr


def test_show(seed: Seed) -> None:
    out = ok(cli(seed.home, "show", seed.crashed))
    assert seed.crashed in out
    assert "failed_crash (terminal)" in out
    assert '{"lr": 0.01}' in out
    assert "reason:" in out and "crash" in out
    for line in seed.message.splitlines():  # the message in full
        assert line in out
    assert "ago)" in out  # times carry their relative age

    data = json.loads(ok(cli(seed.home, "show", seed.running, "--json")))
    assert set(data) == RUN_FIELDS | {"config"}  # the RunInfo and its variation's config
    assert data["config"] == {"lr": 0.01}
    assert data["state"] == "running" and data["lease_holder"]
    assert (data["experiment_id"], data["variation"], data["run"]) == (seed.exp, 1, 1)


def test_show_not_found(seed: Seed) -> None:
    for key in (f"{seed.exp}/0/9", f"{seed.exp}/9/0", "no-such-exp/0/0"):
        result = cli(seed.home, "show", key)
        assert result.returncode == 3, result.stderr
        assert key in error_line(result)


def test_events(seed: Seed) -> None:
    out = ok(cli(seed.home, "events", seed.done))
    lines = out.splitlines()
    assert lines[0].split() == ["AT", "EVENT", "CAUSE"]
    body = "\n".join(lines[1:])
    assert "-> pending" in body and "pending -> running" in body
    assert "running -> succeeded" in body
    digest = json.loads(ok(cli(seed.home, "assets", seed.done, "--json")))[0]["sha256"]
    assert f"asset model.bin (97.7 KiB, {digest[:12]})" in body
    assert body.index("pending -> running") < body.index("running -> succeeded")

    data = json.loads(ok(cli(seed.home, "events", seed.done, "--json")))
    assert all(set(e) == {f.name for f in dataclasses.fields(Event)} for e in data)
    assert [(e["from_state"], e["to_state"]) for e in data if e["kind"] == "transition"] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "succeeded"),
    ]
    assets = [e for e in data if e["kind"] == "asset"]
    assert assets[0]["detail"]["name"] == "model.bin"


def test_assets(seed: Seed) -> None:
    out = ok(cli(seed.home, "assets", seed.done))
    header, row = out.splitlines()
    assert header.split() == ["NAME", "SIZE", "SHA256", "CREATED"]
    data = json.loads(ok(cli(seed.home, "assets", seed.done, "--json")))
    assert len(data) == 1 and set(data[0]) == {f.name for f in dataclasses.fields(AssetInfo)}
    assert data[0]["name"] == "model.bin" and data[0]["size"] == len(seed.payload)
    assert row.split()[:4] == ["model.bin", "97.7", "KiB", data[0]["sha256"][:12]]
    assert json.loads(ok(cli(seed.home, "assets", seed.pending, "--json"))) == []


# ---------------------------------------------------------------------- steering
def test_cancel_then_show(seed: Seed) -> None:
    for key in (seed.pending, seed.running):  # no lease needed, even for a held run
        assert ok(cli(seed.home, "cancel", key, "--message", "not needed")) == (
            f"{key}: failed_abandoned\n"
        )
        data = json.loads(ok(cli(seed.home, "show", key, "--json")))
        assert data["state"] == "failed_abandoned"
        assert data["reason"] == "abandoned" and data["message"] == "not needed"
    # a repeated cancel is a success with no effect
    assert ok(cli(seed.home, "cancel", seed.pending)) == f"{seed.pending}: failed_abandoned\n"


def test_cancel_terminal_run_is_an_invalid_transition(seed: Seed) -> None:
    result = cli(seed.home, "cancel", seed.done)
    assert result.returncode == 4
    line = error_line(result)
    assert f"cannot cancel run {seed.done}" in line and "succeeded" in line
    data = json.loads(ok(cli(seed.home, "show", seed.done, "--json")))
    assert data["state"] == "succeeded"


def test_cancel_while_the_server_is_unreachable_fails_loudly(seed: Seed) -> None:
    # A cancellation is an operator's request, not a worker's outcome: it is not deferred to
    # the spool (nobody would know it is pending); the command fails and says why.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = cli(seed.home, "--url", url, "--timeout", "0.5", "cancel", seed.running)
    assert result.returncode == 1
    assert "Connection refused" in error_line(result)
    result = cli(seed.home, "--url", url, "--timeout", "0.5", "sync", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["waiting"] == []


def test_cancel_unknown_run(seed: Seed) -> None:
    result = cli(seed.home, "cancel", f"{seed.exp}/0/42")
    assert result.returncode == 3
    error_line(result)


def test_rerun(seed: Seed) -> None:
    assert ok(cli(seed.home, "rerun", seed.exp, "0")) == f"{seed.exp}/0/2\n"
    data = json.loads(ok(cli(seed.home, "rerun", seed.exp, "0", "--json")))
    assert set(data) == RUN_FIELDS
    assert (data["variation"], data["run"], data["state"]) == (0, 3, "pending")
    assert ok(cli(seed.home, "rerun", seed.exp, "1")) == f"{seed.exp}/1/2\n"


def test_rerun_errors(seed: Seed) -> None:
    result = cli(seed.home, "rerun", seed.exp, "5")
    assert result.returncode == 3
    assert f"{seed.exp}/5" in error_line(result)
    assert cli(seed.home, "rerun", seed.exp, "-1").returncode == 2
    assert cli(seed.home, "rerun", "bad id", "0").returncode == 2


# ---------------------------------------------------------------------- download
def test_download(seed: Seed, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = ok(cli(seed.home, "download", seed.done, "model.bin", cwd=work))  # DEST = .
    assert Path(out.strip()).resolve() == (work / "model.bin").resolve()
    assert (work / "model.bin").read_bytes() == seed.payload

    target = tmp_path / "copy.bin"
    out = ok(cli(seed.home, "download", seed.done, "model.bin", str(target)))
    assert Path(out.strip()) == target
    assert target.read_bytes() == seed.payload
    assert not list(tmp_path.glob("*.part"))


def test_download_unknown_asset(seed: Seed, tmp_path: Path) -> None:
    result = cli(seed.home, "download", seed.done, "nope.bin", str(tmp_path))
    assert result.returncode == 3
    assert "nope.bin" in error_line(result)
    result = cli(seed.home, "download", seed.done, "../escape", str(tmp_path))
    assert result.returncode == 2
    error_line(result)


def test_download_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    home = tmp_path / "home"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 2**20))  # > 8 MiB
    with Chronicle(home=home) as chronicle:
        exp = chronicle.create_experiment("big")
        chronicle.add_variation(exp, {})
        run = chronicle.create_run(exp, 0).start()
        run.upload_asset(big).result()
        run.succeed()
    key = run.key

    # stderr is a pipe: no bar
    result = cli(home, "download", key, "big.bin", str(tmp_path / "a.bin"))
    assert ok(result) and result.stderr == ""
    assert (tmp_path / "a.bin").read_bytes() == big.read_bytes()

    # stderr is a terminal: a bar that reaches 100%
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = cli(home, "download", key, "big.bin", str(tmp_path / "b.bin"), stderr=slave)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    ok(result)
    shown = b"".join(chunks).decode()
    assert "big.bin" in shown and "100.0%" in shown and "9.0 MiB / 9.0 MiB" in shown
    assert (tmp_path / "b.bin").read_bytes() == big.read_bytes()


# ---------------------------------------------------------------------- sync
def test_sync_with_an_empty_spool(seed: Seed) -> None:
    assert ok(cli(seed.home, "sync")).startswith("sent 0, waiting 0, refused 0")
    assert json.loads(ok(cli(seed.home, "sync", "--json"))) == {
        "sent": [],
        "waiting": [],
        "refused": [],
    }


def test_sync_without_a_home_has_nothing_to_send(tmp_path: Path) -> None:
    assert ok(cli(tmp_path / "none", "sync")).startswith("sent 0")
    assert not (tmp_path / "none").exists()


def test_sync_sends_and_reports_what_is_left(seed: Seed) -> None:
    with Chronicle(home=seed.home) as chronicle:
        target = chronicle.target
    spool = Spool(seed.home / "spool")
    # an entry for this store that is accepted (a cancellation needs no lease) ...
    spool.add_transition(
        target, _key(seed.running), "fail", lease=None, reason="abandoned", message="spooled"
    )
    # ... one for this store that is refused for good (the run already succeeded) ...
    spool.add_transition(target, _key(seed.done), "fail", lease=None, reason="abandoned")
    # ... and one for a server this client cannot talk to now
    spool.add_transition("http://127.0.0.1:9", _key(seed.pending), "succeed", lease=None)

    result = cli(seed.home, "sync", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert len(report["sent"]) == 1 and seed.running in report["sent"][0]
    assert len(report["refused"]) == 1 and seed.done in report["refused"][0]
    assert len(report["waiting"]) == 1 and seed.pending in report["waiting"][0]
    assert json.loads(ok(cli(seed.home, "show", seed.running, "--json")))["state"] == (
        "failed_abandoned"
    )

    result = cli(seed.home, "sync")  # the foreign entry is still waiting
    assert result.returncode == 1
    assert result.stdout.startswith("sent 0, waiting 1, refused 0")


def _key(key: str) -> tuple[str, int, int]:
    e, v, r = key.split("/")
    return e, int(v), int(r)


# ---------------------------------------------------------------------- server
def _has_serve() -> bool:
    if importlib.util.find_spec("chronicle_integrations.server") is None:
        return False
    try:
        from chronicle_integrations import server
    except ImportError:
        return False
    return hasattr(server, "serve")


@pytest.mark.skipif(not _has_serve(), reason="chronicle_integrations.server.serve not available")
def test_server_refuses_to_listen_beyond_loopback_without_a_key(tmp_path: Path) -> None:
    result = cli(tmp_path / "home", "server", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = error_line(result)
    assert "API key" in line or "api-key" in line or "api_key" in line


def test_server_usage_errors(tmp_path: Path) -> None:
    assert cli(tmp_path, "server", "--port", "99999").returncode == 2
    assert cli(tmp_path, "server", "--heartbeat-timeout", "-1").returncode == 2


# ---------------------------------------------------------------------- helpers, in-process
def test_run_id_parses_strictly() -> None:
    assert run_id("lr-sweep-1a2b/0/3") == ("lr-sweep-1a2b", 0, 3)
    assert run_id("a.b_c/12/0") == ("a.b_c", 12, 0)


def test_formatting_helpers() -> None:
    assert format_ago(100.0, now=112.5) == "12s ago"
    assert format_ago(0.0, now=3 * 3600 + 5) == "3h ago"
    assert format_ago(0.0, now=2 * 86400) == "2d ago"
    assert format_ago(10.0, now=6.0) == "in 4s"
    assert format_ago(None) == "-"
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(12 * 2**20) == "12.0 MiB"
    assert table(["A", "LONG"], [["xyz", 1], ["q", 22]]).splitlines() == [
        "A    LONG",
        "xyz  1",
        "q    22",
    ]


def test_progress_bar_draws_and_ends_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bar.txt"
    with open(path, "w") as stream:
        bar = ProgressBar("x.bin", stream, width=10)
        bar(5 * 2**20, 10 * 2**20)
        bar(10 * 2**20, 10 * 2**20)
        bar.close()
    text = path.read_text()
    assert "[#####.....]  50.0%" in text and "[##########] 100.0%" in text
    assert text.endswith("\n")


def test_main_returns_usage_code_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "not-a-run"]) == 2
    assert "expected EXPERIMENT/VARIATION/RUN" in capsys.readouterr().err
    assert main(["--help"]) == 0


# ---------------------------------------------------------------------- a real server
def test_against_a_real_server(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory()
    home = tmp_path / "client-home"  # staging and spool only: the store is the server's
    payload = os.urandom(50_000)
    (tmp_path / "weights.pt").write_bytes(payload)
    with Chronicle(url=server.url, home=home) as chronicle:
        exp = chronicle.create_experiment("remote", variations=[{"x": 1}])
        run = chronicle.create_run(exp, 0).start()
        run.upload_asset(tmp_path / "weights.pt").result()
        run.succeed()
        other = chronicle.create_run(exp, 0).start()  # held by this "worker"
    url = {"CHRONICLE_URL": server.url}

    runs = json.loads(ok(cli(home, "runs", "--experiment", exp, "--json", **url)))
    assert [(r["run"], r["state"]) for r in runs] == [(0, "succeeded"), (1, "running")]
    assert all(set(r) == RUN_FIELDS for r in runs)
    assert run.key in ok(cli(home, "--url", server.url, "runs"))  # the global option too
    assert "running -> succeeded" in ok(cli(home, "events", run.key, **url))

    result = cli(home, "cancel", run.key, **url)
    assert result.returncode == 4 and "succeeded" in error_line(result)
    assert ok(cli(home, "cancel", other.key, **url)) == f"{other.key}: failed_abandoned\n"
    assert json.loads(ok(cli(home, "show", other.key, "--json", **url)))["state"] == (
        "failed_abandoned"
    )
    assert ok(cli(home, "rerun", exp, "0", **url)) == f"{exp}/0/2\n"

    result = cli(home, "show", f"{exp}/0/9", **url)
    assert result.returncode == 3 and f"{exp}/0/9" in error_line(result)

    out = ok(cli(home, "download", run.key, "weights.pt", str(tmp_path / "got.pt"), **url))
    assert Path(out.strip()) == tmp_path / "got.pt"
    assert (tmp_path / "got.pt").read_bytes() == payload
    assert ok(cli(home, "sync", **url)).startswith("sent 0, waiting 0, refused 0")


def test_unauthorized_exits_5(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(api_key="s3cret-key-for-tests")
    home = tmp_path / "home"
    for extra in ([], ["--api-key", "wrong-key-123"]):
        result = cli(home, "--url", server.url, *extra, "experiments")
        assert result.returncode == 5, result.stderr
        error_line(result)
    assert (
        json.loads(
            ok(
                cli(
                    home,
                    "--url",
                    server.url,
                    "experiments",
                    "--json",
                    CHRONICLE_API_KEY="s3cret-key-for-tests",
                )
            )
        )
        == []
    )


def _cli_server(tmp_path: Path, *options: str, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """``chronicle server OPTIONS`` on a free port, once it answers ``/v1/health``."""
    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = testkit.spawn(
        [
            sys.executable,
            "-m",
            "chronicle_integrations.cli",
            "server",
            "--port",
            str(port),
            *options,
        ],
        env=_env(tmp_path / "unused", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if requests.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    return proc, url
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)
    except BaseException:
        testkit.reap(proc)
        raise


@pytest.mark.skipif(not _has_serve(), reason="chronicle_integrations.server.serve not available")
def test_server_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "server-home"
    proc, url = _cli_server(
        tmp_path, "--home", str(home), "--heartbeat-timeout", "30", "--log-level", "warning"
    )
    try:
        client_home = tmp_path / "client"
        with Chronicle(url=url, home=client_home) as chronicle:
            exp = chronicle.create_experiment("via-cli-server", variations=[{}])
        assert exp in ok(cli(client_home, "--url", url, "experiments"))
        assert (home / "chronicle.db").exists()  # --home reached serve()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why
    assert proc.returncode in (0, -signal.SIGTERM)


def test_server_help_offers_only_what_the_store_accepts(tmp_path: Path) -> None:
    out = ok(cli(tmp_path, "server", "--help"))
    assert "--assets URL" in out and "a directory" in out and "s3://bucket/prefix" in out
    for option in ("--s3-endpoint-url", "--s3-path-style", "--s3-public-endpoint-url"):
        assert option in out
    assert "--uploads {direct,proxied}" in out
    assert "--max-json-bytes" in out  # the same options as python -m chronicle_integrations.server


@pytest.mark.skipif(not _has_serve(), reason="chronicle_integrations.server.serve not available")
def test_server_command_passes_every_server_option(tmp_path: Path) -> None:
    """``chronicle server`` takes the server's own options (here ``--max-json-bytes``, which it
    did not have) and the API key from ``$CHRONICLE_API_KEY``."""
    import requests

    proc, url = _cli_server(
        tmp_path,
        "--home",
        str(tmp_path / "server-home"),
        "--max-json-bytes",
        "300",
        "--log-level",
        "warning",
        CHRONICLE_API_KEY="env-key-654321",
    )
    auth = {"Authorization": "Bearer env-key-654321"}
    try:
        assert requests.get(f"{url}/v1/experiments", timeout=10).status_code == 401
        small = requests.post(f"{url}/v1/experiments", json={"name": "x"}, headers=auth, timeout=10)
        assert small.status_code == 201, small.text
        big = requests.post(
            f"{url}/v1/experiments", json={"name": "x" * 1000}, headers=auth, timeout=10
        )
        assert big.status_code == 413, big.text
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
