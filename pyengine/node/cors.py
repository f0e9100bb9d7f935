"""CORS for browsers calling the node from another origin (a web UI on its own port).

The node allows no other origin unless told (`--cors-origin`, repeatable; `*` allows any). A
preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here, before the API key
check, since browsers send it without credentials: 204, with the allow headers only for an
allowed origin (otherwise the browser refuses the real request). The real request still needs the
API key; its answer carries `Access-Control-Allow-Origin` for an allowed origin, errors included,
so the page can read them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"Authorization, Content-Type, X-Api-Key, X-Request-Id"
MAX_AGE = b"600"


class Cors:
    """ASGI middleware: answer preflights, mark answers to allowed origins."""

    def __init__(self, app: Any, origins: list[str] | tuple[str, ...] = ()) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = {o.rstrip("/") for o in origins if o != "*"}

    def allowed(self, origin: str) -> bool:
        return bool(origin) and (self.any or origin in self.origins)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        allowed = self.allowed(origin)
        marks = [(b"access-control-allow-origin", b"*" if self.any else origin.encode("latin-1")),
                 (b"vary", b"Origin")] if allowed else []
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            if allowed:
                marks += [(b"access-control-allow-methods", ALLOW_METHODS),
                          (b"access-control-allow-headers",
                           headers.get(b"access-control-request-headers", ALLOW_HEADERS)),
                          (b"access-control-max-age", MAX_AGE)]
            await send({"type": "http.response.start", "status": 204, "headers": marks})
            return await send({"type": "http.response.body", "body": b""})

        async def send_marked(message: dict) -> None:
            if message["type"] == "http.response.start" and marks:
                message["headers"] = [*message.get("headers", []), *marks,
                                      (b"access-control-expose-headers", b"X-Request-Id")]
            await send(message)

        await self.app(scope, receive, send_marked)
