"""The run lifecycle through the client, identically on the embedded store and over HTTP."""

from __future__ import annotations

import threading
import time

import pytest
from client_helpers import transitions

from chronicle_integrations import (
    AlreadyExists,
    APIError,
    Chronicle,
    ChronicleError,
    InvalidRequest,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    Run,
    RunInfo,
    RunState,
)
from chronicle_integrations.lifecycle import is_valid_path


# ---------------------------------------------------------------------- experiments and runs
def test_create_experiment_variations_and_run_numbers(chronicle: Chronicle) -> None:
    exp = chronicle.create_experiment("lr sweep", variations=[{"lr": 0.1}, {"lr": 0.01}])
    assert isinstance(exp, str) and exp
    assert chronicle.add_variation(exp, {"lr": 0.001, "nested": {"a": [1, 2]}}) == 2
    assert chronicle.add_variation(exp, {}) == 3
    assert exp in [e.experiment_id for e in chronicle.experiments()]

    # max(run) + 1 per variation, 0 for the first; variations are independent
    numbers = [chronicle.create_run(exp, 1).run for _ in range(3)]
    assert numbers == [0, 1, 2]
    assert chronicle.create_run(exp, 0).run == 0
    assert chronicle.create_run(exp, 1).run == 3

    run = chronicle.create_run(exp, 2)
    assert (run.experiment_id, run.variation, run.run) == (exp, 2, 0)
    assert run.get_variation_config() == {"lr": 0.001, "nested": {"a": [1, 2]}}
    assert chronicle.run(exp, 1, 0).get_variation_config() == {"lr": 0.01}
    assert chronicle.run(exp, 3, 0).get_variation_config() == {}
    assert run.state is RunState.PENDING


def test_explicit_experiment_id(chronicle: Chronicle) -> None:
    exp = chronicle.create_experiment("named", variations=[{"x": 1}], experiment_id="my-exp.1")
    assert exp == "my-exp.1"
    # a retried identical creation is a success with no effect
    assert chronicle.create_experiment("named", [{"x": 1}], experiment_id="my-exp.1") == exp
    assert chronicle.create_run(exp, 0).run == 0


def test_experiment_id_taken_with_another_definition(chronicle: Chronicle) -> None:
    exp = chronicle.create_experiment("first", [{"a": 1}], experiment_id="taken-id")
    with pytest.raises(AlreadyExists) as caught:
        chronicle.create_experiment("second", [{"a": 2}], experiment_id=exp)
    assert caught.value.code == "already_exists"
    info = chronicle.experiment(exp)
    assert (info.experiment_id, info.name, info.variations) == (exp, "first", 1)
    assert chronicle.create_run(exp, 0).get_variation_config() == {"a": 1}


def test_handles_do_no_io(chronicle: Chronicle) -> None:
    # A handle on a run that does not exist is fine until it is used.
    handle = chronicle.run("no-such-experiment", 0, 7)
    assert (handle.experiment_id, handle.variation, handle.run) == ("no-such-experiment", 0, 7)
    with pytest.raises(NotFound):
        handle.info()


# ---------------------------------------------------------------------- transitions
def test_mutators_chain_and_return_self(chronicle: Chronicle, experiment: str) -> None:
    chronicle.create_run(experiment, 0)
    run = chronicle.run(experiment, 0, 0)
    assert run.start() is run
    assert run.heartbeat() is run
    assert run.succeed() is run
    assert run.state is RunState.SUCCEEDED

    other = chronicle.create_run(experiment, 0)
    assert other.start().fail("crash", "boom") is other
    info = other.info()
    assert (info.state, info.reason, info.message) == (RunState.FAILED_CRASH, "crash", "boom")


def test_spec_one_liner_verbatim(chronicle: Chronicle) -> None:
    exp = chronicle.create_experiment("lr-sweep", variations=[{"lr": 0.1}, {"lr": 0.01}])
    run = chronicle.create_run(exp, variation=1)
    cfg = run.get_variation_config()
    assert cfg == {"lr": 0.01}
    chronicle.create_run(exp, variation=0)

    chronicle.run(exp, 0, 0).start().heartbeat()

    info = chronicle.run(exp, 0, 0).info()
    assert info.state is RunState.RUNNING
    assert info.started_at is not None and info.last_heartbeat_at is not None


