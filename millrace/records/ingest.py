"""`<prefix>.ingest` headers and `<prefix>.ingest-rejects`: what producers write into a
stream batch, and what did not become a request line."""

from __future__ import annotations

from pydantic import Field

from millrace.records.base import Record, now


class IngestReject(Record):
    """`<prefix>.ingest-rejects`: an ingest message that did not become a request line."""

    batch_id: str | None
    code: str
    reason: str
    partition: int
    offset: int
    value: str  # the message as received (UTF-8, replacement characters), cut at 4 KiB
    at: int = Field(default_factory=now)


# Header that marks a control message on the ingest topic; `seal` closes the batch.
CONTROL_HEADER = "millrace-control"
# a stream batch's ingest token (given when it is created) on every message written into it
INGEST_TOKEN_HEADER = "millrace-ingest-token"
