"""The ``hydra/launcher=chronicle`` config: discovery, defaults, engine selection, light import."""

from __future__ import annotations

import sys

import pytest
import testkit

pytest.importorskip("hydra")

from hydra import compose, initialize
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher

pytestmark = [pytest.mark.hydra, pytest.mark.usefixtures("hydra_restore_singletons")]


def test_discovered_by_hydra() -> None:
    names = {cls.__name__ for cls in Plugins.instance().discover(Launcher)}
    assert "ChronicleLauncher" in names


def launcher_config(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    with initialize(version_base=None, config_path=None):
        cfg = compose(overrides=["hydra/launcher=chronicle", *overrides], return_hydra_config=True)
    out = OmegaConf.to_container(cfg.hydra.launcher)
    assert isinstance(out, dict)
    return out


def test_defaults_wrap_the_basic_launcher() -> None:
    cfg = launcher_config()
    assert cfg["_target_"].endswith("chronicle_launcher.ChronicleLauncher")
    assert cfg["_recursive_"] is False
    assert cfg["executor"]["_target_"].endswith("basic_launcher.BasicLauncher")
    assert cfg["experiment_id"] is None and cfg["upload_outputs"] is True
    assert "defaults" not in cfg


def test_engine_is_chosen_on_the_command_line_and_keeps_its_options() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = launcher_config(
        "hydra/launcher@hydra.launcher.executor=submitit_local",
        "hydra.launcher.executor.timeout_min=7",
        "hydra.launcher.heartbeat_interval=5",
    )
    executor = cfg["executor"]
    assert executor["_target_"].endswith("submitit_launcher.LocalLauncher")
    assert executor["timeout_min"] == 7
    assert "submitit_folder" in executor  # the engine's own defaults survived the merge
    assert cfg["heartbeat_interval"] == 5


def test_plugin_import_is_light() -> None:
    """Hydra imports every plugin module at every start: ours must not pull in the client,
    SQLAlchemy or requests (they load in launch())."""
    code = (
        "import sys, hydra_plugins.chronicle_launcher.chronicle_launcher\n"
        "heavy = [m for m in ('chronicle_integrations', 'sqlalchemy', 'requests') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    testkit.run([sys.executable, "-c", code], check=True)
