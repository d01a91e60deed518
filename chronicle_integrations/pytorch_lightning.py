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

from ._lightning_core import CALLBACK_DOC, LightningCore, missing_framework

try:
    from pytorch_lightning.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_framework("pytorch_lightning", "pytorch-lightning") from exc


class ChronicleCallback(LightningCore, Callback):
    __doc__ = CALLBACK_DOC


__all__ = ["ChronicleCallback"]
