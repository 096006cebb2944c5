"""Limits on what a client may send before millrace does any work for it.

- Headers (the HTTP protocol, before the application sees a request): at most
  `MAX_HEADER_BYTES` of request line and headers and `MAX_HEADERS` header lines (431), read
  within `HEADER_TIMEOUT_S` of the connection opening or the last response (408): a client
  that trickles headers (slowloris) cannot hold a connection.
- Bodies (`BodyLimits`, an ASGI middleware): the caller is authenticated from its headers
  before any byte of the body is read (401), a `Content-Length` over the route's limit is
  refused at once and a chunked body is cut at that limit (413). JSON routes take
  `json_max_bytes` (1 MiB); uploads the file limits. More requests in flight than
  `max_in_flight` get a 503 with `Retry-After` at once (overload is never a 500).

Every refusal is OpenAI's error envelope.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.api.http_metrics import STATUS, record
from gateway.api.ratelimit import budget_headers
from gateway.estimate import token_headers
from millrace.errors import (
    OUTAGES,
    APIError,
    AuthenticationError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
HEADER_TIMEOUT_S = 10.0


def with_budgets(start: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The answer's start with the rate-limit headers of the budgets the route applied: the
    requests budget (`gateway/api/ratelimit.py`) and a create's token quota."""
    added: dict[str, str] = {}
    if (budget := state.get("ratelimit")) is not None:
        added.update(budget_headers(*budget))
    if (tokens := state.get("token_budget")) is not None:
        added.update(token_headers(tokens))
    if not added:
        return start
    return {**start, "headers": [*start.get("headers", []),
                                 *((k.encode(), v.encode()) for k, v in added.items())]}


class HeaderFieldsTooLarge(InvalidRequestError):
    status_code = 431
    code = "request_header_fields_too_large"


class RequestTimeout(InvalidRequestError):
    status_code = 408
    code = "request_timeout"


def raw_response(error: APIError) -> bytes:
    body = json.dumps(error.envelope().model_dump()).encode()
    reason = {408: "Request Timeout", 413: "Payload Too Large",
              431: "Request Header Fields Too Large"}.get(error.status_code, "Error")
    return (f"HTTP/1.1 {error.status_code} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits and a header-read timeout."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: APIError | None = None
        self._header_bytes = self._header_count = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._await_headers()

    def _await_headers(self) -> None:
        self._cancel_timer()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _cancel_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(RequestTimeout(
            f"The request's headers did not arrive within {HEADER_TIMEOUT_S:.0f} s."))

    def _refuse(self, error: APIError) -> None:
        if not self.transport.is_closing():
            self.transport.write(raw_response(error))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            self.send_400_response("Invalid HTTP request received.")  # as uvicorn does
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _count(self, size: int, lines: int = 0) -> None:
        self._header_bytes += size
        self._header_count += lines
        if self._header_bytes > MAX_HEADER_BYTES or self._header_count > MAX_HEADERS:
            self._refusal = HeaderFieldsTooLarge(
                f"Request headers may be at most {MAX_HEADER_BYTES} bytes and "
                f"{MAX_HEADERS} lines.")
            raise ValueError("headers too large")  # stops the parser (HttpParserError)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()  # the next request on this connection


# --- bodies ---------------------------------------------------------------------------
PUBLIC = {"/health", "/metrics", "/dashboard", "/dashboard/", "/openapi.json", "/docs",
          "/docs/oauth2-redirect", "/redoc"}
# pre-signed downloads (the signature is the credential); the dashboard's scripts
PUBLIC_PREFIXES = ("/signed/", "/dashboard/static/")
ROWS_PATHS = {"/v0/launch-job", "/v0/batches", "/v0/batches/validate-data"}


class Overloaded(ServiceUnavailableError):
    """More requests in flight than this gateway process takes: try again shortly."""

    retry_after_s = 1

    def __init__(self) -> None:
        super().__init__("This gateway is at capacity; try again shortly.")


class BodyLimits:
    """ASGI middleware: authenticate before reading a body; bound every body."""

    def __init__(self, app: Any, *, json_max_bytes: int, upload_max_bytes: int,
                 batch_max_bytes: int, rows_max_bytes: int, max_in_flight: int = 1024) -> None:
        self.app = app
        self.rows_max_bytes = rows_max_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.json_max_bytes = json_max_bytes
        self.upload_max_bytes = upload_max_bytes
        self.batch_max_bytes = batch_max_bytes

    def limit(self, path: str, content_type: str) -> int:
        if path in ROWS_PATHS:  # PromptLoop's JSONL data rows, as a body or a multipart file
            return self.rows_max_bytes + 64 * 1024
        if not content_type.startswith("multipart/form-data"):
            # an inline batch's `requests` may hold what an input file may
            return (self.batch_max_bytes + 64 * 1024 if path == "/v1/batches"
                    else self.json_max_bytes)
        most = self.batch_max_bytes if path == "/v1/batches/validate" else self.upload_max_bytes
        return most + 64 * 1024  # the file plus its form fields

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if self.in_flight >= self.max_in_flight:
            await self._answer(scope, send, Overloaded())
            record(scope, started)
            return
        self.in_flight += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_flight -= 1
            record(scope, started)

    async def _limited(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        public = scope["path"] in PUBLIC or scope["path"].startswith(PUBLIC_PREFIXES)
        if not public and not await self._authenticated(scope, send):
            return
        limit = self.limit(scope["path"], headers.get("content-type", ""))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._answer(scope, send, _too_large(limit))
            return
        seen = 0
        started = answered = False

        async def bounded_receive() -> dict[str, Any]:
            # past the limit: answer 413 now; the app sees the client go away
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    answered = True
                    if not started:
                        await self._answer(scope, send, _too_large(limit))
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if answered:
                return  # the 413 went out already
            if message["type"] == "http.response.start":
                started = True
                scope[STATUS] = message["status"]
                message = with_budgets(message, scope.get("state", {}))
            await send(message)

        await self.app(scope, bounded_receive, tracking_send)

    async def _authenticated(self, scope: dict[str, Any], send: Any) -> bool:
        """The caller's principal into the scope, or its 401 / 503 answered."""
        ctx = scope["app"].state.ctx
        from gateway.api.auth import api_key_of  # the app's own rule for finding the key

        try:
            key = api_key_of((k.decode("latin-1"), v.decode("latin-1"))
                             for k, v in scope["headers"])
        except AuthenticationError as exc:
            await self._answer(scope, send, exc)
            return False
        try:
            principal = await ctx.store.principal(key) if key else None
        except OUTAGES:
            await self._answer(scope, send, ServiceUnavailableError(
                "millrace cannot reach the read model (Redis) right now; try again shortly."))
            return False
        if principal is None:
            await self._answer(scope, send, AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
                if not key else "Incorrect API key provided."))
            return False
        scope.setdefault("state", {})["principal"] = principal
        return True

    async def _answer(self, scope: dict[str, Any], send: Any, error: APIError) -> None:
        scope[STATUS] = error.status_code
        body = json.dumps(error.envelope().model_dump()).encode()
        await send({"type": "http.response.start", "status": error.status_code,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                *((k.encode(), v.encode()) for k, v in error.headers.items())]})
        await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body may be at most {limit} bytes.",
                                code="request_too_large")
