"""Log lines of every millrace process: text for people, or (`MILLRACE_LOG_FORMAT=json`) one
JSON object per line for log pipelines, with the batch id as its own field wherever the
message names one."""

from __future__ import annotations

import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

from millrace.settings import Settings

TEXT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
BATCH_ID = re.compile(r"\bbatch_[0-9a-f]{24}\b")


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
            "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s %(batch_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                           "process": "pid"}))
        handler.addFilter(BatchIdFilter())
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    for chatty in ("httpx", "httpx2"):  # the launcher's health polls, the bench's SDK calls
        logging.getLogger(chatty).setLevel(logging.WARNING)