def test_info_fields(chronicle: Chronicle, run: Run) -> None:
    info = run.info()
    assert isinstance(info, RunInfo)
    assert info.state is RunState.PENDING and info.started_at is None
    assert info.key == run.key == f"{run.experiment_id}/0/0"
    run.start()
    info = run.info()
    assert info.state is RunState.RUNNING
    assert info.started_at is not None and info.started_at >= info.created_at
    assert info.lease_holder  # host:pid of the worker
    run.succeed()
    info = run.info()
    assert info.ended_at is not None and info.ended_at >= info.started_at
    assert info.asset_count == 0


def test_idempotent_repeats(chronicle: Chronicle, run: Run) -> None:
    run.start()
    run.start()  # the same handle (same lease): a success with no effect
    run.start().start()
    run.heartbeat().heartbeat()
    run.succeed()
    run.succeed()  # a retried succeed is a success with no effect
    assert run.state is RunState.SUCCEEDED
    edges = transitions(run)
    assert edges == [(None, "pending"), ("pending", "running"), ("running", "succeeded")]

    crashed = chronicle.create_run(run.experiment_id, 0).start()
    crashed.fail("crash", "first")
    crashed.fail("crash", "second")
    assert crashed.info().message == "first"  # terminal states never change

    cancelled = chronicle.create_run(run.experiment_id, 0)
    cancelled.fail("abandoned").fail("abandoned")
    assert cancelled.state is RunState.FAILED_ABANDONED


@pytest.mark.parametrize(
    ("setup", "action", "state"),
    [
        ("pending", lambda r: r.heartbeat(), "pending"),
        ("pending", lambda r: r.succeed(), "pending"),
        ("succeeded", lambda r: r.fail("crash"), "succeeded"),
        ("succeeded", lambda r: r.fail("abandoned"), "succeeded"),
        ("succeeded", lambda r: r.heartbeat(), "succeeded"),
        ("succeeded", lambda r: r.start(resume=True), "succeeded"),
        ("failed_crash", lambda r: r.succeed(), "failed_crash"),
        ("failed_abandoned", lambda r: r.start(), "failed_abandoned"),
        ("failed_abandoned", lambda r: r.heartbeat(), "failed_abandoned"),
        ("failed_abandoned", lambda r: r.succeed(), "failed_abandoned"),
    ],
)
def test_invalid_transitions_raise_with_state(
    chronicle: Chronicle, run: Run, setup: str, action, state: str
) -> None:
    if setup == "succeeded":
        run.start().succeed()
    elif setup == "failed_crash":
        run.start().fail("crash")
    elif setup == "failed_abandoned":
        run.start().fail("abandoned")
    with pytest.raises(InvalidTransition) as caught:
        action(run)
    assert caught.value.state == state
    assert caught.value.code == "invalid_transition"
    assert run.state.value == state  # nothing changed


def test_start_of_a_running_run_without_resume_is_refused(chronicle: Chronicle, run: Run) -> None:
    run.start()
    other = chronicle.run(run.experiment_id, run.variation, run.run)
    with pytest.raises(InvalidTransition) as caught:
        other.start()
    assert caught.value.state == "running"


def test_second_worker_is_refused(backend, chronicle: Chronicle, run: Run) -> None:
    run.start()
    for client in (chronicle, backend.connect()):
        intruder = client.run(run.experiment_id, run.variation, run.run)
        with pytest.raises(LeaseConflict) as caught:
            intruder.heartbeat()
        assert caught.value.code == "lease_conflict"
        with pytest.raises(LeaseConflict):
            intruder.succeed()
        with pytest.raises(LeaseConflict):
            intruder.fail("crash", "not mine")
    assert run.state is RunState.RUNNING
    run.heartbeat().succeed()


def test_takeover_refuses_the_stale_handle(backend, chronicle: Chronicle, run: Run) -> None:
    run.start()
    stale_lease = run.lease
    newcomer = backend.connect().run(run.experiment_id, run.variation, run.run)
    newcomer.start(resume=True)
    assert newcomer.lease and newcomer.lease != stale_lease
    with pytest.raises(LeaseConflict):
        run.heartbeat()
    with pytest.raises(LeaseConflict):
        run.succeed()
    with pytest.raises(LeaseConflict):
        run.fail("crash")
    newcomer.heartbeat().succeed()
    assert run.state is RunState.SUCCEEDED
    assert is_valid_path(transitions(run))
    assert ("running", "running") in transitions(run)  # the takeover is in the timeline


def test_resume_of_a_pending_run_starts_it(chronicle: Chronicle, run: Run) -> None:
    run.start(resume=True).heartbeat()
    assert run.state is RunState.RUNNING


