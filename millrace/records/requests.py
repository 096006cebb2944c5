"""`<prefix>.requests` (and `<prefix>.requests.<model>`): one accepted input line per
record, keyed by batch."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec
from pydantic import Field

from millrace.records.base import Record


class RequestRecord(Record):
    """`<prefix>.requests`: one accepted input line, ready for a worker."""

    batch_id: str
    project: str
    custom_id: str
    line: int
    url: str
    body: dict[str, Any]
    enqueued_at: float = Field(default_factory=time.time)
    # someone waits for this line's answer (PromptLoop's run-one-row): the sink also hands
    # its output line to Redis (`reply:<batch>`) the moment it is spooled
    reply: bool = False
    # the gateway's proof that it issued this line (`line_ticket`); its response carries it
    ticket: str | None = None
    # the batch's priority (higher first) and when its window ends (unix seconds): the
    # order a worker admits waiting lines in (`gpu_consumer.admission.Backlog`)
    priority: int = 0
    deadline: float | None = None


# A batch's `completion_window` that runs only on capacity no other batch wants; its lines
# carry `BACKGROUND_PRIORITY`, below any priority a batch may be given, and no deadline.
BACKGROUND = "background"
BACKGROUND_PRIORITY = -1001


class Order(NamedTuple):
    """Where a batch's lines stand in a worker's queue: its priority (higher first), then
    its deadline (the end of its completion window, unix seconds; earlier first)."""

    priority: int = 0
    deadline: float | None = None

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> Order:
        """A Batch document's order (`expires_at` is its window's end; a background batch
        has none)."""
        if batch.get("completion_window") == BACKGROUND:
            return cls(BACKGROUND_PRIORITY, None)
        expires = batch.get("expires_at")
        return cls(int(batch.get("priority") or 0),
                   float(expires) if expires is not None else None)


def line_ticket(line_key: str, line: int, custom_id: str) -> str:
    """What the gateway issues line `line` of a batch with, and the sink checks a response
    against before it counts: an HMAC under the batch's own key (Redis `batch:<id>`
    `line_key`, made at create), so a record for a line the batch does not have, or
    written by someone who never saw the request, reaches no file and no count."""
    mac = hmac.new(bytes.fromhex(line_key), f"{line}:{custom_id}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


class QueuedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A `RequestRecord` value as a worker reads it (msgspec decodes it in a third of
    pydantic's time; the worker reads every line)."""

    batch_id: str
    project: str
    custom_id: str
    line: int
    url: str
    body: dict[str, Any]
    enqueued_at: float = msgspec.field(default_factory=time.time)
    reply: bool = False
    ticket: str | None = None
    priority: int = 0
    deadline: float | None = None


read_request = msgspec.json.Decoder(QueuedRequest, strict=False).decode
