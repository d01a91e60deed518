"""One identity rule and one outcome rule for every integration (the architecture issue).

Identity: a table of situations through the shared resolver (explicit identity; the
environment with a lease; without a lease, resuming from a checkpoint or not; a checkpoint
whose run ended; the same ``experiment_name`` twice), then the situations where the
integrations used to disagree, trained for real on tiny CPU models with Lightning and
Transformers, compared row by row. Outcomes: ``RuntimeError`` -> ``failed_crash`` with its
message, ``KeyboardInterrupt`` -> ``failed_abandoned``, ``SystemExit`` (pre-emption) -> no
terminal state, for a real Lightning fit, a real Transformers ``train()`` and a real Hydra job.
"""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _hf_app as hf
import _lightning_app as lightning_app
import pytest
import testkit

from chronicle_integrations import Chronicle, RunState
from chronicle_integrations._frameworks import UNKNOWN_RUN, EnvIdentity, resolve, settle
from chronicle_integrations._models import RunKey

pytestmark = [pytest.mark.frameworks, pytest.mark.filterwarnings("ignore")]

K = RunKey("e", 0, 3)
SAVED = RunKey("s", 1, 2)
LEASED = EnvIdentity(K, "lease-token")
UNLEASED = EnvIdentity(K, None)

# situation -> (resolver inputs, expected (key, create, resume, owns_end))
IDENTITY_TABLE: dict[str, tuple[dict[str, Any], tuple[Any, Any, bool, bool]]] = {
    "explicit run": (dict(experiment_id="e", variation=0, run=3), (K, None, False, True)),
    "explicit run, resuming": (
        dict(experiment_id="e", variation=0, run=3, resuming=True, saved=SAVED),
        (K, None, True, True),
    ),
    "explicit variation": (dict(experiment_id="e", variation=1), (None, ("e", 1), False, True)),
    "explicit experiment, checkpoint in it": (
        dict(experiment_id="s", resuming=True, saved=SAVED),
        (SAVED, None, True, True),
    ),
    "env with lease": (dict(env=LEASED), (K, None, False, False)),
    "env with lease, resuming": (
        dict(env=LEASED, resuming=True, saved=SAVED),
        (K, None, False, False),
    ),
    "env without lease, resuming": (
        dict(env=UNLEASED, resuming=True, saved=SAVED),
        (K, None, True, True),
    ),
    "env without lease, resuming, no identity in checkpoint": (
        dict(env=UNLEASED, resuming=True),
        (K, None, True, True),
    ),
    "env without lease, no checkpoint": (dict(env=UNLEASED), (K, None, False, True)),
    "checkpoint": (dict(resuming=True, saved=SAVED), (SAVED, None, True, True)),
    "nothing": (dict(experiment_name="n"), (None, None, False, True)),
}


@pytest.mark.parametrize("situation", sorted(IDENTITY_TABLE))
def test_identity_table(situation: str) -> None:
    inputs, (key, create, resume, owns_end) = IDENTITY_TABLE[situation]
    decision = resolve(**inputs)
    assert (decision.key, decision.create, decision.resume, decision.owns_end) == (
        key,
        create,
        resume,
        owns_end,
    )


def test_a_run_that_ended_is_replaced_by_a_new_run_of_its_variation() -> None:
    ended = settle(resolve(resuming=True, saved=SAVED), lambda key: "already succeeded")
    assert (ended.key, ended.create, ended.resume) == (None, ("s", 1), False)
    assert ended.replaces == (SAVED, "already succeeded")
    unknown = settle(
        resolve(resuming=True, saved=SAVED, experiment_name="n"), lambda key: UNKNOWN_RUN
    )
    assert (unknown.key, unknown.create, unknown.experiment_name) == (None, None, "n")
    adopted = resolve(env=LEASED, resuming=True)
    assert settle(adopted, lambda key: "already succeeded") is adopted  # the owner decides


# --------------------------------------------------------------------------- real trainings
class Framework:
    """One integration driven the same way: ``train(client, out, resume, raise_at,
    **callback_kwargs)`` returns the tracked run's handle after a short training (or after it
    raised) and what it raised."""

    name: str

    def callback(self, client: Chronicle, **kwargs: Any) -> Any:
        raise NotImplementedError

    def fit(self, callback: Any, out: Path, resume: bool, raise_at: BaseException | None) -> None:
        """Train once with ``callback`` (resuming from the first training's checkpoint);
        ``raise_at`` is raised from a hook at step 2."""
        raise NotImplementedError

    def train(
        self,
        client: Chronicle,
        out: Path,
        resume: bool = False,
        raise_at: BaseException | None = None,
        **kwargs: Any,
    ) -> tuple[Any, BaseException | None]:
        callback = self.callback(client, **kwargs)
        error = None
        sigint = signal.getsignal(signal.SIGINT)
        try:
            self.fit(callback, out, resume, raise_at)
        except BaseException as exc:  # Lightning turns Ctrl+C into SystemExit(1)
            error = exc
        finally:
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after Ctrl+C
        return callback.run, error


