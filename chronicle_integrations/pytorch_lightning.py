"""Chronicle for PyTorch Lightning (``pytorch_lightning``).

``Trainer(callbacks=[ChronicleCallback()])`` tracks a fit end to end.

Example::

    import pytorch_lightning as pl
    from chronicle_integrations.pytorch_lightning import ChronicleCallback

    trainer = pl.Trainer(max_epochs=3, callbacks=[ChronicleCallback()])
    trainer.fit(model, datamodule=dm)          # one run: started, checkpoints uploaded, succeeded

For the unified ``lightning`` package (``lightning.pytorch``) use
:mod:`chronicle_integrations.lightning`: the two namespaces have different
``Callback`` classes. The behaviour (hook mapping, checkpoint uploads, DDP, resume, cancel)
is documented in :mod:`chronicle_integrations._lightning_core`.
"""

from __future__ import annotations

from ._lightning_core import LightningCore, missing_framework

try:
    from pytorch_lightning.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_framework("pytorch_lightning", "pytorch-lightning") from exc


class ChronicleCallback(LightningCore, Callback):
    """Track a ``Trainer.fit`` as a Chronicle run.

    Args:
        chronicle: a :class:`~chronicle_integrations.Chronicle`; default: one created from the
            environment (``$CHRONICLE_URL``, else the embedded store in ``$CHRONICLE_HOME`` or
            ``./chronicle``) on global rank zero when the fit starts.
        experiment_id, variation, run: the run to track (else ``$CHRONICLE_EXPERIMENT`` /
            ``$CHRONICLE_VARIATION`` / ``$CHRONICLE_RUN``, else a new experiment whose
            variation config is the model's and datamodule's ``hparams_initial``).
        experiment_name: the name of that new experiment (default ``"training"``).
        upload: ``"all"`` checkpoints as they are written (default), ``"best_and_last"``
            when the fit ends, or ``"none"``.
        heartbeat_interval: seconds between heartbeats.
        strict: raise tracking errors instead of logging them and training on.

    Resuming with ``trainer.fit(..., ckpt_path=...)`` continues the run recorded in the
    checkpoint (pass the callback again).
    """


__all__ = ["ChronicleCallback"]
