"""The read-only web view: server-rendered pages under ``/ui`` (Jinja2 templates, one style
sheet, one small script that refreshes live pages; the run timeline is inline SVG).

Modules: :mod:`.views` (the routes, reading only through the :class:`~...store.Store` methods
the ``/v1`` API uses, so a page never disagrees with ``chronicle show``), :mod:`.timeline`
(the run timeline's layout), :mod:`.auth` (login sessions and security headers, hooked into
the request guard). ``templates/`` and ``static/`` are package data, shipped in the wheel.
Importing this package imports nothing heavy; :mod:`.views` imports Jinja2.
"""
