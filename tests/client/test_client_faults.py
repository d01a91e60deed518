"""Faults over HTTP, with real server processes and real signals.

* the server is SIGKILLed and restarted while a run beats: heartbeats resume, the run succeeds;
* the server is SIGKILLed in the middle of a ~300 MB upload: the upload resumes where the
  server's acknowledged offset stood (it does not start over) and the digest matches;
* the server is down when the run ends: the transition and the unfinished upload are spooled,
  and ``chronicle.sync()`` / ``chronicle sync`` deliver them once the server is back.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import s3kit
import testkit
from client_helpers import sha256_bytes, transitions, wait_until, write_random

from chronicle_integrations import Chronicle, RunState, Unauthorized, UploadError
from chronicle_integrations.client import _http
from chronicle_integrations.lifecycle import is_valid_path

MB = 1024 * 1024
#: These also run on servers whose assets live in S3 (see conftest.py).
ON_S3 = {
    "test_upload_resumes_after_a_server_crash",
    "test_server_down_at_the_end_is_spooled_then_synced",
    "test_close_is_bounded_and_spools_unfinished_uploads",
}


@pytest.fixture
def server(http_server: Any) -> Any:
    return http_server()


@pytest.fixture
def client(server: Any, tmp_path: Path) -> Iterator[Chronicle]:
    chronicle = Chronicle(url=server.url, home=tmp_path / "home", timeout=60)
    try:
        yield chronicle
    finally:
        chronicle.close(timeout=10)


def test_heartbeats_resume_after_a_server_crash(server: Any, client: Chronicle) -> None:
    exp = client.create_experiment("crash", variations=[{}])
    run = client.create_run(exp, 0).start()
    keepalive = run.keep_alive(interval=0.3)
    wait_until(lambda: run.info().last_heartbeat_at, what="a first heartbeat")

    server.kill()  # SIGKILL: no graceful shutdown
    assert server.proc.poll() is not None
    time.sleep(1.0)  # several intervals with the server gone: the beats fail
    assert keepalive.alive and not run.cancelled.is_set()

    server.restart()
    restarted_at = time.time()
    # the server's clock: a beat recorded after the restart proves the loop came back
    wait_until(
        lambda: (run.info().last_heartbeat_at or 0) > restarted_at,
        timeout=60,
        what="a heartbeat after the restart",
    )
    assert keepalive.alive and not run.cancelled.is_set()
    assert run.state is RunState.RUNNING

    run.succeed()
    assert run.state is RunState.SUCCEEDED
    assert is_valid_path(transitions(run))
    wait_until(lambda: not keepalive.alive, timeout=10, what="the keep-alive to stop")


def test_upload_resumes_after_a_server_crash(
    server: Any, client: Chronicle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evidence that the upload resumed rather than restarted, from both sides:

    * the client: every chunk it sends is recorded (offset and bytes actually read for the
      wire, by wrapping ``_http._chunk_body``, which still does the real work); the first
      chunk after the crash starts at the server's stored offset (> 0), and the total sent is
      less than size + the bytes the server held at the crash (a restart from 0 would send at
      least that);
    * the server: right after the restart, ``GET /v1/uploads/<id>`` reports the bytes that
      were on disk at the crash, and only one upload id was ever begun for the asset.
    """
    size = 300 * MB
    src = tmp_path / "model.ckpt"
    digest = write_random(src, size)

    chunks: list[dict[str, int]] = []
    real_chunk_body = _http._chunk_body

    def recording_chunk_body(fh: Any, offset: int, length: int, *args: Any) -> Any:
        record = {"offset": offset, "length": length, "sent": 0}
        chunks.append(record)
        for block in real_chunk_body(fh, offset, length, *args):
            record["sent"] += len(block)
            yield block

    monkeypatch.setattr(_http, "_chunk_body", recording_chunk_body)

    exp = client.create_experiment("resume", variations=[{}])
    run = client.create_run(exp, 0).start()
    partial = Path(server.assets) / "partial"

    def partial_sizes() -> dict[str, int]:
        in_s3 = s3kit.partial_sizes(server)  # (parts in the bucket + the server's tail)
        if in_s3 is not None:
            return in_s3
        try:
            return {p.name: p.stat().st_size for p in partial.iterdir()}
        except FileNotFoundError:
            return {}

    handle = run.upload_asset(src)
    # past the first acknowledged chunk, in the middle of the second one
    sizes = wait_until(
        lambda: {k: v for k, v in partial_sizes().items() if v >= 90 * MB},
        timeout=120,
        interval=0.005,
        what="the upload to pass 90 MB",
    )
    [upload_id] = sizes
    server.kill()
    held = partial_sizes()[upload_id]  # what the dead server left on disk
    assert 90 * MB <= held < size
    assert not handle.done()
    chunks_before = len(chunks)
    time.sleep(0.5)

    server.restart()
    status = requests.get(f"{server.url}/v1/uploads/{upload_id}", timeout=10).json()
    assert status["offset"] >= held or status.get("completed"), status

    info = handle.result(300)
    assert info.sha256 == digest and info.size == size
    [asset] = run.assets()
    assert (asset.name, asset.sha256, asset.size) == ("model.ckpt", digest, size)

    resumed = chunks[chunks_before:]
    assert resumed, "no chunk was sent after the restart"
    assert resumed[0]["offset"] >= held, (resumed[0], held)
    assert all(c["offset"] > 0 for c in chunks[1:]), chunks  # never back to 0
    total_sent = sum(c["sent"] for c in chunks)
    print(
        f"held at crash {held}, resumed at {resumed[0]['offset']}, sent {total_sent} "
        f"for {size} bytes; chunks {[(c['offset'], c['sent']) for c in chunks]}"
    )
    assert total_sent < size + held, (total_sent, size, held)
    assert set(partial_sizes()) == set(), "a partial upload was left behind"
    run.succeed()
    assert run.info().asset_count == 1


