"""Old import path of the upload machinery, now in :mod:`chronicle_integrations.client`.

Kept only for the modules that still import from here (``_integration``, ``_lightning_core``,
``hydra_plugins.chronicle_launcher._core``); remove it once they import from
``chronicle_integrations.client._uploads`` / ``._staging``.
"""

from __future__ import annotations

from .client._staging import NotRegularFile, file_kind, open_regular
from .client._uploads import UploadHandle

__all__ = ["NotRegularFile", "UploadHandle", "file_kind", "open_regular"]
