"""A batch's lines, as the records they become on the topics.

- File batches: the lines of the uploaded input file (validated first: `validation.py`);
  line n of the file becomes the `RequestRecord` with `line` n.
- Stream batches: the lines the ingest stage took from `<prefix>.ingest`, persisted in the
  file store (`streams/<batch>/<segment>.jsonl`, one segment per ingest poll, written
  before they are enqueued) so that they can be enqueued again after a broker lost them.

A job (explode, fill, re-drive) walks these lines and skips those that already have a
result (the sink's `done` bitmap); a line enqueued twice is written once by the sink.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgspec
from pydantic import BaseModel

from gateway.validation import Report, Rules, check_line, parse_lines
from gateway.worker_board import ServedNames, WorkerBoard
from millrace.filestore import FileStore
from millrace.protocol import BATCH_LINE_ERRORS, LineError
from millrace.records import Order, RequestRecord, ResponseRecord, line_ticket
from millrace.settings import Settings
from millrace.topics import Topics, request_route

# (topic, key, partition or None: by key, value)
Produce = tuple[str, str, int | None, bytes]
UNORDERED = Order()  # priority 0, no deadline


def rules(settings: Settings, endpoint: str, board: WorkerBoard) -> Rules:
    """What a batch's lines must satisfy: `board` adds the LoRA adapters workers serve."""
    return Rules(endpoint=endpoint, models=ServedNames(settings, board),
                 max_lines=settings.batch_max_lines, max_line_bytes=settings.batch_line_max_bytes)


def request(settings: Settings, topics: Topics, record: RequestRecord) -> Produce:
    """Where a request line goes: its model's topic, its shard of the batch."""
    key, partition = request_route(record.batch_id, record.line, settings.shards(),
                                   settings.request_partitions)
    return topics.requests_for(str(record.body["model"])), key, partition, record.dumps()


class _Parts(msgspec.Struct):
    """A validated input line, its body kept as the bytes it came as."""

    custom_id: str
    url: str
    body: msgspec.Raw


class _Model(msgspec.Struct):
    model: str


class _RequestWire(msgspec.Struct, kw_only=True):
    """`RequestRecord`'s JSON, field for field, with the body spliced in as bytes."""

    v: int = 1
    batch_id: str
    project: str
    custom_id: str
    line: int
    url: str
    body: msgspec.Raw
    enqueued_at: float
    reply: bool = False
    ticket: str | None = None
    priority: int = 0
    deadline: float | None = None


_parts = msgspec.json.Decoder(_Parts).decode
_model = msgspec.json.Decoder(_Model).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class FileLine:
    """One line of a validated input file as it is enqueued: its `RequestRecord` value."""

    line: int
    custom_id: str
    model: str
    value: bytes
    # it may have `{"type": "link"}` parts, to be fetched before it is enqueued: its record
    # is read back and looked at (`link_urls`)
    maybe_links: bool

    def record(self) -> RequestRecord:
        return RequestRecord.model_validate_json(self.value)


def file_lines(files: FileStore, key: str, line_rules: Rules, batch_id: str, project: str,
               reply: bool = False, model: str | None = None, line_key: str | None = None,
               order: Order = UNORDERED) -> Iterator[FileLine]:
    """The request record of every line of a validated input file. The body is copied as
    bytes, not parsed and serialised again: building and dumping a `RequestRecord` per line
    was two thirds of the explode's CPU (cProfile, 50,000 lines). `model`: the batch's one
    model, if known (validation found it); else each line's is read. `line_key`: the
    batch's, each line's ticket is made with (`records.line_ticket`). `order`: the batch's
    priority and deadline, which every line carries to the workers."""
    for number, raw in parse_lines(files.iter_lines(key)):
        # a link part has the string "link" in it, written plainly or with \u escapes
        maybe_links = b'"link"' in raw or b"\\u" in raw
        try:
            parts = _parts(raw)
            line_model = model or _model(parts.body).model
            custom_id = parts.custom_id
            value = _encode(_RequestWire(
                batch_id=batch_id, project=project, custom_id=custom_id, line=number,
                url=parts.url, body=parts.body, enqueued_at=time.time(), reply=reply,
                ticket=ticket(line_key, number, custom_id), priority=order.priority,
                deadline=order.deadline))
        except msgspec.DecodeError:  # valid, yet not in the usual shape: the long way
            line = check_line(number, raw, line_rules, Report())
            assert line is not None, "validated lines cannot fail on a second pass"
            custom_id, line_model = line.custom_id, str(line.body["model"])
            value = RequestRecord(batch_id=batch_id, project=project, custom_id=custom_id,
                                  line=number, url=line.url, body=line.body, reply=reply,
                                  ticket=ticket(line_key, number, custom_id),
                                  priority=order.priority, deadline=order.deadline).dumps()
        yield FileLine(number, custom_id, line_model, value, maybe_links)


