"""Hostile files and hostile text around the client: what lies in an uploaded directory (FIFOs,
sockets, symbolic links swapped in while it is staged), what a SIGKILLed client leaves in
staging, what is planted next to a download's destination, and what a failure message or a
lease holder tries to do to the operator's terminal.

Every test drives real processes (clients, racers and the ``chronicle`` command as
subprocesses, a real server) on real files, and each failed on the code before its fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rel_helpers import sha256_file, wait_until

from chronicle_integrations import Chronicle, Run
from chronicle_integrations._errors import UploadError

#: A generous bound for things that used to hang forever.
HANG_BOUND = 60.0


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def server(module_server_factory: Any) -> Any:
    return module_server_factory()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextlib.contextmanager
def _process(args: list[str], log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess in its own session, killed with its whole group on the way out."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=_env(**env), start_new_session=True
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _cli(*args: str, home: Path, url: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real ``chronicle`` command; raw bytes out, so escapes cannot hide in decoding."""
    env = _env(CHRONICLE_HOME=str(home), **({"CHRONICLE_URL": url} if url else {}))
    return subprocess.run(
        [sys.executable, "-m", "chronicle_integrations.cli", *args],
        env=env,
        capture_output=True,
        timeout=120,
    )


def _owned_staging(home: Path) -> list[str]:
    """Staged entries that belong to some client (not ``kept-...`` copies)."""
    staging = home / "staging"
    if not staging.is_dir():
        return []
    return sorted(n for n in os.listdir(staging) if not n.startswith("kept-"))


def _new_run(server: Any, home: Path) -> tuple[Chronicle, Run]:
    chronicle = Chronicle(url=server.url, home=home)
    experiment = chronicle.create_experiment("hostile-files", variations=[{}])
    return chronicle, chronicle.create_run(experiment, 0).start()


# ------------------------------------------------------------------------------ item 7
def test_fifo_and_socket_in_an_uploaded_directory_do_not_hang_the_run(
    server: Any, tmp_path: Path, figures: Any
) -> None:
    """A FIFO in an uploaded directory used to block the upload worker's open() forever, and
    with it succeed(); a socket file left a staged copy behind. Both are skipped now."""
    out = tmp_path / "outputs"
    (out / "sub").mkdir(parents=True)
    (out / "train.log").write_bytes(b"epoch 1\n")
    (out / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    os.mkfifo(out / "progress.fifo")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(out / "sub" / "control.sock"))
    home = tmp_path / "home"
    result = tmp_path / "result.json"
    code = f"""
        import json
        from chronicle_integrations import Chronicle
        with Chronicle(url={server.url!r}, home={str(home)!r}) as chronicle:
            exp = chronicle.create_experiment("fifo", variations=[{{}}])
            run = chronicle.create_run(exp, 0).start()
            handle = run.upload_asset({str(out)!r}, "outputs")
            run.succeed()
            names = sorted(a.name for a in handle.result(0))
            json.dump({{"names": names, "state": run.state.value}}, open({str(result)!r}, "w"))
    """
    try:
        with _process(_python(code), tmp_path / "client.log") as proc:
            try:
                proc.wait(HANG_BOUND)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the run did not end within {HANG_BOUND}s: a FIFO blocked it")
        log = (tmp_path / "client.log").read_text()
        assert proc.returncode == 0, log
    finally:
        listener.close()
    done = json.loads(result.read_text())
    assert done == {
        "names": ["outputs/sub/weights.bin", "outputs/train.log"],
        "state": "succeeded",
    }
    assert "progress.fifo is a FIFO" in log and "control.sock is a socket" in log, log
    assert os.listdir(home / "staging") == []  # no staged copy left behind
    figures["fault:fifo or socket in an upload"] += 2


def test_a_fifo_or_socket_named_explicitly_is_refused_at_the_call(
    server: Any, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "pipe")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sock"))
    chronicle, run = _new_run(server, tmp_path / "home")
    try:
        with pytest.raises(UploadError, match="a FIFO, not a regular file"):
            run.upload_asset(tmp_path / "pipe")
        with pytest.raises(UploadError, match="a socket, not a regular file"):
            run.upload_asset(tmp_path / "sock")
        assert _owned_staging(tmp_path / "home") == []
    finally:
        chronicle.close()
        listener.close()


# ------------------------------------------------------------------------------ item 11
RACER = """
    import os, sys
    target, secret, scratch = sys.argv[1:4]  # scratch: outside the uploaded directory
    tmp_link, tmp_file = os.path.join(scratch, "l"), os.path.join(scratch, "f")
    n = 0
    while True:
        n += 1
        os.symlink(secret, tmp_link)
        os.replace(tmp_link, target)
        with open(tmp_file, "wb") as fh:
            fh.write(b"harmless %d" % n)
        os.replace(tmp_file, target)
"""


def _directory_upload(run: Run, ckpt: Path, attempt: int) -> None:
    run.upload_asset(ckpt, f"attempt-{attempt}").result(60)


def _hydra_upload(run: Run, ckpt: Path, attempt: int) -> None:
    from hydra_plugins.chronicle_launcher._core import upload_directory

    upload_directory(run, ckpt)
    run.wait_uploads(60)