def test_abandon_needs_no_lease(backend, chronicle: Chronicle, run: Run) -> None:
    run.start()
    operator = backend.connect()
    operator.run(run.experiment_id, run.variation, run.run).fail("abandoned", "operator")
    info = run.info()
    assert info.state is RunState.FAILED_ABANDONED
    assert info.reason == "abandoned"
    with pytest.raises(InvalidTransition) as caught:
        run.heartbeat()
    assert caught.value.state == "failed_abandoned"
    with pytest.raises(InvalidTransition):
        run.succeed()


def test_pending_run_may_crash_without_lease(chronicle: Chronicle, run: Run) -> None:
    chronicle.run(run.experiment_id, 0, 0).fail("crash", "setup failed")
    assert run.state is RunState.FAILED_CRASH


def test_message_is_bounded(chronicle: Chronicle, run: Run) -> None:
    run.start().fail("crash", "x" * 200_000 + "THE-END")
    message = run.info().message
    assert message is not None
    assert len(message.encode()) <= 64 * 1024
    assert message.endswith("THE-END")  # the end (a traceback's cause) is kept


# ---------------------------------------------------------------------- the with-block
def test_with_block_succeeds(chronicle: Chronicle, run: Run) -> None:
    with run.start() as inside:
        assert inside is run
        assert run.state is RunState.RUNNING
    assert run.state is RunState.SUCCEEDED


def test_with_block_crash_records_exception(chronicle: Chronicle, run: Run) -> None:
    with pytest.raises(ValueError, match="loss is nan"), run.start():
        raise ValueError("loss is nan at step 12")
    info = run.info()
    assert info.state is RunState.FAILED_CRASH
    assert info.reason == "crash"
    assert info.message is not None
    assert "ValueError" in info.message and "loss is nan at step 12" in info.message


def test_with_block_keyboard_interrupt_abandons(chronicle: Chronicle, run: Run) -> None:
    with pytest.raises(KeyboardInterrupt), run.start():
        raise KeyboardInterrupt
    info = run.info()
    assert info.state is RunState.FAILED_ABANDONED
    assert info.reason == "abandoned"


def test_with_block_never_hides_the_training_exception(
    backend, chronicle: Chronicle, run: Run
) -> None:
    with pytest.raises(ValueError, match="training blew up"), run.start():
        backend.connect().run(run.experiment_id, 0, 0).fail("abandoned")
        raise ValueError("training blew up")
    assert run.state is RunState.FAILED_ABANDONED


def test_adopted_lease_may_beat_and_end_the_run(backend, chronicle: Chronicle, run: Run) -> None:
    """A launcher starts the run and passes its lease to the job (CHRONICLE_LEASE)."""
    run.start()
    job = backend.connect().run(run.experiment_id, run.variation, run.run, lease=run.lease)
    job.heartbeat().succeed()
    assert run.state is RunState.SUCCEEDED


def test_with_block_needs_start(chronicle: Chronicle, run: Run) -> None:
    with pytest.raises(ChronicleError), run:
        pass
    assert run.state is RunState.PENDING


def test_with_block_keeps_heartbeats_alive(chronicle: Chronicle, run: Run) -> None:
    with run.start():
        first = run.info().last_heartbeat_at
        # the block's keep-alive sent its first beat as soon as it started
        deadline = time.monotonic() + 30
        while first is None and time.monotonic() < deadline:
            time.sleep(0.05)
            first = run.info().last_heartbeat_at
        assert first is not None
    assert run.state is RunState.SUCCEEDED


# ---------------------------------------------------------------------- listings and timeline
def test_runs_filter_by_state_and_experiment(chronicle: Chronicle) -> None:
    exp = chronicle.create_experiment("listing", variations=[{"a": 1}])
    other = chronicle.create_experiment("listing-other", variations=[{"a": 2}])
    pending = chronicle.create_run(exp, 0)
    running = chronicle.create_run(exp, 0).start()
    done = chronicle.create_run(exp, 0).start().succeed()
    crashed = chronicle.create_run(exp, 0).start().fail("crash")
    cancelled = chronicle.create_run(exp, 0).fail("abandoned")
    chronicle.create_run(other, 0).start()

    def keys(infos: list[RunInfo]) -> list[int]:
        return sorted(i.run for i in infos)

    assert keys(chronicle.runs(exp)) == [0, 1, 2, 3, 4]
    assert keys(chronicle.runs(exp, state="pending")) == [pending.run]
    assert keys(chronicle.runs(exp, state=RunState.RUNNING)) == [running.run]
    assert keys(chronicle.runs(exp, state="succeeded")) == [done.run]
    assert keys(chronicle.runs(exp, state="failed_crash")) == [crashed.run]
    assert keys(chronicle.runs(exp, state="failed_abandoned")) == [cancelled.run]
    assert chronicle.runs(exp, state="lost") == []
    all_running = chronicle.runs(state="running")
    assert {i.experiment_id for i in all_running} >= {exp, other}
    assert all(i.state is RunState.RUNNING for i in all_running)
    with pytest.raises(InvalidRequest):
        chronicle.runs(exp, state="exploded")


