"""The web view's pages: experiments, an experiment's variations x runs grid, a run.

Every page reads through the same :class:`~...store.Store` methods as the ``/v1`` API
(``page_experiments``, ``page_runs``, ``get_run``, ``page_events``, ``page_assets``): the
state shown is the record's effective state, computed by the store, never by the view. The
counts per state come from :meth:`~...store.summaries.SummariesMixin.experiment_summaries`,
which uses the store's SQL form of the same rule. Nothing loads a whole listing: runs and
experiments are keyset pages (``?cursor=``, the API's cursors), a run shows one bounded page
of its events and assets.

Pages refresh themselves while something on them can still change (``data-refresh`` on the
body; ``static/ui.js`` re-fetches the page and swaps its ``<main>``). Handlers are plain
``def`` functions (FastAPI runs them on its thread pool), like the API's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ... import _validation as check
from ..._config import DEFAULT_UI_REFRESH, ENV_UI_REFRESH
from ..._errors import APIError, InvalidRequest, NotFound
from ..._models import RunInfo
from ...cli.format import format_ago, format_size, printable, progress_text
from ...lifecycle import RunState
from ...store import Store
from .timeline import build_timeline, utc

__all__ = ["install_ui"]

HERE = Path(__file__).parent
#: Experiments per page of the front page.
EXPERIMENTS_PER_PAGE = 50
#: Runs per page of an experiment (the API's page sizes bound ``?limit=``).
RUNS_PER_PAGE = 200
#: Events drawn on a run's page (one page of its log; the rest is linked).
EVENTS_PER_PAGE = check.MAX_PAGE_SIZE
ASSETS_PER_PAGE = 500
#: Config keys of the variations compared to find what differs between them.
DIFF_VARIATIONS = 1000

STATES = [s.value for s in RunState]


def install_ui(app: FastAPI, store: Store, *, refresh: float | None = None) -> None:
    """Add the web view to ``app``: ``/`` redirects to ``/ui``; the pages; ``/ui/static``.
    ``refresh``: seconds between a live page's refreshes (default ``$CHRONICLE_UI_REFRESH``,
    else :data:`~..._config.DEFAULT_UI_REFRESH`)."""
    if refresh is None:
        refresh = float(os.environ.get(ENV_UI_REFRESH) or DEFAULT_UI_REFRESH)
    if not refresh > 0:
        raise ValueError("the page refresh interval must be > 0")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(
        utc=utc,
        size=format_size,
        progress=progress_text,
        printable=printable,
        asset_url=_asset_url,
        duration=_duration,
    )
    env.globals.update(states=STATES, refresh=refresh)
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="ui-static")
    app.include_router(_router(store, templates), include_in_schema=False)


def _router(store: Store, templates: Jinja2Templates) -> APIRouter:
    router = APIRouter()

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        now = store.clock()
        context.setdefault("live", False)
        return templates.TemplateResponse(
            request,
            name,
            {"now": now, "ago": lambda ts: format_ago(ts, now), **context},
            status_code=status,
        )

    def error_page(request: Request, exc: APIError) -> HTMLResponse:
        return page(request, "error.html", exc.status, error=exc, title=f"{exc.status} {exc.code}")

    @router.get("/", response_class=RedirectResponse)
    def front_door() -> Response:
        return RedirectResponse("/ui", status_code=307)

    @router.get("/ui/login", response_class=HTMLResponse)
    def login(request: Request, next: str = "/ui", failed: str | None = None) -> Response:
        from .auth import safe_next

        return page(
            request, "login.html", title="Log in", next=safe_next(next), failed=bool(failed)
        )

    @router.get("/ui", response_class=HTMLResponse)
    @router.get("/ui/", response_class=HTMLResponse)
    def experiments(request: Request, cursor: str | None = None) -> Response:
        try:
            listing = store.page_experiments(limit=EXPERIMENTS_PER_PAGE, cursor=cursor)
            summaries = store.experiment_summaries(e.experiment_id for e in listing.items)
        except APIError as exc:
            return error_page(request, exc)
        rows = [(e, summaries[e.experiment_id]) for e in listing.items]
        return page(
            request,
            "experiments.html",
            title="Experiments",
            rows=rows,
            next_url=_url("/ui", cursor=listing.next_cursor) if listing.next_cursor else None,
            first_url="/ui" if cursor else None,
            live=any(s.live for _, s in rows),
        )

    @router.get("/ui/experiments/{experiment_id}", response_class=HTMLResponse)
    def experiment(
        request: Request,
        experiment_id: str,
        state: str | None = None,
        cursor: str | None = None,
        limit: str | None = None,
    ) -> Response:
        try:
            size = _limit(limit, RUNS_PER_PAGE)
            chosen = check.run_state(state).value if state else None
            info = store.get_experiment(experiment_id)
            summary = store.experiment_summaries([experiment_id])[experiment_id]
            runs = store.page_runs(experiment_id, chosen, limit=size, cursor=cursor)
            configs = store.variation_configs(experiment_id, 0, DIFF_VARIATIONS)
            shown = sorted({r.variation for r in runs.items})
            missing = [v for v in shown if v not in configs]
            if missing:  # beyond the compared range: their own configs, one range read
                configs.update(store.variation_configs(experiment_id, missing[0], DIFF_VARIATIONS))
        except APIError as exc:
            return error_page(request, exc)
        differing = _differing_keys([configs[v] for v in sorted(configs)[:DIFF_VARIATIONS]])
        grid: dict[int, list[RunInfo]] = {}
        for run in runs.items:
            grid.setdefault(run.variation, []).append(run)
        base = f"/ui/experiments/{experiment_id}"
        rows = [
            {
                "variation": v,
                "config": configs.get(v),
                "differences": _pick(configs.get(v) or {}, differing),
                "runs": grid[v],
            }
            for v in shown
        ]
        return page(
            request,
            "experiment.html",
            title=info.name,
            experiment=info,
            summary=summary,
            rows=rows,
            state=chosen,
            shared=_shared(configs, differing),
            compared=min(len(configs), DIFF_VARIATIONS),
            filter_url=lambda s: _url(base, state=s),
            next_url=_url(base, state=chosen, cursor=runs.next_cursor, limit=limit)
            if runs.next_cursor
            else None,
            first_url=_url(base, state=chosen, limit=limit) if cursor else None,
            live=any(not r.state.is_terminal for r in runs.items),
        )

    @router.get("/ui/runs/{experiment_id}/{variation}/{run}", response_class=HTMLResponse)
    def run_page(request: Request, experiment_id: str, variation: str, run: str) -> Response:
        try:
            key = (experiment_id, _number(variation, "variation"), _number(run, "run"))
            info = store.get_run(*key)
            events = store.page_events(*key, limit=EVENTS_PER_PAGE)
            assets = store.page_assets(*key, limit=ASSETS_PER_PAGE)
            config = store.get_variation_config(experiment_id, key[1])
            experiment_info = store.get_experiment(experiment_id)
        except APIError as exc:
            return error_page(request, exc)
        now = store.clock()
        truncated = events.next_cursor is not None
        alive_at = info.last_heartbeat_at or info.started_at
        return page(
            request,
            "run.html",
            title=info.key,
            run=info,
            experiment=experiment_info,
            config_json=json.dumps(config, indent=2, sort_keys=True),
            events=events.items,
            events_more=_api_url(info, "events", events.next_cursor) if truncated else None,
            assets=assets.items,
            assets_more=_api_url(info, "assets", assets.next_cursor)
            if assets.next_cursor
            else None,
            timeline=build_timeline(
                events.items,
                info,
                now,
                heartbeat_timeout=store.heartbeat_timeout,
                truncated=truncated,
            ),
            alive_at=alive_at,
            heartbeat_timeout=store.heartbeat_timeout,
            stall_timeout=store.stall_timeout,
            detail_json=lambda d: json.dumps(d, sort_keys=True) if d else "",
            live=not info.state.is_terminal,
        )

    @router.get("/ui/{rest:path}", response_class=HTMLResponse)
    def unknown(request: Request, rest: str) -> Response:
        """Any other address under ``/ui``: a page saying so (not the API's JSON)."""
        return error_page(request, NotFound(f"no such page: {request.url.path[:200]}"))

    return router


# ---------------------------------------------------------------------------- helpers
def _url(path: str, **query: Any) -> str:
    """``path`` with the query parameters that are set (URL-encoded)."""
    given = {k: v for k, v in query.items() if v is not None}
    return f"{path}?{urlencode(given)}" if given else path


def _api_url(info: RunInfo, what: str, cursor: str | None) -> str:
    base = f"/v1/runs/{info.experiment_id}/{info.variation}/{info.run}/{what}"
    return _url(base, cursor=cursor)


def _asset_url(info: RunInfo, name: str) -> str:
    """The ``/v1`` download URL of an asset (each path segment percent-encoded)."""
    quoted = "/".join(quote(part, safe="") for part in name.split("/"))
    return f"/v1/runs/{info.experiment_id}/{info.variation}/{info.run}/assets/{quoted}"


def _duration(seconds: float | None) -> str:
    """``45s``, ``12m 05s``, ``3h 02m``, ``2d 4h``."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _number(text: str, field: str) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", text):
        raise InvalidRequest(
            f"invalid {field} {text[:20]!r}: an integer from 0 to {check.MAX_NUMBER}", field=field
        )
    return check.number(int(text), field)


def _limit(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,4}", text):
        raise InvalidRequest(f"invalid limit {text[:20]!r}", field="limit")
    return check.page_limit(int(text))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"opt": {"lr": 0.1}}`` -> ``{"opt.lr": 0.1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


_MISSING = object()


def _differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The (flattened) keys whose values are not the same in every config, in order."""
    flat = [_flatten(c) for c in configs]
    keys: dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    differing = []
    for key in keys:
        values = [json.dumps(f.get(key, _MISSING), sort_keys=True, default=str) for f in flat]
        if len(set(values)) > 1:
            differing.append(key)
    return differing


def _pick(config: dict[str, Any], keys: list[str]) -> list[tuple[str, str]]:
    flat = _flatten(config)
    return [(k, json.dumps(flat[k], sort_keys=True)) for k in keys if k in flat]


def _shared(configs: dict[int, dict[str, Any]], differing: list[str]) -> list[tuple[str, str]]:
    """The keys every compared variation has with the same value."""
    if not configs:
        return []
    first = _flatten(configs[min(configs)])
    return [(k, json.dumps(v, sort_keys=True)) for k, v in first.items() if k not in differing]
