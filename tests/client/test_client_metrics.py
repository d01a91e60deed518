"""``run.log_metrics``, objectives and ``best`` through the client, on the embedded store and a
real server: values travel with heartbeats and succeed/fail (no request of their own), bad
input is refused at once on the calling thread, and the store's refusal never stops the
heartbeats."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import pytest
import testkit

from chronicle_integrations import Chronicle, InvalidMetric, InvalidRequest, NotFound, RunState
from chronicle_integrations._metrics import MAX_METRICS


def _started(chronicle: Chronicle, n: int = 1, **kwargs):
    exp = chronicle.create_experiment("metrics", [{"i": i} for i in range(n)], **kwargs)
    return exp, [chronicle.create_run(exp, v).start() for v in range(n)]


def test_log_metrics_travel_with_heartbeat_and_succeed(chronicle: Chronicle) -> None:
    exp, (run,) = _started(chronicle)
    run.log_metrics({"train/loss": 1.0, "lr": 0.1}, step=1)
    run.log_metrics({"train/loss": 0.25}, step=2)
    run.log_metrics({"train/loss": 0.5}, step=3)  # min 0.25 at step 2 between two beats
    assert run.info().metrics is None  # nothing sent yet: no request per call
    run.heartbeat()
    loss = run.info().metrics["train/loss"]
    assert (loss["last"], loss["last_step"], loss["min"], loss["min_step"]) == (0.5, 3, 0.25, 2)
    assert (loss["max"], loss["max_step"]) == (1.0, 1)
    run.log_metrics({"val/acc": 0.9, "nan": float("nan")}, step=4)
    run.succeed()
    metrics = run.info().metrics
    assert metrics["val/acc"]["last"] == 0.9 and math.isnan(metrics["nan"]["last"])
    assert metrics["nan"]["min"] is None
    assert set(chronicle.runs(exp)[0].metrics) == {"train/loss", "lr", "val/acc", "nan"}


@pytest.mark.parametrize(
    ("values", "step"),
    [
        ({"loss": "0.3"}, None),
        ({"loss": None}, None),
        ({"loss": True}, None),
        ({"a/../b": 1.0}, None),
        ({"a\x00b": 1.0}, None),
        ({"/abs": 1.0}, None),
        ({"x" * 257: 1.0}, None),
        ({"loss": 1.0}, -1),
        ({"loss": 1.0}, 1.5),
        ([("loss", 1.0)], None),
    ],
)
def test_bad_input_raises_at_once_and_records_nothing(chronicle: Chronicle, values, step) -> None:
    _exp, (run,) = _started(chronicle)
    with pytest.raises(InvalidMetric) as info:
        run.log_metrics({"fine": 1.0, **values} if isinstance(values, dict) else values, step)
    assert info.value.code == "invalid_request"
    run.succeed()
    assert run.info().metrics is None  # not even "fine": nothing partial


def test_name_cap_on_the_client(chronicle: Chronicle) -> None:
    _exp, (run,) = _started(chronicle)
    with pytest.raises(InvalidMetric):
        run.log_metrics({f"m{i}": 1.0 for i in range(10_000)})
    run.log_metrics({f"m{i}": float(i) for i in range(MAX_METRICS)})
    with pytest.raises(InvalidMetric):
        run.log_metrics({"one-more": 1.0})
    run.log_metrics({"m0": -1.0})  # known names still go
    run.succeed()
    metrics = run.info().metrics
    assert len(metrics) == MAX_METRICS and metrics["m0"]["min"] == -1.0


def test_store_refusal_keeps_heartbeats_going(
    backend, chronicle: Chronicle, caplog: pytest.LogCaptureFixture
) -> None:
    """The run already has 64 names (an earlier worker): a resumed worker's new names are
    refused by the store; it logs once, keeps beating, and its known names still arrive."""
    exp, (run,) = _started(chronicle)
    run.log_metrics({f"m{i}": 1.0 for i in range(MAX_METRICS)}).heartbeat()
    resumed = backend.connect().run(exp, 0, 0).start(resume=True)
    resumed.log_metrics({"new1": 1.0, "m1": 0.5})
    with caplog.at_level(logging.ERROR):
        info = resumed.beat()
        assert info.state is RunState.RUNNING
        resumed.log_metrics({"m2": 0.25})
        with pytest.raises(InvalidMetric):  # now known to be full: refused at once
            resumed.log_metrics({"new2": 1.0})
        resumed.heartbeat()
    assert sum("refused metrics" in r.getMessage() for r in caplog.records) == 1
    metrics = resumed.info().metrics
    assert "new1" not in metrics and metrics["m1"]["min"] == 0.5 and metrics["m2"]["min"] == 0.25


def test_stale_worker_metrics_refused(backend, chronicle: Chronicle) -> None:
    exp, (run,) = _started(chronicle)
    backend.connect().run(exp, 0, 0).start(resume=True)
    run.log_metrics({"loss": 0.1})
    with pytest.raises(Exception) as info:
        run.heartbeat()
    assert getattr(info.value, "code", "") == "lease_conflict"
    assert run.info().metrics is None


def test_keep_alive_sends_metrics(chronicle: Chronicle) -> None:
    _exp, (run,) = _started(chronicle)
    with run.keep_alive(interval=0.2):
        run.log_metrics({"loss": 0.7}, step=10)
        deadline = time.monotonic() + 30
        while not (run.info().metrics or {}).get("loss") and time.monotonic() < deadline:
            time.sleep(0.1)
    assert run.info().metrics["loss"]["last"] == 0.7
    run.succeed()


def test_fail_carries_metrics(chronicle: Chronicle) -> None:
    _exp, (run,) = _started(chronicle)
    run.log_metrics({"loss": 2.0}, step=5)
    run.fail("crash", "boom")
    assert run.info().metrics["loss"]["last_step"] == 5


def test_objective_best_and_checkpoint_download(chronicle: Chronicle, tmp_path: Path) -> None:
    exp, runs = _started(chronicle, 3, objective={"metric": "val/loss", "mode": "min"})
    assert chronicle.experiment(exp).objective == {"metric": "val/loss", "mode": "min"}
    for run, loss in zip(runs, (0.4, 0.1, 0.3), strict=True):
        for epoch in range(2):
            ckpt = tmp_path / f"{run.variation}-{epoch}.ckpt"
            ckpt.write_bytes(f"weights {run.variation} {epoch}".encode())
            value = loss + 0.1 * (1 - epoch)  # epoch 1 is the better one
            run.upload_asset(
                ckpt,
                name=f"epoch={epoch}.ckpt",
                metric={"metric": "val/loss", "value": value, "step": epoch, "epoch": epoch},
            )
            run.log_metrics({"val/loss": value}, step=epoch)
        run.succeed()
    best = chronicle.best(exp)
    assert (best.variation, best.state, best.value) == (1, RunState.SUCCEEDED, 0.1)
    assert best.checkpoint["name"] == "epoch=1.ckpt" and best.checkpoint["epoch"] == 1
    path = chronicle.run(exp, 1, 0).download_asset(best.checkpoint["name"], tmp_path / "got")
    assert path.read_bytes() == b"weights 1 1"
    assert chronicle.best(exp, "val/loss", "max").variation == 0
    chronicle.set_objective(exp, "val/loss", "max")
    assert chronicle.best(exp).variation == 0
    with pytest.raises(NotFound):
        chronicle.best(exp, "nothing")
    with pytest.raises(InvalidMetric):
        chronicle.best(exp, mode="up")
    with pytest.raises(InvalidMetric):
        chronicle.create_experiment("x", objective={"metric": "a/../b"})
    with pytest.raises(InvalidMetric):
        runs[0].upload_asset(tmp_path / "0-0.ckpt", metric={"metric": "loss", "value": "x"})


# ---------------------------------------------------------------------- the last values
def _beaten_once(run) -> None:
    """Start a heartbeat loop that beats once now and not again during the test, and wait
    for that beat: whatever is logged afterwards is pending until close."""
    loop = run.keep_alive(interval=3600)
    testkit.wait_until(lambda: loop.beats >= 1, what="the first heartbeat")


def test_close_sends_the_metrics_logged_since_the_last_beat(backend, chronicle) -> None:
    """A script logs its final values and closes its client while the run stays running:
    the values go with one last heartbeat (they were lost before), for a run with a
    heartbeat loop and for a bare handle alike, and the run stays running."""
    exp, (looped,) = _started(chronicle)
    _beaten_once(looped)
    looped.log_metrics({"val/loss": 0.25}, step=9)
    bare = chronicle.create_run(exp, 0).start()  # no heartbeat loop at all
    bare.log_metrics({"acc": 0.5}, step=3)
    chronicle.close()
    reader = backend.connect()
    info = reader.run(exp, 0, 0).info()
    assert info.state is RunState.RUNNING
    assert (info.metrics["val/loss"]["last"], info.metrics["val/loss"]["last_step"]) == (0.25, 9)
    assert reader.run(exp, 0, 1).info().metrics["acc"]["last"] == 0.5


def test_stop_keep_alive_sends_the_metrics_logged_since_the_last_beat(chronicle) -> None:
    """A pre-emption stops the heartbeats without ending the run: its last values go."""
    exp, (run,) = _started(chronicle)
    _beaten_once(run)
    run.log_metrics({"val/loss": 0.5}, step=4)
    run.stop_keep_alive()
    assert chronicle.run(exp, 0, 0).info().metrics["val/loss"]["last"] == 0.5


def test_process_exit_sends_the_last_metrics(backend, tmp_path: Path) -> None:
    """A process that exits normally with its run still live (no close, no end): the client
    closes itself at exit and the values logged after the last heartbeat arrive."""
    script = (
        "from chronicle_integrations import Chronicle\n"
        "import time\n"
        "c = Chronicle()\n"
        "exp = c.create_experiment('exit', [{}])\n"
        "run = c.create_run(exp, 0).start()\n"
        "loop = run.keep_alive(interval=3600)\n"
        "while loop.beats < 1:\n"
        "    time.sleep(0.01)\n"
        "run.log_metrics({'val/loss': 0.125}, step=2)\n"
        "print(exp, flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env["CHRONICLE_HOME"] = str(tmp_path / "child-home" if backend.server else backend.home)
    if backend.server:
        env["CHRONICLE_URL"] = backend.server.url
    done = testkit.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    info = backend.connect().run(done.stdout.strip(), 0, 0).info()
    assert info.state is RunState.RUNNING and info.metrics["val/loss"]["last"] == 0.125


def test_close_on_an_unreachable_server_names_what_was_not_sent(
    http_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server went away: close() makes one bounded attempt and returns, naming the
    metrics it could not send at WARNING (training and the process go on)."""
    server = http_server()
    chronicle = Chronicle(url=server.url, home=tmp_path / "home", timeout=2)
    exp, (run,) = _started(chronicle)
    _beaten_once(run)
    server.kill()
    run.log_metrics({"val/loss": 0.75}, step=1)
    with caplog.at_level(logging.WARNING):
        chronicle.close(timeout=1)
    warned = [r for r in caplog.records if "could not send its last metrics" in r.getMessage()]
    assert len(warned) == 1 and "val/loss" in warned[0].getMessage()
    assert warned[0].levelno == logging.WARNING and exp in warned[0].getMessage()


