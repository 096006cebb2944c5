"""Every HTTP error leaves the gateway in OpenAI's envelope, whoever raised it."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from millrace.errors import (
    APIError,
    DeliveryError,
    InvalidRequestError,
    ServiceUnavailableError,
    disk_full,
)
from millrace.protocol import ErrorDetail, ErrorEnvelope

log = logging.getLogger(__name__)

_HTTP_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}


def _respond(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(ErrorEnvelope(error=detail).model_dump(), status_code=status)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.envelope().model_dump(), status_code=exc.status_code,
                        headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    fallback = "invalid_request_error" if exc.status_code < 500 else "server_error"
    type_ = _HTTP_TYPES.get(exc.status_code, fallback)
    return _respond(exc.status_code, ErrorDetail(message=str(exc.detail), type=type_))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400 with the offending parameter named."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":  # as OpenAI answers a field it does not know
        error = InvalidRequestError(f"Unrecognized request argument supplied: {param}",
                                    param=param, code="unknown_parameter")
    else:
        message = f"{first.get('msg', 'invalid request')}" + (f": '{param}'" if param else "")
        error = InvalidRequestError(message, param=param, code="invalid_request")
    return JSONResponse(error.envelope().model_dump(), status_code=400)


async def outage(request: Request, exc: Exception) -> JSONResponse:
    """Redis or the broker did not answer: a 503 the client can retry, never a 500."""
    log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    part = "the read model (Redis)" if isinstance(exc, RedisError) else "the broker"
    return await api_error(request, ServiceUnavailableError(
        f"millrace cannot reach {part} right now; try again shortly."))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    if disk_full(exc):  # the file store or the data dir: a 503 until space is back
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return await api_error(request, ServiceUnavailableError(
            "millrace's file store is full right now; try again shortly."))
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _respond(500, ErrorDetail(message="internal server error", type="server_error"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for part_away in (RedisError, KafkaException, DeliveryError):
        app.add_exception_handler(part_away, outage)
    app.add_exception_handler(Exception, unexpected_error)