@pytest.fixture(params=["link", "copy"])
def staging_home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The client's home: on the files' filesystem (staging by hard link), or on another one
    (``/dev/shm``: staging by copy)."""
    if request.param == "link":
        yield tmp_path / "home"
        return
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's files")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="chronicle-home-") as home:
        yield Path(home)


@pytest.mark.parametrize(
    "upload", [_directory_upload, _hydra_upload], ids=["upload_asset", "hydra"]
)
def test_a_file_swapped_for_a_symlink_never_uploads_its_target(
    server: Any,
    tmp_path: Path,
    staging_home: Path,
    upload: Callable[[Run, Path, int], None],
    figures: Any,
) -> None:
    """A racing process swaps a file of the directory for a symbolic link to a secret, over
    and over, while the directory is staged: the secret's bytes must never become an asset
    (os.link used to follow the link it found)."""
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"private key " + os.urandom(32))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "weights.bin").write_bytes(os.urandom(512))
    target = ckpt / "data.bin"
    target.write_bytes(b"harmless 0")
    attempts = 150
    chronicle, run = _new_run(server, staging_home)
    try:
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        racer = [*_python(RACER), str(target), str(secret), str(scratch)]
        with _process(racer, tmp_path / "racer.log"):
            for attempt in range(attempts):
                with contextlib.suppress(UploadError, OSError):  # a file vanished mid-walk
                    upload(run, ckpt, attempt)
        digests = {e.detail["sha256"] for e in run.events() if e.kind == "asset"}
    finally:
        chronicle.close()
    assert digests, "nothing was uploaded at all"
    assert sha256_file(secret) not in digests, "the secret was uploaded through a swapped link"
    figures["fault:symlink swap race"] += attempts


# ------------------------------------------------------------------------------ item 14
def test_staging_of_a_sigkilled_client_is_reaped_and_spooled_uploads_are_kept(
    server_factory: Any, tmp_path: Path, figures: Any
) -> None:
    """A client SIGKILLed mid-upload leaves its hard links in staging; ``chronicle sync``
    removes them once their owner is dead (never while it lives), and never a spooled file."""
    server = server_factory()
    owner = Chronicle(url=server.url, home=tmp_path / "owner-home")
    experiment = owner.create_experiment("orphans", variations=[{}])
    run = owner.create_run(experiment, 0).start()
    key = run.key_tuple
    home = tmp_path / "home"
    spooled = tmp_path / "spooled.bin"
    spooled.write_bytes(os.urandom(10_000))
    server.stop()

    # 1. An earlier client found the server down: its upload went to the spool.
    earlier = Chronicle(url=server.url, home=home, timeout=1.0)
    try:
        with pytest.raises(UploadError, match="spooled"):
            earlier.run(*key, lease=run.lease).upload_asset(spooled).result(60)
    finally:
        earlier.close()
    spool_files = sorted(os.listdir(home / "spool"))
    assert len(spool_files) == 2  # manifest + data

    # 2. A client whose server never answers stages three files and hangs mid-upload.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # connections complete in the backlog and are never answered
    files = []
    for i in range(3):
        files.append(tmp_path / f"ckpt-{i}.bin")
        files[-1].write_bytes(os.urandom(50_000))
    code = f"""
        import time
        from chronicle_integrations import Chronicle
        chronicle = Chronicle(url="http://127.0.0.1:{hole.getsockname()[1]}",
                              home={str(home)!r}, timeout=600)
        run = chronicle.run(*{list(key)!r}, lease={run.lease!r})
        for path in {[str(f) for f in files]!r}:
            run.upload_asset(path)
        time.sleep(600)
    """
    try:
        with _process(_python(code), tmp_path / "client.log") as proc:
            wait_until(lambda: len(_owned_staging(home)) == 3, what="three staged files")
            staged = _owned_staging(home)
            # While it lives, its staging is its own: sync leaves it alone.
            alive = _cli("sync", "--url", server.url, "--timeout", "1", home=home)
            assert alive.returncode == 1, alive  # the server is down: the spool waits
            assert _owned_staging(home) == staged
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        hole.close()
    assert _owned_staging(home) == staged  # the SIGKILL left them behind

    dead = _cli("sync", "--url", server.url, "--timeout", "1", home=home)
    assert dead.returncode == 1, dead
    assert _owned_staging(home) == [], "the dead client's staged files survived sync"
    assert sorted(os.listdir(home / "spool")) == spool_files  # the spooled upload is kept

    server.restart()
    try:
        sent = _cli("sync", "--url", server.url, "--json", home=home)
        assert sent.returncode == 0, sent
        assert len(json.loads(sent.stdout)["sent"]) == 1
        assets = {a.name: a for a in owner.run(*key).assets()}
        assert assets["spooled.bin"].sha256 == sha256_file(spooled)
    finally:
        owner.close()
    figures["fault:SIGKILL mid-upload (staging reaped)"] += 1


def test_a_new_clients_first_upload_reaps_dead_clients_staging(server: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20_000))
    code = f"""
        import os
        from chronicle_integrations.client._staging import Stager
        Stager({str(home / "staging")!r}).stage({str(src)!r}, None)
        os.kill(os.getpid(), 9)
    """
    with _process(_python(code), tmp_path / "client.log") as proc:
        proc.wait(HANG_BOUND)
    assert len(_owned_staging(home)) == 1
    chronicle, run = _new_run(server, home)
    try:
        run.upload_asset(src).result(60)
        assert _owned_staging(home) == []
    finally:
        chronicle.close()


# ------------------------------------------------------------------------------ item 9
@pytest.fixture(params=["http", "embedded"])
def stored_asset(
    request: pytest.FixtureRequest, server: Any, tmp_path: Path
) -> Iterator[tuple[Path, str | None, str, bytes]]:
    """(home, url, run key, payload) of a run holding ``model.bin``, over either transport."""
    url = server.url if request.param == "http" else None
    home = tmp_path / "home"
    home.mkdir()
    payload = os.urandom(300_000)
    src = tmp_path / "model.bin"
    src.write_bytes(payload)
    with Chronicle(url=url, home=home) as chronicle:
        experiment = chronicle.create_experiment("download", variations=[{}])
        run = chronicle.create_run(experiment, 0).start()
        run.upload_asset(src).result(60)
        run.succeed()
    src.unlink()
    yield home, url, run.key, payload


def test_download_does_not_follow_a_planted_part_symlink(
    stored_asset: tuple[Path, str | None, str, bytes], tmp_path: Path, figures: Any
) -> None:
    home, url, key, payload = stored_asset
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not overwrite me")
    dest_dir = tmp_path / "downloads"
    dest_dir.mkdir()
    dest = dest_dir / "model.bin"
    (dest_dir / "model.bin.part").symlink_to(victim)
    result = _cli("download", key, "model.bin", str(dest), home=home, url=url)
    assert result.returncode == 0, result
    assert victim.read_bytes() == b"do not overwrite me"
    assert not dest.is_symlink() and dest.read_bytes() == payload
    assert sorted(os.listdir(dest_dir)) == ["model.bin", "model.bin.part"]  # no temp left
    figures["fault:planted .part symlink"] += 1


# ------------------------------------------------------------------------------ item 10
HOSTILE_MESSAGE = "RuntimeError: boom\x1b[2J\x1b]0;owned\x07 \u202egnp.exe\x9b31m"
HOSTILE_HOLDER = "node-1\x1b[8m:\u200f4242"
LOOKALIKE = "model\u200b.ckpt"


def test_terminal_escapes_are_shown_escaped_in_human_output(tmp_path: Path, figures: Any) -> None:
    home = tmp_path / "home"
    src = tmp_path / "model.ckpt"
    src.write_bytes(b"weights")
    with Chronicle(home=home) as chronicle:
        experiment = chronicle.create_experiment("escapes", variations=[{}])
        failed = chronicle.create_run(experiment, 0)
        chronicle.transport.start(
            *failed.key_tuple, resume=False, lease="lease-one-1", holder=HOSTILE_HOLDER
        )
        failed.lease = "lease-one-1"
        failed.upload_asset(src, LOOKALIKE).result(60)
        failed.upload_asset(src, "model.ckpt").result(60)
        failed.fail("crash", HOSTILE_MESSAGE)
        running = chronicle.create_run(experiment, 0)
        chronicle.transport.start(
            *running.key_tuple, resume=False, lease="lease-two-2", holder=HOSTILE_HOLDER
        )

    outputs = {
        "show": _cli("show", failed.key, home=home),
        "show running": _cli("show", running.key, home=home),
        "events": _cli("events", failed.key, home=home),
        "runs": _cli("runs", home=home),
        "assets": _cli("assets", failed.key, home=home),
    }
    for what, result in outputs.items():
        assert result.returncode == 0, (what, result)
        for raw in (b"\x1b", b"\x07", "\u202e".encode(), "\u200b".encode(), "\x9b".encode()):
            assert raw not in result.stdout, (what, raw, result.stdout)
    text = {what: r.stdout.decode() for what, r in outputs.items()}
    escaped = "RuntimeError: boom\\x1b[2J\\x1b]0;owned\\x07 \\u202egnp.exe\\x9b31m"
    assert escaped in text["show"] and escaped in text["runs"]
    assert "node-1\\x1b[8m:\\u200f4242" in text["show running"]
    assert "model\\u200b.ckpt" in text["assets"] and "model\\u200b.ckpt" in text["events"]
    assert "\nmodel.ckpt " in text["assets"]  # the plain name stays plain

    # --json is unchanged and exact: the raw strings, as JSON escapes them.
    shown = json.loads(_cli("show", failed.key, "--json", home=home).stdout)
    assert shown["message"] == HOSTILE_MESSAGE
    names = {a["name"] for a in json.loads(_cli("assets", failed.key, "--json", home=home).stdout)}
    assert names == {LOOKALIKE, "model.ckpt"}
    holder = json.loads(_cli("show", running.key, "--json", home=home).stdout)["lease_holder"]
    assert holder == HOSTILE_HOLDER
    figures["fault:terminal escapes"] += len(outputs)
