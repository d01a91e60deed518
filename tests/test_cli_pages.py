"""``chronicle runs`` over more runs than a page, run for real as a subprocess against an
embedded store: ``--limit N``, the whole listing streamed a page at a time (one table, one
JSON array), and ``--page`` / ``--cursor`` for agents that keep their place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import cli, ok
from testkit import seed_runs

from chronicle_integrations._validation import DEFAULT_PAGE_SIZE
from chronicle_integrations.store import Store

TOTAL = 2 * DEFAULT_PAGE_SIZE + 100


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded home with TOTAL pending runs in two experiments."""
    home = tmp_path_factory.mktemp("cli-pages") / "home"
    store = Store.open_home(home)
    try:
        seed_runs(store, experiments=2, variations=1, runs=TOTAL // 2)
    finally:
        store.close()
    return home


def _keys(runs: list[dict[str, object]]) -> list[str]:
    return [f"{r['experiment_id']}/{r['variation']}/{r['run']}" for r in runs]


EXPECTED = [f"seed-{e:03d}/0/{r}" for e in range(2) for r in range(TOTAL // 2)]


def test_runs_json_is_one_array_of_every_run_and_limit_cuts_it(home: Path) -> None:
    everything = json.loads(ok(cli(home, "runs", "--json")))
    assert _keys(everything) == EXPECTED  # beyond the first pages, one JSON document
    assert "lease" not in everything[0]
    some = json.loads(ok(cli(home, "runs", "--json", "--limit", "700")))
    assert _keys(some) == EXPECTED[:700]
    one = json.loads(ok(cli(home, "runs", "--json", "-n", "1", "--experiment", "seed-001")))
    assert _keys(one) == ["seed-001/0/0"]
    assert json.loads(ok(cli(home, "runs", "--json", "--state", "running"))) == []


def test_runs_table_streams_pages_under_one_header(home: Path) -> None:
    lines = ok(cli(home, "runs")).splitlines()
    assert lines[0].split()[:2] == ["RUN", "STATE"]
    assert sum(line.startswith("RUN ") for line in lines) == 1
    assert [line.split()[0] for line in lines[1:]] == EXPECTED
    widths = {line.index("pending") for line in lines[1:]}
    assert len(widths) == 1, "the columns stay aligned across pages"
    lines = ok(cli(home, "runs", "--limit", "3")).splitlines()
    assert [line.split()[0] for line in lines[1:]] == EXPECTED[:3]


def test_runs_page_and_cursor_walk_for_agents(home: Path) -> None:
    got: list[str] = []
    page = json.loads(ok(cli(home, "runs", "--page", "--limit", "400", "--json")))
    while True:
        assert set(page) == {"runs", "next_cursor"} and len(page["runs"]) <= 400
        got += _keys(page["runs"])
        if page["next_cursor"] is None:
            break
        page = json.loads(
            ok(cli(home, "runs", "--json", "--limit", "400", "--cursor", page["next_cursor"]))
        )
    assert got == EXPECTED
    human = cli(home, "runs", "--page", "--limit", "2")
    assert len(ok(human).splitlines()) == 3 and "--cursor" in human.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--limit", "0"), "expected a positive integer"),
        (("--limit", "many"), "expected a positive integer"),
        (("--cursor", "garbage!", "--json"), "invalid cursor"),
        (("--page", "--limit", "5000", "--json"), "invalid limit 5000"),
    ],
)
def test_bad_limit_or_cursor_is_a_usage_error(
    home: Path, args: tuple[str, ...], needle: str
) -> None:
    result = cli(home, "runs", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr and result.stdout == ""
