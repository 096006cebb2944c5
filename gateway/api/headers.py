"""Headers on every answer of the gateway (API, dashboard, docs; a 401, 413 or 503 too):

- OpenAI's `x-request-id` (`req_` and 32 hex digits; the SDK shows it as `_request_id`) and
  `openai-processing-ms`. Log lines written while a request is answered carry its id, and
  the caller's own `X-Client-Request-Id` when given (`millrace.logs.REQUEST`); a request
  that gives one is logged once when answered, and every answer of 500 or more is.
- Security: a Content-Security-Policy that runs only this origin's scripts (no inline
  script, no eval) and lets no other page frame these, `nosniff`, and no Referer sent
  onwards (a pre-signed download URL in the address bar would otherwise leak to the next
  site). Styles may be inline: Swagger UI and ReDoc set them.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from millrace.logs import REQUEST

log = logging.getLogger(__name__)
CLIENT_ID_MAX = 512  # characters of a caller's X-Client-Request-Id kept (OpenAI's bound)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def _client_id(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-client-request-id":
            text = value.decode("latin-1")[:CLIENT_ID_MAX]
            return "".join(c for c in text if c.isprintable()) or None
    return None


class SecurityHeaders:
    """An ASGI middleware (no per-request objects beyond the wrapped `send` and the ids)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = "req_" + secrets.token_hex(16)
        client_id = _client_id(scope)
        token = REQUEST.set((request_id, client_id))

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                took = round((time.monotonic() - started) * 1000)
                status = message["status"]
                if client_id is not None or status >= 500:
                    log.log(logging.WARNING if status >= 500 else logging.INFO,
                            "%s %s answered %d in %d ms", scope["method"], scope["path"],
                            status, took)
                message = {**message, "headers": [
                    *message.get("headers", []), *HEADERS,
                    (b"x-request-id", request_id.encode()),
                    (b"openai-processing-ms", str(took).encode())]}
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        finally:
            REQUEST.reset(token)