class LightningFit(Framework):
    name = "lightning"

    def __init__(self) -> None:
        self.app = lightning_app.build("lightning")

    def callback(self, client: Chronicle, **kwargs: Any) -> Any:
        return self.app.ChronicleCallback(chronicle=client, heartbeat_interval=0.2, **kwargs)

    def fit(self, callback: Any, out: Path, resume: bool, raise_at: BaseException | None) -> None:
        import lightning.pytorch as pl

        class Raise(pl.Callback):  # type: ignore[misc]
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                if raise_at is not None and trainer.global_step >= 2:
                    raise raise_at

        ckpt = self.app.checkpoints(out)
        trainer = self.app.trainer(out, [callback, *ckpt, Raise()], epochs=2 if resume else 1)
        last = out / "checkpoints" / "last.ckpt"
        trainer.fit(
            self.app.Model(), datamodule=self.app.Data(), ckpt_path=last if resume else None
        )


class HFTrain(Framework):
    name = "transformers"

    def callback(self, client: Chronicle, **kwargs: Any) -> Any:
        from chronicle_integrations.transformers import ChronicleTrainerCallback

        return ChronicleTrainerCallback(chronicle=client, heartbeat_interval=0.2, **kwargs)

    def fit(self, callback: Any, out: Path, resume: bool, raise_at: BaseException | None) -> None:
        class Raise(hf.TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if raise_at is not None and state.global_step >= 2:
                    raise raise_at

        # A fresh model each time, like the fresh Lightning module: a trained model's config
        # gains keys (problem_type, dtype, ...), a distinct config, so a new variation.
        trainer = hf.make_trainer(out, [callback, Raise()], max_steps=4 if resume else 2)
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)


FRAMEWORKS: dict[str, Callable[[], Framework]] = {
    "lightning": LightningFit,
    "transformers": HFTrain,
}


