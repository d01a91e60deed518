"""The transition table, leases and the watchdog, through HTTP, on SQLite and PostgreSQL.

Every (state, action) pair of SPEC section 3 is tried: allowed ones move the run (or, for an
identical repeat, succeed with no effect), refused ones answer 409 ``invalid_transition`` with
the run's state and change nothing. Event logs must always be walks through the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from server_helpers import Api, assert_error

from chronicle_integrations.lifecycle import (
    TRANSITIONS,
    Action,
    RunState,
    is_valid_path,
)

#: Actions a client can request, as (route, body builder given the run's lease).
CLIENT_ACTIONS: dict[Action, tuple[str, Callable[[str | None], dict[str, Any]]]] = {
    Action.START: ("start", lambda lease: {}),
    Action.RESUME: ("start", lambda lease: {"resume": True}),
    Action.HEARTBEAT: ("heartbeat", lambda lease: {"lease": lease}),
    Action.SUCCEED: ("succeed", lambda lease: {"lease": lease}),
    Action.FAIL_CRASH: ("fail", lambda lease: {"reason": "crash", "lease": lease}),
    Action.FAIL_ABANDONED: ("fail", lambda lease: {"reason": "abandoned"}),
}
#: The terminal state an action leads to, for idempotent repeats.
REPEATS = {
    Action.SUCCEED: RunState.SUCCEEDED,
    Action.FAIL_CRASH: RunState.FAILED_CRASH,
    Action.FAIL_ABANDONED: RunState.FAILED_ABANDONED,
}


def expected(action: Action, state: RunState) -> RunState | None:
    """What the table says ``action`` does from ``state`` (None: refused)."""
    target = TRANSITIONS[action].get(state)
    if target is None and REPEATS.get(action) is state:
        return state  # an identical repeat: success with no effect
    return target


def events_of(api: Api, path: str) -> list[dict[str, Any]]:
    return list(api.ok("GET", f"{path}/events")["events"])


def assert_valid_log(api: Api, path: str) -> None:
    edges = [
        (e["from_state"], e["to_state"]) for e in events_of(api, path) if e["kind"] == "transition"
    ]
    assert is_valid_path(edges), edges


def wait_for_state(api: Api, path: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = api.ok("GET", path)
        if info["state"] == state or time.monotonic() > deadline:
            assert info["state"] == state, info
            return dict(info)
        time.sleep(0.05)


def apply_and_check(
    api: Api, path: str, lease: str | None, state: RunState, action: Action
) -> None:
    route, body = CLIENT_ACTIONS[action]
    before = events_of(api, path)
    resp = api.post(f"{path}/{route}", json=body(lease))
    target = expected(action, state)
    label = f"{action} from {state}"
    if target is None:
        error = assert_error(resp, 409, "invalid_transition")
        assert error["state"] == state.value, (label, error)
        assert api.state(path) == state.value, label
        assert events_of(api, path) == before, label
    else:
        assert resp.status_code == 200, (label, resp.text)
        assert resp.json()["state"] == target.value, label
        assert api.state(path) == target.value, label
        after = events_of(api, path)
        if target is state and (state.is_terminal or action is Action.HEARTBEAT):
            assert after == before, f"{label}: a repeat must not log an event"
        else:
            assert after[-1]["from_state"] == state.value, label
            assert after[-1]["to_state"] == target.value, label
    assert_valid_log(api, path)


def make_run_in(api: Api, state: RunState) -> tuple[str, str | None]:
    """A run in ``state`` (not lost/failed_lost: those need the watchdog server)."""
    path = api.run()
    if state is RunState.PENDING:
        return path, None
    lease = api.ok("POST", f"{path}/start")["lease"]
    if state is RunState.RUNNING:
        return path, lease
    if state is RunState.SUCCEEDED:
        api.ok("POST", f"{path}/succeed", json={"lease": lease})
    elif state is RunState.FAILED_CRASH:
        api.ok("POST", f"{path}/fail", json={"reason": "crash", "lease": lease})
    elif state is RunState.FAILED_ABANDONED:
        api.ok("POST", f"{path}/fail", json={"reason": "abandoned"})
    assert api.state(path) == state.value
    return path, lease


DIRECT_STATES = [
    RunState.PENDING,
    RunState.RUNNING,
    RunState.SUCCEEDED,
    RunState.FAILED_CRASH,
    RunState.FAILED_ABANDONED,
]


@pytest.mark.parametrize("state", DIRECT_STATES, ids=str)
@pytest.mark.parametrize("action", list(CLIENT_ACTIONS), ids=str)
def test_transition_table(api: Api, state: RunState, action: Action) -> None:
    path, lease = make_run_in(api, state)
    apply_and_check(api, path, lease, state, action)


@pytest.mark.parametrize(
    "action", [Action.SUCCEED, Action.FAIL_CRASH, Action.FAIL_ABANDONED], ids=str
)
def test_terminal_repeat_is_idempotent_and_others_refused(api: Api, action: Action) -> None:
    path, lease = make_run_in(api, RunState.RUNNING)
    route, body = CLIENT_ACTIONS[action]
    first = api.ok("POST", f"{path}/{route}", json=body(lease))
    for _ in range(3):  # retries after a lost response are safe
        assert api.ok("POST", f"{path}/{route}", json=body(lease)) == first
    for other, (other_route, other_body) in CLIENT_ACTIONS.items():
        if other is not action and REPEATS.get(other) is not RunState(first["state"]):
            assert_error(
                api.post(f"{path}/{other_route}", json=other_body(lease)), 409, "invalid_transition"
            )
    assert api.ok("GET", path) == first
    assert len([e for e in events_of(api, path) if e["to_state"] == first["state"]]) == 1


def test_heartbeat_to_terminal_run_tells_the_state(api: Api) -> None:
    path, lease = make_run_in(api, RunState.RUNNING)
    api.ok("POST", f"{path}/fail", json={"reason": "abandoned"})  # an operator cancels
    error = assert_error(
        api.post(f"{path}/heartbeat", json={"lease": lease}), 409, "invalid_transition"
    )
    assert error["state"] == "failed_abandoned"
    assert "cancelled" in error["message"]


def test_fail_records_reason_and_bounded_message(api: Api) -> None:
    path, lease = make_run_in(api, RunState.RUNNING)
    message = "Traceback (most recent call last):\n" + "x" * 200_000 + "\nValueError: end"
    info = api.ok(
        "POST", f"{path}/fail", json={"reason": "crash", "message": message, "lease": lease}
    )
    assert info["reason"] == "crash"
    assert info["message"].endswith("ValueError: end")
    assert len(info["message"].encode()) <= 64 * 1024


def test_succeed_and_fail_keep_the_final_progress(api: Api) -> None:
    """The terminal transition carries where training ended; bad progress is a 400 that
    leaves the run as it was (running, progress unchanged)."""
    path, lease = api.started()
    api.ok("POST", f"{path}/heartbeat", json={"lease": lease, "progress": {"step": 3}})
    error = assert_error(
        api.post(f"{path}/succeed", json={"lease": lease, "progress": {"step": True}}),
        400,
        "invalid_request",
    )
    assert error["field"] == "progress"
    assert api.ok("GET", path)["state"] == "running"
    done = api.ok("POST", f"{path}/succeed", json={"lease": lease, "progress": {"step": 9}})
    assert done["state"] == "succeeded" and done["progress"] == {"step": 9}
    assert api.ok("GET", path)["progress"] == {"step": 9}
    path, lease = api.started()
    crashed = api.ok(
        "POST",
        f"{path}/fail",
        json={"reason": "crash", "lease": lease, "progress": {"step": 4, "epoch": 1}},
    )
    assert crashed["state"] == "failed_crash"
    assert crashed["progress"] == {"step": 4, "epoch": 1}


# ------------------------------------------------------------------------------- leases
def test_leases(api: Api) -> None:
    path, lease_a = make_run_in(api, RunState.RUNNING)
    # A second worker cannot start it, nor act under another or no lease.
    assert_error(api.post(f"{path}/start", json={"holder": "b"}), 409, "invalid_transition")
    for route, body in [
        ("heartbeat", {"lease": "someone-elses-lease"}),
        ("heartbeat", {}),
        ("succeed", {"lease": "someone-elses-lease"}),
        ("succeed", None),
        ("fail", {"reason": "crash", "lease": "someone-elses-lease"}),
        ("fail", {"reason": "crash"}),
    ]:
        error = assert_error(api.post(f"{path}/{route}", json=body), 409, "lease_conflict")
        assert error["state"] == "running"
    assert_error(api.post(f"{path}/uploads", json={"name": "x.bin"}), 409, "lease_conflict")
    assert_error(
        api.post(f"{path}/uploads", json={"name": "x.bin", "lease": "wrong-lease-1"}),
        409,
        "lease_conflict",
    )
    assert api.state(path) == "running"

    # Takeover by resume: the new lease works, the stale one is refused.
    taken = api.ok("POST", f"{path}/start", json={"resume": True, "holder": "worker-b"})
    lease_b = taken["lease"]
    assert lease_b != lease_a and taken["lease_holder"] == "worker-b"
    error = assert_error(
        api.post(f"{path}/heartbeat", json={"lease": lease_a}), 409, "lease_conflict"
    )
    assert "worker-b" in error["message"]
    assert_error(api.post(f"{path}/succeed", json={"lease": lease_a}), 409, "lease_conflict")
    api.ok("POST", f"{path}/heartbeat", json={"lease": lease_b})
    # Anyone authorised may cancel: no lease needed.
    assert (
        api.ok("POST", f"{path}/fail", json={"reason": "abandoned"})["state"] == "failed_abandoned"
    )
    causes = [e["cause"] for e in events_of(api, path)]
    assert causes == ["create", "start", "resume", "fail_abandoned"]


def test_pending_run_may_crash_without_lease(api: Api) -> None:
    path = api.run()
    assert api.ok("POST", f"{path}/fail", json={"reason": "crash"})["state"] == "failed_crash"


# ------------------------------------------------------------------------------- watchdog
@pytest.fixture(scope="module")
def watchdog_server(module_server_factory: Any, module_store_factory: Any) -> Iterator[Any]:
    """A server with a 1 s heartbeat timeout, a 3 s recovery window and a 1 s stall timeout,
    on its own database
    (its watchdog must not touch the runs of the module's other server)."""
    process = module_server_factory(
        store_url=module_store_factory(),
        heartbeat_timeout=1.0,
        lost_grace=3.0,
        extra_args=["--stall-timeout", "1"],
    )
    yield process
    process.stop()


@pytest.fixture
def wapi(watchdog_server: Any) -> Iterator[Api]:
    client = Api(watchdog_server.url)
    yield client
    client.close()


def test_watchdog_lost_then_back_to_running(wapi: Api, watchdog_server: Any) -> None:
    path, lease = wapi.started()
    lost = wait_for_state(wapi, path, "lost")
    assert lost["ended_at"] is None
    assert [
        r["run"]
        for r in wapi.ok(
            "GET", "/v1/runs", params={"experiment_id": path.split("/")[3], "state": "lost"}
        )["runs"]
    ] == [0]
    back = wapi.ok("POST", f"{path}/heartbeat", json={"lease": lease})
    assert back["state"] == "running"
    transitions = [(e["from_state"], e["to_state"], e["cause"]) for e in events_of(wapi, path)]
    assert transitions == [
        (None, "pending", "create"),
        ("pending", "running", "start"),
        ("running", "lost", "watchdog"),
        ("lost", "running", "heartbeat"),
    ]
    assert_valid_log(wapi, path)


def test_transition_table_from_lost(wapi: Api) -> None:
    runs = {action: wapi.started() for action in CLIENT_ACTIONS}  # one lost run per action
    for path, _ in runs.values():
        wait_for_state(wapi, path, "lost")
    for action, (path, lease) in runs.items():
        apply_and_check(wapi, path, lease, RunState.LOST, action)


def test_watchdog_expires_lost_runs_and_terminal_states_never_change(
    wapi: Api, watchdog_server: Any
) -> None:
    expiring, lease = wapi.started()
    done, done_lease = wapi.started()
    wapi.ok("POST", f"{done}/succeed", json={"lease": done_lease})
    cancelled = wapi.run()
    wapi.ok("POST", f"{cancelled}/fail", json={"reason": "abandoned"})

    info = wait_for_state(wapi, expiring, "failed_lost")
    assert info["reason"] == "lost" and info["ended_at"] is not None
    # The sweep thread persists it (its log line proves the thread ran, not only the read).
    deadline = time.monotonic() + 30
    while "expired" not in watchdog_server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "watchdog:" in watchdog_server.output()
    states = [e["to_state"] for e in events_of(wapi, expiring)]
    assert states == ["pending", "running", "lost", "failed_lost"]
    for action in CLIENT_ACTIONS:
        route, body = CLIENT_ACTIONS[action]
        error = assert_error(
            wapi.post(f"{expiring}/{route}", json=body(lease)), 409, "invalid_transition"
        )
        assert error["state"] == "failed_lost"
    assert wapi.ok("GET", expiring) == info
    assert wapi.state(done) == "succeeded" and wapi.state(cancelled) == "failed_abandoned"
    for path in (expiring, done, cancelled):
        assert_valid_log(wapi, path)


def test_heartbeat_progress_and_stalled_flag(wapi: Api) -> None:
    path, lease = wapi.started()
    info = wapi.ok(
        "POST",
        f"{path}/heartbeat",
        json={"lease": lease, "progress": {"step": 1, "phase": "train"}},
    )
    assert info["progress"] == {"step": 1, "phase": "train"} and info["stalled"] is False
    assert wapi.ok("GET", path)["progress"] == {"step": 1, "phase": "train"}
    # Beating without advancing: alive (never lost) but, after the stall timeout, stalled.
    deadline = time.monotonic() + 30
    while not info["stalled"]:
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
        info = wapi.ok(
            "POST",
            f"{path}/heartbeat",
            json={"lease": lease, "progress": {"step": 1, "phase": "train"}},
        )
        assert info["state"] == "running"
    assert wapi.ok("GET", path)["stalled"] is True
    advanced = wapi.ok(
        "POST",
        f"{path}/heartbeat",
        json={"lease": lease, "progress": {"step": 2, "phase": "train"}},
    )
    assert advanced["stalled"] is False and advanced["progress"]["step"] == 2
    for bad in (
        [1, 2],
        {"nested": {"a": 1}},
        {f"k{i}": i for i in range(17)},
        "step=3",
        {"step": True},
        {"x" * 65: 1},
        {"s": "y" * 65},
    ):
        error = assert_error(
            wapi.post(f"{path}/heartbeat", json={"lease": lease, "progress": bad}),
            400,
            "invalid_request",
        )
        assert error["field"] == "progress"
    assert wapi.ok("GET", path)["progress"] == {"step": 2, "phase": "train"}
    wapi.ok("POST", f"{path}/succeed", json={"lease": lease})
    assert wapi.ok("GET", path)["stalled"] is False