def test_events_form_a_valid_path(backend, chronicle: Chronicle, run: Run) -> None:
    run.start().heartbeat()
    backend.connect().run(run.experiment_id, 0, 0).start(resume=True).heartbeat().succeed()
    events = run.events()
    edges = transitions(run)
    assert is_valid_path(edges)
    assert edges == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "running"),
        ("running", "succeeded"),
    ]
    times = [e.at for e in events]
    assert times == sorted(times)
    assert all(e.cause for e in events)
    assert [e.id for e in events] == sorted({e.id for e in events})

    for setup in (
        lambda r: r.start().fail("crash", "x"),
        lambda r: r.fail("abandoned"),
        lambda r: r.start().fail("abandoned"),
    ):
        other = chronicle.create_run(run.experiment_id, 1)
        setup(other)
        assert is_valid_path(transitions(other))


def test_run_state_enum() -> None:
    assert len(RunState) == 7
    assert {s.value for s in RunState} == {
        "pending",
        "running",
        "succeeded",
        "failed_crash",
        "failed_abandoned",
        "lost",
        "failed_lost",
    }
    assert {s for s in RunState if s.is_terminal} == {
        RunState.SUCCEEDED,
        RunState.FAILED_CRASH,
        RunState.FAILED_ABANDONED,
        RunState.FAILED_LOST,
    }
    assert isinstance(RunState.RUNNING, str) and RunState.RUNNING == "running"
    assert str(RunState.LOST) == "lost"
    assert not RunState.LOST.is_terminal


# ---------------------------------------------------------------------- errors
def test_error_classes(chronicle: Chronicle, experiment: str) -> None:
    with pytest.raises(NotFound) as caught:
        chronicle.run(experiment, 0, 999).start()
    assert caught.value.code == "not_found"
    assert isinstance(caught.value, APIError) and isinstance(caught.value, ChronicleError)
    with pytest.raises(NotFound):
        chronicle.run(experiment, 0, 999).fail("abandoned")
    with pytest.raises(NotFound):
        chronicle.run(experiment, 0, 999).events()
    with pytest.raises(NotFound):
        chronicle.create_run(experiment, 42)
    with pytest.raises(NotFound):
        chronicle.create_run("unknown-experiment", 0)
    with pytest.raises(NotFound):
        chronicle.run(experiment, 9, 0).get_variation_config()
    with pytest.raises(NotFound):
        chronicle.add_variation("unknown-experiment", {"a": 1})


@pytest.mark.parametrize("bad", ["", "-leading-dash", "has space", "a/b", "x" * 129, "é"])
def test_invalid_experiment_ids(chronicle: Chronicle, bad: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chronicle.run(bad, 0, 0)
    assert caught.value.code == "invalid_request"
    with pytest.raises(InvalidRequest):
        chronicle.create_experiment("ok", [{}], experiment_id=bad)


def test_invalid_requests(chronicle: Chronicle, run: Run) -> None:
    with pytest.raises(InvalidRequest):
        chronicle.run(run.experiment_id, -1, 0)
    with pytest.raises(InvalidRequest):
        chronicle.run(run.experiment_id, 0, 2**31)
    with pytest.raises(InvalidRequest):
        chronicle.run(run.experiment_id, True, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        chronicle.create_experiment("")
    with pytest.raises(InvalidRequest):
        chronicle.create_experiment("bad\nname")
    with pytest.raises(InvalidRequest):
        chronicle.add_variation(run.experiment_id, ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        chronicle.add_variation(run.experiment_id, {"x": float("nan")})
    with pytest.raises(InvalidRequest):
        run.start().fail("exploded")
    assert run.state is RunState.RUNNING


def test_concurrent_create_run_numbers_are_unique(
    backend, chronicle: Chronicle, experiment: str
) -> None:
    clients = [chronicle, backend.connect()]
    numbers: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def create(client: Chronicle) -> None:
        try:
            for _ in range(5):
                n = client.create_run(experiment, 1).run
                with lock:
                    numbers.append(n)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(c,)) for c in clients for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert sorted(numbers) == list(range(20))
