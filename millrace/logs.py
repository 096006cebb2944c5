"""Log lines of every millrace process: text for people, or (`MILLRACE_LOG_FORMAT=json`) one
JSON object per line for log pipelines, with the batch id as its own field wherever the
message names one — and, on a line written while the gateway answers a request, that
request's `x-request-id` and the caller's own `X-Client-Request-Id` (`REQUEST`)."""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from millrace.settings import Settings

TEXT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s%(request)s"
BATCH_ID = re.compile(r"\bbatch_[0-9a-f]{24}\b")
# the request being answered: (its x-request-id, the caller's X-Client-Request-Id or None)
REQUEST: ContextVar[tuple[str, str | None] | None] = ContextVar("request", default=None)


class RequestIdFilter(logging.Filter):
    """`request_id` and `client_request_id` on every record written while a request is
    answered (None otherwise); `request`: both, as text ends a line with them."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = REQUEST.get()
        record.request_id, record.client_request_id = ids or (None, None)
        record.request = "" if ids is None else f" [{ids[0]}" + (
            f" client {ids[1]}]" if ids[1] else "]")
        return True


class BatchIdFilter(logging.Filter):
    """`batch_id` on every record whose message names a batch (None otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "batch_id"):
            found = BATCH_ID.search(record.getMessage())
            record.batch_id = found[0] if found else None
        return True


def configure(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s %(batch_id)s "
            "%(request_id)s %(client_request_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                           "process": "pid"}))
        handler.addFilter(BatchIdFilter())
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    for chatty in ("httpx", "httpx2"):  # the launcher's health polls, the bench's SDK calls
        logging.getLogger(chatty).setLevel(logging.WARNING)