def enqueue(settings: Settings, topics: Topics, line: FileLine, batch_id: str) -> Produce:
    """Where a file line goes (as `request`), its record value as it is."""
    key, partition = request_route(batch_id, line.line, settings.shards(),
                                   settings.request_partitions)
    return topics.requests_for(line.model), key, partition, line.value


def ticket(line_key: str | None, line: int, custom_id: str) -> str | None:
    """A line's ticket, if its batch has a key (one created before tickets has none)."""
    return line_ticket(line_key, line, custom_id) if line_key else None


def not_run(batch_id: str, project: str, custom_id: str, line: int, code: str,
            line_key: str | None) -> ResponseRecord:
    """The error line of a request that will not run (`batch_cancelled`, `batch_expired`)."""
    return ResponseRecord(
        batch_id=batch_id, project=project, custom_id=custom_id, line=line,
        id=f"batch_req_{uuid.uuid4().hex}", request_id=None, status_code=None, body=None,
        error=LineError(code=code, message=BATCH_LINE_ERRORS.get(code, code)),
        ticket=ticket(line_key, line, custom_id))


# --- stream batches ---------------------------------------------------------------------
class StreamLine(BaseModel):
    """One line of a stream batch as the ingest stage enqueued it: a request, or (for a
    message that failed validation) its error response."""

    line: int
    custom_id: str
    request: RequestRecord | None = None
    error: ResponseRecord | None = None


def stream_dir(batch_id: str) -> str:
    return f"streams/{batch_id}"


def persist_stream_lines(files: FileStore, batch_id: str, lines: Iterable[StreamLine]) -> None:
    """One segment with a poll's lines of the batch (whole or not at all)."""
    data = b"".join(line.model_dump_json().encode() + b"\n" for line in lines)
    if data:
        files.write_bytes(f"{stream_dir(batch_id)}/{uuid.uuid4().hex}.jsonl", data)


def stream_lines(files: FileStore, batch_id: str) -> Iterator[StreamLine]:
    """Every persisted line of a stream batch, each line number once."""
    seen: set[int] = set()
    for name in files.names(stream_dir(batch_id)):
        if not name.endswith(".jsonl"):
            continue
        for raw in files.iter_lines(f"{stream_dir(batch_id)}/{name}"):
            if raw.strip():
                line = StreamLine.model_validate_json(raw)
                if line.line not in seen:
                    seen.add(line.line)
                    yield line


# --- link inputs --------------------------------------------------------------------------
def link_urls(record: RequestRecord) -> list[str]:
    """The URLs of a request's `{"type": "link", "url": …}` content parts (PromptLoop's link
    inputs): fetched by the explode and replaced by their text before the line is enqueued."""
    urls = []
    for message in record.body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            urls += [str(p["url"]) for p in content
                     if isinstance(p, dict) and p.get("type") == "link" and p.get("url")]
    return urls


# url → the page's text, or None with why it could not be fetched ("could not fetch (…)")
Fetched = dict[str, tuple[str | None, str]]


def with_links(record: RequestRecord, fetched: Fetched) -> RequestRecord | ResponseRecord:
    """The request with each link part replaced by the fetched text, or — if a link could
    not be fetched — the line's `fetch_failed` error."""
    for url in link_urls(record):
        text, reason = fetched[url]
        if text is None:
            return ResponseRecord(
                batch_id=record.batch_id, project=record.project, custom_id=record.custom_id,
                line=record.line, id=f"batch_req_{uuid.uuid4().hex}", request_id=None,
                status_code=None, body=None, reply=record.reply, ticket=record.ticket,
                error=LineError(code="fetch_failed", message=f"{url}: {reason}"))
    messages = []
    for message in record.body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "text", "text": f"{p.get('name') or 'link'}: "
                        f"{fetched[str(p['url'])][0]}"}
                       if isinstance(p, dict) and p.get("type") == "link" else p
                       for p in content]
            message = {**message, "content": content}
        messages.append(message)
    return record.model_copy(update={"body": {**record.body, "messages": messages}})
