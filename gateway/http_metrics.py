"""ASGI middleware: every answered request counted and timed by method, route and status.

The route is the path template that matched (`/v1/batches/{batch_id}`), so ids do not make
a label value each; a path no route matched is `unmatched`.
"""

from __future__ import annotations

import time
from typing import Any

from millrace.metrics import HTTP_REQUESTS, HTTP_SECONDS


class HttpMetrics:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before its response

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_SECONDS.labels(method, template).observe(time.perf_counter() - started)
