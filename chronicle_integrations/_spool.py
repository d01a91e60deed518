"""Old import path of the spool, now :mod:`chronicle_integrations.client._spool`.

Kept only for the CLI (``cli``, being turned into a package elsewhere), which imports
``SyncReport`` from here; remove it once it imports from ``chronicle_integrations.client``.
"""

from __future__ import annotations

from .client._spool import SyncReport

__all__ = ["SyncReport"]
