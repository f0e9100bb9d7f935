"""The node's own web page: GET / serves a static single-page app (pyengine/node/webui/, plain
HTML/CSS/JS shipped in the package, no build step), and GET /v1/node/stats the live figures its
status view needs that no other route carries (tokens/s over the last minute, memory, the router
link, the expert-selection counts).

The page and its files are open even with --api-key (they hold no data; the page asks for the key
and sends it); /v1/node/stats, like every data route, needs the key. With --no-webui the page
routes are not installed (404); the stats route stays, it is data like /metrics. A strict
Content-Security-Policy (scripts and styles from this origin only, no inline script) backs the
page's rule that model output only ever enters the page as text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from pyengine.node.schemas import APIError

PAGE_DIR = Path(__file__).parent / "webui"
ASSET_PREFIX = "/webui/"
ASSETS = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
}


def is_page_path(path: str) -> bool:
    """True for the page and its static files (served without the API key)."""
    return path == "/" or path.startswith(ASSET_PREFIX)


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc); None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def node_stats(state: Any) -> dict[str, Any]:
    """The figures of GET /v1/node/stats (before the model loads: no slots, no expert counts)."""
    s = state.scheduler
    router = state.router.view() if state.router else {"url": state.config.router_url, "status": "off"}
    return {**state.metrics.recent_rates(),
            "rss_bytes": rss_bytes(),
            "kv_cache_bytes": sum(slot.nbytes for slot in s.slots) if s else 0,
            "kv_cache_tokens": s.kv_tokens() if s else 0,
            "kv_cache_capacity_tokens": s.n_parallel * s.n_ctx if s else 0,
            "router": router,
            "expert_counts": state.metrics.expert_counts()}


def install(app: FastAPI, state: Any, page: bool) -> None:
    """Add GET /v1/node/stats to `app`, and with `page` GET / and its static files."""

    @app.get("/v1/node/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(node_stats(state))

    if not page:
        return

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response((PAGE_DIR / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers=HEADERS)

    @app.get(ASSET_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            raise APIError(404, f"no such file: {ASSET_PREFIX}{name}", "not_found_error")
        return Response((PAGE_DIR / name).read_bytes(), media_type=f"{ASSETS[name]}; charset=utf-8",
                        headers=HEADERS)
