"""``python -m chronicle_integrations.cli``: the ``chronicle`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
