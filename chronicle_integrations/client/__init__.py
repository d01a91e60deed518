"""The core client: :class:`Chronicle` (one per process) and cheap :class:`Run` handles.

Example::

    from chronicle_integrations import Chronicle

    with Chronicle() as chronicle:            # $CHRONICLE_URL, else the embedded store
        exp = chronicle.create_experiment("lr-sweep", variations=[{"lr": 0.1}, {"lr": 0.01}])
        run = chronicle.create_run(exp, variation=1)
        cfg = run.get_variation_config()       # {"lr": 0.01}
        with run.start():                      # heartbeats on a daemon thread inside the block
            ...train...
            run.upload_asset("model.ckpt")     # returns at once; uploads in the background
        # the block ended: succeed() waited for the uploads; an exception -> fail("crash")

Layout (every module but this one is private):

==================== ====================================================================
``_chronicle``       :class:`Chronicle`: the transport, the spool, closing at exit
``_run``             :class:`Run` handles, :func:`format_exception`
``_heartbeat``       ``Progress``, ``KeepAlive`` (the heartbeat loop), the per-process loop
                     registry, and ``Beating``: the interface a loop uses of its run
``_uploads``         the upload pool and ``Uploads`` (orchestration, owned by a Chronicle)
``_staging``         capture at call time: hard links, re-captures, orphan reaping
``_spool``           what could not reach the server, for ``chronicle sync``
``_transport``       the ``Transport`` interface and the embedded store's implementation
``_http``            ``HttpTransport``: the server's ``/v1`` API over ``requests``
``_deadline``        retry policy and per-call deadlines (cutoffs) for ``_http``
``_answers``         reading and decoding the server's answers for ``_http``
==================== ====================================================================

Importing this package imports neither ``requests`` nor the store: ``_http`` is imported when
a ``Chronicle`` with a URL is made, the embedded store when one without a URL is.
"""

from __future__ import annotations

from ._chronicle import Chronicle
from ._run import Run, format_exception

__all__ = ["Chronicle", "Run", "format_exception"]
