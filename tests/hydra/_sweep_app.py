"""A tiny Hydra app for the launcher tests (run as a script by the tests).

``x`` is swept; ``fail_on`` makes the job with that ``x`` raise; ``block_on`` makes that job
write ``<marker_dir>/started-<x>`` and sleep (so a test can interrupt or kill it) until
``release_file`` exists;
``stop_on`` makes that job write ``<marker_dir>/started-<x>`` and freeze itself (SIGSTOP: a
hung worker that stops beating, like a process stuck in the kernel);
``exit_on`` makes that job exit like a pre-empted one (``SystemExit``); ``sleep`` slows every
job down a little; the job with ``x=1`` fails while the file named by
``fail_if_exists`` exists.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: DictConfig) -> Any:
    x = cfg.get("x", 0)
    marker_dir = cfg.get("marker_dir")
    if marker_dir:
        Path(marker_dir).mkdir(parents=True, exist_ok=True)
        (Path(marker_dir) / f"pid-{x}").write_text(str(os.getpid()))
    # something the job wrote in its output dir
    (Path(HydraConfig.get().runtime.output_dir) / "result.txt").write_text(f"x={x}\n")
    if cfg.get("block_on") is not None and x == cfg.block_on:
        (Path(marker_dir) / f"started-{x}").write_text(str(os.getpid()))
        deadline = time.monotonic() + float(cfg.get("block_seconds", 120))
        release = cfg.get("release_file")
        while time.monotonic() < deadline and not (release and Path(release).exists()):
            time.sleep(0.1)
    if cfg.get("stop_on") is not None and x == cfg.stop_on:
        (Path(marker_dir) / f"started-{x}").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen: nothing beats any more
        while True:  # and still hung when continued: only a kill ends it
            time.sleep(0.1)
    time.sleep(float(cfg.get("sleep", 0)))
    if cfg.get("exit_on") is not None and x == cfg.exit_on:
        sys.exit(0)  # what a pre-empted job does (submitit requeue, Lightning's SIGTERM)
    if cfg.get("fail_on") is not None and x == cfg.fail_on:
        raise ValueError(f"job with x={x} failed on purpose")
    if cfg.get("fail_if_exists") and x == 1 and Path(cfg.fail_if_exists).exists():
        raise RuntimeError(f"job with x={x} fails while {cfg.fail_if_exists} exists")
    return {"x": x, "score": float(x) * 2}


if __name__ == "__main__":
    main()
