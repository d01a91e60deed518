"""``chronicle best``, ``chronicle objective``, ``chronicle create --objective`` and
``chronicle runs --sort``: JSON for agents, exit codes and JSON errors, against the embedded
store and a real server (on PostgreSQL when configured)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import testkit

from chronicle_integrations import Chronicle


def _cli(home: Path, url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env["CHRONICLE_HOME"] = str(home)
    if url:
        env["CHRONICLE_URL"] = url
    return testkit.run(
        [sys.executable, "-m", "chronicle_integrations.cli", *args],
        env=env,
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_best_embedded(tmp_path: Path) -> None:
    _best_objective_and_sorted_runs(tmp_path / "home", None, tmp_path)
    _best_errors(tmp_path / "home2", None)


def test_best_http(store_url: str, server_factory: Any, tmp_path: Path) -> None:
    """Against a real server, on SQLite and PostgreSQL."""
    url = server_factory(store_url=store_url).url
    _best_objective_and_sorted_runs(tmp_path / "home", url, tmp_path)
    _best_errors(tmp_path / "home", url)


def _best_objective_and_sorted_runs(home: Path, url: str | None, tmp_path: Path) -> None:
    created = _ok(
        _cli(
            home,
            url,
            "create",
            "sweep",
            "--variation",
            '{"lr": 0.1}',
            "--variation",
            '{"lr": 0.01}',
            "--variation",
            '{"lr": 0.001}',
            "--objective",
            "val/loss",
            "--json",
        )
    )
    exp = created["experiment_id"]
    assert created["objective"] == {"metric": "val/loss", "mode": "min"}
    with Chronicle(url=url, home=home) as chronicle:
        for v, loss in enumerate((0.3, 0.1, 0.2)):
            run = chronicle.create_run(exp, v).start()
            ckpt = tmp_path / f"best-{v}.ckpt"
            ckpt.write_bytes(f"weights of {v}".encode())
            run.upload_asset(ckpt, metric={"metric": "val/loss", "value": loss, "step": 7})
            run.log_metrics({"val/loss": loss, "acc": 1 - loss}, step=7)
            if v < 2:
                run.succeed()
            else:
                run.heartbeat()  # still running: its metrics went with this beat
        chronicle.create_run(exp, 0).start()  # no metric at all: sorted last
    best = _ok(_cli(home, url, "best", exp, "--json"))
    assert (best["key"], best["state"], best["value"]) == (f"{exp}/1/0", "succeeded", 0.1)
    assert best["checkpoint"]["name"] == "best-1.ckpt"
    dest = tmp_path / "got.ckpt"
    downloaded = _cli(home, url, "download", best["key"], best["checkpoint"]["name"], str(dest))
    assert downloaded.returncode == 0, downloaded.stderr
    assert dest.read_bytes() == b"weights of 1"
    # The running variation 2 counts only on request; max on another metric.
    assert _ok(_cli(home, url, "best", exp, "--include-running", "--json"))["value"] == 0.1
    acc = _ok(_cli(home, url, "best", exp, "--metric", "acc", "--mode", "max", "--json"))
    assert acc["variation"] == 1
    # runs --sort: best first by the objective's mode; by --mode otherwise.
    ranked = _ok(_cli(home, url, "runs", "--experiment", exp, "--sort", "val/loss", "--json"))
    assert [(r["variation"], r["run"]) for r in ranked] == [(1, 0), (2, 0), (0, 0), (0, 1)]
    assert ranked[0]["metrics"]["val/loss"]["min"] == 0.1
    # Sorted by the store, a page at a time: --page / --cursor walk the same order.
    walked, cursor = [], None
    while True:
        where = ["--cursor", cursor] if cursor else ["--page"]
        page = _ok(
            _cli(home, url, "runs", "-e", exp, "--sort", "val/loss", "-n", "1", *where, "--json")
        )
        assert len(page["runs"]) == 1
        walked += page["runs"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [_key(r) for r in walked] == [_key(r) for r in ranked]
    top3 = _ok(_cli(home, url, "runs", "-e", exp, "--sort", "val/loss", "-n", "3", "--json"))
    assert [_key(r) for r in top3] == [_key(r) for r in ranked[:3]]
    top_acc = _ok(
        _cli(home, url, "runs", "-e", exp, "--sort", "acc", "--mode", "max", "-n", "2", "--json")
    )
    assert [r["variation"] for r in top_acc] == [1, 2]
    table = _cli(home, url, "runs", "-e", exp, "--sort", "val/loss")
    assert table.returncode == 0 and "VAL/LOSS (MIN)" in table.stdout
    lines = table.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [_key(r) for r in ranked]
    assert lines[1].split()[-1] == "0.1" and lines[-1].split()[-1] == "-"
    human = _cli(home, url, "best", exp)
    assert human.returncode == 0 and f"{exp}/1/0" in human.stdout and "best-1.ckpt" in human.stdout
    # Objective set later (the checkpoints were saved for val/loss, not for acc).
    goal = _ok(_cli(home, url, "objective", exp, "acc", "--mode", "max", "--json"))
    assert goal["objective"] == {"metric": "acc", "mode": "max"}
    by_acc = _ok(_cli(home, url, "best", exp, "--json"))
    assert (by_acc["metric"], by_acc["checkpoint"]) == ("acc", None)
    cleared = _ok(_cli(home, url, "objective", exp, "--clear", "--json"))
    assert cleared["objective"] is None


def _key(run: dict[str, Any]) -> str:
    """A run's ``E/V/R`` in the JSON of a runs listing."""
    return f"{run['experiment_id']}/{run['variation']}/{run['run']}"


def _best_errors(home: Path, url: str | None) -> None:
    exp = _ok(_cli(home, url, "create", "empty", "--variation", "{}", "--json"))["experiment_id"]
    no_objective = _cli(home, url, "best", exp, "--json")
    assert no_objective.returncode != 0
    assert json.loads(no_objective.stderr)["error"]["code"] == "invalid_request"
    nothing = _cli(home, url, "best", exp, "--metric", "loss", "--json")
    assert nothing.returncode == 3  # not found
    assert json.loads(nothing.stderr)["error"]["code"] == "not_found"
    bad = _cli(home, url, "best", exp, "--metric", "a/../b", "--json")
    assert bad.returncode != 0 and json.loads(bad.stderr)["error"]["code"] == "invalid_request"
    unknown = _cli(home, url, "best", "no-such-experiment", "--metric", "m", "--json")
    assert unknown.returncode == 3
    bad_sort = _cli(home, url, "runs", "-e", exp, "--sort", "a/../b", "--json")
    assert bad_sort.returncode != 0
    assert json.loads(bad_sort.stderr)["error"]["code"] == "invalid_request"
    if url:  # the server checks what the client would have refused
        with testkit.HttpApi(url) as api:
            for params in ({"sort": "a/../b"}, {"sort": "m", "mode": "up"}, {"mode": "max"}):
                answer = api.get("/v1/runs", params={"experiment_id": exp, **params})
                assert answer.status_code == 400, (params, answer.text)
                assert answer.json()["error"]["code"] == "invalid_request"