def test_runs_sorted_by_the_store(chronicle) -> None:
    """``runs(sort=M)`` / ``runs_page``: best first by the objective's mode (or ``mode``),
    the runs without a value last, in pages of any size; bad input refused at once."""
    exp, runs = _started(chronicle, 4, objective={"metric": "acc", "mode": "max"})
    for run, acc in zip(runs[:3], (0.5, 0.9, 0.7), strict=True):
        run.log_metrics({"acc": acc}).heartbeat()
    assert [i.variation for i in chronicle.runs(exp, sort="acc")] == [1, 2, 0, 3]
    assert [i.variation for i in chronicle.runs(exp, sort="acc", mode="min")] == [0, 2, 1, 3]
    walked = list(chronicle.iter_runs(exp, page_size=1, sort="acc"))
    assert [i.variation for i in walked] == [1, 2, 0, 3] and walked[0].metrics["acc"]["max"] == 0.9
    page = chronicle.runs_page(exp, limit=2, sort="acc")
    assert [i.variation for i in page.items] == [1, 2] and page.next_cursor
    with pytest.raises(InvalidMetric):
        chronicle.runs(exp, sort="a/../b")
    with pytest.raises(InvalidMetric):
        chronicle.runs(exp, sort="acc", mode="up")
    with pytest.raises(InvalidRequest):
        chronicle.runs(exp, mode="max")
