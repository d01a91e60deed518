"""The reference Chronicle server: a thin HTTP layer (FastAPI) over the shared store.

::

    from chronicle_integrations.server import create_app, serve

    serve(port=8765)                         # what `chronicle server` runs
    app = create_app(Store.open(url, assets)) # an ASGI app, for tests or another ASGI server

Modules: :mod:`.app` (factory, error handlers, watchdog), :mod:`.routes` (the ``/v1`` API),
:mod:`.wire` (the request and response bodies), :mod:`.middleware` (API key, body limits),
:mod:`.streaming` (upload and download streaming), :mod:`.runner` (``serve``).
Importing this package imports FastAPI; nothing else in ``chronicle_integrations`` does.
"""

from __future__ import annotations

from .app import create_app
from .runner import serve

__all__ = ["create_app", "serve"]
