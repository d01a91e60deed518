"""Hydra launcher ``hydra/launcher=chronicle``: a sweep becomes a Chronicle experiment.

Hydra imports this package at every start, so it imports nothing heavy: the config and the
thin launcher live in :mod:`.chronicle_launcher`, the work in :mod:`._core` (loaded by
``launch()``). See ``README.md`` next to this file.
"""
