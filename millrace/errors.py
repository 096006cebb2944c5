"""millrace's exception tree.

MillraceError
├── APIError            an HTTP error with OpenAI's envelope (status, type, code, param)
│   ├── AuthenticationError   401 invalid_api_key
│   ├── PermissionDeniedError 403
│   ├── NotFoundError         404
│   ├── ConflictError         409
│   ├── PayloadTooLargeError  413 file_too_large
│   ├── RateLimitError        429 rate_limit_exceeded
│   ├── ServiceUnavailableError 503 service_unavailable (broker or Redis away; Retry-After)
│   └── InvalidRequestError   400 invalid_request_error
├── SettingsError       a setting is missing, unknown or malformed (the CLI exits 2)
├── ComponentError      an embedded component (broker, Redis, model) failed to start
└── DeliveryError       the broker did not acknowledge records we must not lose
"""

from __future__ import annotations

import errno
import os

from confluent_kafka import KafkaException
from redis.exceptions import RedisError

from millrace.protocol import ErrorDetail, ErrorEnvelope


class MillraceError(Exception):
    """Root of every error millrace raises on purpose."""


class APIError(MillraceError):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def envelope(self) -> ErrorEnvelope:
        detail = ErrorDetail(
            message=self.message, type=self.type, param=self.param, code=self.code
        )
        return ErrorEnvelope(error=detail)


class AuthenticationError(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(APIError):
    status_code = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class ConflictError(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "file_too_large"


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class SettingsError(MillraceError):
    """A setting a service needs is missing, unknown, malformed or inconsistent."""


class ServiceUnavailableError(APIError):
    """A part millrace needs (the broker, Redis) did not answer in time: nothing was done,
    try again."""

    status_code = 503
    type = "server_error"
    code = "service_unavailable"
    retry_after_s = 2

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"retry-after": str(self.retry_after_s)})


class ComponentError(MillraceError):
    """An embedded component (broker, Redis, engine, model) could not be started."""


class DeliveryError(MillraceError):
    """The broker did not acknowledge produced records; the caller must not commit."""


# What a part being away (the broker, Redis) looks like to a client: wait and try again.
OUTAGES: tuple[type[Exception], ...] = (DeliveryError, KafkaException, RedisError)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """A write refused for want of space (a full data dir or file store): wait for space as
    for an outage. pyarrow's file systems say so only in the message."""
    return isinstance(exc, OSError) and (
        exc.errno in _FULL or any(os.strerror(code) in str(exc) for code in _FULL))
