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

import uuid
from collections.abc import Iterable, Iterator

from pydantic import BaseModel

from gateway.validation import Report, Rules, check_line, parse_lines
from millrace.filestore import FileStore
from millrace.protocol import BATCH_LINE_ERRORS, LineError
from millrace.records import RequestRecord, ResponseRecord
from millrace.settings import Settings
from millrace.topics import Topics, request_route

# (topic, key, partition or None: by key, value)
Produce = tuple[str, str, int | None, bytes]


def rules(settings: Settings, endpoint: str) -> Rules:
    return Rules(endpoint=endpoint, models=settings.served_models(),
                 max_lines=settings.batch_max_lines, max_line_bytes=settings.batch_line_max_bytes)


def request(settings: Settings, topics: Topics, record: RequestRecord) -> Produce:
    """Where a request line goes: its model's topic, its shard of the batch."""
    key, partition = request_route(record.batch_id, record.line, settings.shards(),
                                   settings.request_partitions)
    return topics.requests_for(str(record.body["model"])), key, partition, record.dumps()


def file_requests(files: FileStore, key: str, line_rules: Rules, batch_id: str,
                  project: str) -> Iterator[RequestRecord]:
    """One request record per line of a validated input file."""
    unused = Report()
    for number, raw in parse_lines(files.iter_lines(key)):
        line = check_line(number, raw, line_rules, unused)
        assert line is not None, "validated lines cannot fail on a second pass"
        yield RequestRecord(batch_id=batch_id, project=project, custom_id=line.custom_id,
                            line=number, url=line.url, body=line.body)


def not_run(batch_id: str, project: str, custom_id: str, line: int, code: str
            ) -> ResponseRecord:
    """The error line of a request that will not run (`batch_cancelled`, `batch_expired`)."""
    return ResponseRecord(
        batch_id=batch_id, project=project, custom_id=custom_id, line=line,
        id=f"batch_req_{uuid.uuid4().hex}", request_id=None, status_code=None, body=None,
        error=LineError(code=code, message=BATCH_LINE_ERRORS.get(code, code)))


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