@pytest.fixture(params=sorted(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> Framework:
    return FRAMEWORKS[request.param]()


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Chronicle]:
    for name in ("EXPERIMENT", "VARIATION", "RUN", "LEASE", "URL"):
        monkeypatch.delenv(f"CHRONICLE_{name}", raising=False)
    chronicle = Chronicle(home=tmp_path / "home")
    yield chronicle
    chronicle.close(timeout=10)


def _set_env(monkeypatch: pytest.MonkeyPatch, key: RunKey, lease: str | None) -> None:
    monkeypatch.setenv("CHRONICLE_EXPERIMENT", key.experiment_id)
    monkeypatch.setenv("CHRONICLE_VARIATION", str(key.variation))
    monkeypatch.setenv("CHRONICLE_RUN", str(key.run))
    if lease is not None:
        monkeypatch.setenv("CHRONICLE_LEASE", lease)


def _resumed(run: Any) -> bool:
    return "resume" in [e.cause for e in run.events()]


def test_env_run_without_lease_is_resumed_iff_training_resumes(
    framework: Framework, client: Chronicle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disagreement (a): the run the environment names is the run; it is resumed because
    training resumes from a checkpoint, although the checkpoint carries another run."""
    out = tmp_path / "out"
    first, _ = framework.train(client, out)  # writes the checkpoint, as its own run
    assert first is not None and first.state is RunState.SUCCEEDED
    exp = client.create_experiment("named", variations=[{}])
    named = RunKey(*client.create_run(exp, 0).key_tuple)
    client.run(*named).start()  # the first worker of that run was pre-empted
    _set_env(monkeypatch, named, None)
    run, error = framework.train(client, out, resume=True)
    assert error is None
    assert (run.key_tuple, _resumed(client.run(*named)), run.state) == (
        named,
        True,
        RunState.SUCCEEDED,
    )


def test_env_run_with_lease_is_adopted_and_left_to_its_owner(
    framework: Framework, client: Chronicle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = client.create_experiment("leased", variations=[{}])
    owner = client.create_run(exp, 0).start()
    assert owner.lease is not None
    _set_env(monkeypatch, RunKey(*owner.key_tuple), owner.lease)
    run, error = framework.train(client, tmp_path / "out")
    assert error is None
    assert (run.key_tuple, owner.state, _resumed(owner)) == (
        owner.key_tuple,
        RunState.RUNNING,
        False,
    )
    owner.succeed()


def test_adopted_run_keeps_beating_after_training_ends(
    framework: Framework, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training ended but the process goes on (an export, the interpreter's exit): the
    run of its owner must not go lost. Was: the integration stopped its heartbeats. Its stall
    rule goes too: nothing advances any more, yet the process lives."""
    for name in ("EXPERIMENT", "VARIATION", "RUN", "LEASE", "URL"):
        monkeypatch.delenv(f"CHRONICLE_{name}", raising=False)
    client = Chronicle(home=tmp_path / "home", heartbeat_timeout=1.0)
    try:
        exp = client.create_experiment("owned", variations=[{}])
        owner = client.create_run(exp, 0).start()  # the owner beats nothing itself
        assert owner.lease is not None
        _set_env(monkeypatch, RunKey(*owner.key_tuple), owner.lease)
        run, error = framework.train(client, tmp_path / "out", stall_timeout=0.5)
        assert error is None and run is not None
        time.sleep(3.0)  # three heartbeat timeouts after the training ended
        assert owner.state is RunState.RUNNING
        owner.succeed()
    finally:
        client.close(timeout=10)


def test_checkpoint_of_an_ended_run_gives_a_new_run_of_its_variation(
    framework: Framework, client: Chronicle, tmp_path: Path
) -> None:
    """Rule (c), in one place: the same new key and no resume, for every integration."""
    out = tmp_path / "out"
    first, _ = framework.train(client, out)
    second, error = framework.train(client, out, resume=True)
    assert error is None
    assert second.key_tuple == (first.experiment_id, first.variation, first.run + 1)
    assert (_resumed(client.run(*second.key_tuple)), second.state) == (False, RunState.SUCCEEDED)


@pytest.mark.parametrize("how", ["two callbacks, one name", "one callback, named", "one callback"])
def test_two_trainings_group_the_same_way(
    framework: Framework, client: Chronicle, tmp_path: Path, how: str
) -> None:
    """Disagreement (b): the same ``experiment_name`` twice is one experiment, whether one
    callback trains twice or two callbacks train; two trainings of one unnamed callback
    too. One variation per distinct config, one run per training. (The same output
    directory each time: Transformers records it in the config.)"""
    name = None if how == "one callback" else f"grouped-{framework.name}-{tmp_path.name}"
    callback = framework.callback(client, experiment_name=name)
    keys = []
    for _ in range(2):
        if how == "two callbacks, one name":
            callback = framework.callback(client, experiment_name=name)
        framework.fit(callback, tmp_path / "out", False, None)
        keys.append(callback.run.key_tuple)
    assert len({k[0] for k in keys}) == 1
    assert [k[1:] for k in keys] == [(0, 0), (0, 1)]
    if name is not None:
        assert [e.name for e in client.experiments()] == [name]


# --------------------------------------------------------------------------- outcomes
OUTCOMES: dict[str, tuple[Callable[[], BaseException], RunState | None, str | None]] = {
    # exception -> (final state, a word of the message); None: no terminal state
    "crash": (lambda: RuntimeError("boom in the loop"), RunState.FAILED_CRASH, "boom in the loop"),
    "interrupt": (lambda: KeyboardInterrupt(), RunState.FAILED_ABANDONED, "KeyboardInterrupt"),
    "preempt": (lambda: SystemExit(0), None, None),
}


def _outcome(info: Any) -> tuple[RunState | None, str | None]:
    if not info.state.is_terminal:
        return None, None
    return info.state, info.message


@pytest.mark.parametrize("how", sorted(OUTCOMES))
def test_outcomes_in_process(
    framework: Framework, client: Chronicle, tmp_path: Path, how: str
) -> None:
    make, state, word = OUTCOMES[how]
    run, error = framework.train(client, tmp_path / "out", raise_at=make())
    assert error is not None
    got_state, message = _outcome(client.run(*run.key_tuple).info())
    assert got_state is state
    assert (word or "") in (message or "")


HYDRA_APP = """
import sys
import hydra

@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg):
    how = cfg.get("how", "ok")
    if how == "crash":
        raise RuntimeError("boom in the loop")
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "preempt":
        sys.exit(0)
    return 1

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("how", sorted(OUTCOMES))
def test_outcomes_of_a_hydra_job(tmp_path: Path, how: str) -> None:
    """The same exceptions in a real Hydra job under ``hydra/launcher=chronicle``."""
    import os

    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(HYDRA_APP))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env.update(CHRONICLE_HOME=str(home), HYDRA_FULL_ERROR="1")
    testkit.run(
        [
            sys.executable,
            str(app),
            "-m",
            "hydra/launcher=chronicle",
            f"+how={how}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.heartbeat_interval=0.5",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    _, state, word = OUTCOMES[how]
    with Chronicle(home=home) as chronicle:
        [info] = chronicle.runs()
    got_state, message = _outcome(info)
    assert got_state is state, (info.state, info.message)
    assert (word or "") in (message or "")