def _end_during_outage(
    chronicle: Chronicle, exp: str, variation: int, tmp_path: Path
) -> tuple[Any, dict[str, bytes]]:
    """Start a run and upload while the server is up; return the run and its contents."""
    run = chronicle.create_run(exp, variation).start()
    early = os.urandom(MB)
    src = tmp_path / f"early-{variation}.bin"
    src.write_bytes(early)
    run.upload_asset(src, name="early.bin").result(60)
    return run, {"early.bin": early, "late.bin": os.urandom(2 * MB)}


def test_server_down_at_the_end_is_spooled_then_synced(http_server: Any, tmp_path: Path) -> None:
    """Two workers (two client homes) end their runs while the server is down: each run's
    unfinished upload and its succeed() are spooled. The server comes back; one worker syncs
    with ``chronicle.sync()``, the other with the CLI ``chronicle sync``.

    The outage outlasts the heartbeat timeout (2 s): the runs are ``lost`` when the server
    comes back, and the late ``succeed`` is still accepted (lost is recoverable)."""
    server = http_server(heartbeat_timeout=2.0)
    homes = {"python": tmp_path / "home-python", "cli": tmp_path / "home-cli"}
    clients = {how: Chronicle(url=server.url, home=home, timeout=3) for how, home in homes.items()}
    try:
        exp = clients["python"].create_experiment("spool", variations=[{}, {}])
        ends: dict[str, Any] = {}
        for variation, (how, chronicle) in enumerate(clients.items()):
            ends[how] = _end_during_outage(chronicle, exp, variation, tmp_path)

        server.stop()
        handles, errors = {}, []

        def finish(how: str) -> None:
            run, contents = ends[how]
            late = tmp_path / f"late-{how}.bin"
            late.write_bytes(contents["late.bin"])
            handles[how] = run.upload_asset(late, name="late.bin")
            late.unlink()  # the spool must not depend on the source
            try:
                run.succeed()  # waits for the upload (which fails), then cannot reach it
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=finish, args=(how,)) for how in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        for how, chronicle in clients.items():
            run, _ = ends[how]
            assert run.spooled is True
            with pytest.raises(UploadError, match="sync"):
                handles[how].result(0)
            kinds = sorted(entry["kind"] for _, entry in chronicle.spool.entries())
            assert kinds == ["transition", "upload"]

        server.restart()
        for run, _ in ends.values():  # nothing was delivered yet
            wait_until(
                lambda run=run: run.state is RunState.LOST,
                timeout=30,
                interval=0.1,
                what="the silent run to be lost",
            )

        report = clients["python"].sync()
        assert len(report.sent) == 2 and not report.waiting and not report.refused, report
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
        proc = testkit.run(
            [
                sys.executable,
                "-m",
                "chronicle_integrations.cli",
                "--url",
                server.url,
                "--home",
                str(homes["cli"]),
                "sync",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(json.loads(proc.stdout)["sent"]) == 2, proc.stdout

        for how, chronicle in clients.items():
            run, contents = ends[how]
            assert chronicle.spool.entries() == [], how
            info = run.info()
            assert info.state is RunState.SUCCEEDED and info.asset_count == 2, (how, info)
            assets = {a.name: a.sha256 for a in run.assets()}
            assert assets == {name: sha256_bytes(data) for name, data in contents.items()}
            got = run.download_asset("late.bin", tmp_path / f"got-{how}.bin").read_bytes()
            assert got == contents["late.bin"]
            assert is_valid_path(transitions(run))
            assert ("lost", "succeeded") in transitions(run)
            assert chronicle.sync().sent == []  # nothing left to send
    finally:
        for chronicle in clients.values():
            chronicle.close(timeout=10)


def test_api_key_errors_map_to_unauthorized(http_server: Any, tmp_path: Path) -> None:
    server = http_server(api_key="s3cret-key-for-tests")
    for key in (None, "wrong-key"):
        stranger = Chronicle(url=server.url, api_key=key, home=tmp_path / f"h-{key}", timeout=5)
        try:
            with pytest.raises(Unauthorized) as caught:
                stranger.experiments()
            assert caught.value.code == "unauthorized"
        finally:
            stranger.close(timeout=5)
    member = Chronicle(url=server.url, api_key="s3cret-key-for-tests", home=tmp_path / "ok")
    try:
        exp = member.create_experiment("keyed", variations=[{}])
        member.create_run(exp, 0).start().succeed()
        assert [r.state for r in member.runs(exp)] == [RunState.SUCCEEDED]
    finally:
        member.close(timeout=5)


def test_close_is_bounded_and_spools_unfinished_uploads(server: Any, tmp_path: Path) -> None:
    """close(timeout) does not wait for an unreachable server for ever: what is unfinished is
    spooled, its future says so, and a later client on the same home syncs it."""
    home = tmp_path / "home"
    chronicle = Chronicle(url=server.url, home=home, timeout=30)
    exp = chronicle.create_experiment("close", variations=[{}])
    run = chronicle.create_run(exp, 0).start()
    server.stop()
    data = os.urandom(MB)
    (tmp_path / "out.bin").write_bytes(data)
    handle = run.upload_asset(tmp_path / "out.bin")
    chronicle.close(timeout=1.0)  # the upload keeps retrying within its 30 s budget
    with pytest.raises(UploadError, match="sync"):
        handle.result(10)
    assert [entry["kind"] for _, entry in chronicle.spool.entries()] == ["upload"]

    server.restart()
    later = Chronicle(url=server.url, home=home, timeout=30)
    try:
        report = later.sync()
        assert len(report.sent) == 1 and not report.refused, report
        got = later.run(exp, 0, 0)
        assert [(a.name, a.sha256) for a in got.assets()] == [("out.bin", sha256_bytes(data))]
        got.lease = run.lease  # the same worker, in a new process
        got.succeed()
        assert got.state is RunState.SUCCEEDED
    finally:
        later.close(timeout=10)


def test_a_hung_server_cannot_block_past_the_budget(server: Any, tmp_path: Path) -> None:
    """SIGSTOP: the kernel still accepts connections but nothing answers. With timeout=2 the
    run's end is spooled after a few seconds, not after a minute."""
    chronicle = Chronicle(url=server.url, home=tmp_path / "home", timeout=2)
    done = threading.Event()
    try:
        exp = chronicle.create_experiment("hung", variations=[{}])
        run = chronicle.create_run(exp, 0).start()
        server.proc.send_signal(signal.SIGSTOP)
        try:
            worker = threading.Thread(target=lambda: (run.succeed(), done.set()), daemon=True)
            worker.start()
            # generous: 4x the budget; the bug makes it 60 s
            finished = done.wait(8)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        worker.join(120)
        assert finished, "succeed() was still blocked on the hung server after 8 s"
        assert run.spooled
    finally:
        chronicle.close(timeout=10)
