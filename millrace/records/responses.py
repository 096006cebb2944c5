"""`<prefix>.responses`: one outcome per request line, keyed by batch; how the sink reads
it back, and what a line counts for in its batch's `usage`."""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from millrace.protocol import LineError
from millrace.records.base import Record
from millrace.records.requests import QueuedRequest


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0


class ResponseOutcome(Record):
    """What counting needs of a response record; parsing a full `ResponseRecord` value as
    this skips building its body."""

    batch_id: str
    custom_id: str
    # the request's line in the batch (RequestRecord.line): the aggregator's dedupe key
    line: int | None = None
    status_code: int | None
    usage: Usage = Field(default_factory=Usage)

    @property
    def ok(self) -> bool:
        return self.status_code == 200


class ResponseRecord(ResponseOutcome):
    """`<prefix>.responses`: the outcome of one request line.

    `status_code` 200 goes to the output file; anything else (an engine/HTTP-style error
    with a `body`, or a batch-level `error` with no response) goes to the error file.
    """

    project: str
    id: str
    request_id: str | None
    body: dict[str, Any] | None
    error: LineError | None = None
    worker: str = ""
    # time this request spent in the engine (admitted → finished)
    engine_ms: float | None = None
    # time it waited before the engine admitted it (gateway enqueue → admitted)
    queue_ms: float | None = None
    finished_at: float = Field(default_factory=time.time)
    reply: bool = False  # the request's: see RequestRecord.reply
    ticket: str | None = None  # the request's: see RequestRecord.ticket


NULL = msgspec.Raw(b"null")


class Tokens(NamedTuple):
    """What one result line counts for in its batch's `usage`."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0  # of the prompt, served from the engine's prefix cache
    reasoning: int = 0  # of the completion

    def plus(self, other: Tokens) -> Tokens:
        return Tokens(*(a + b for a, b in zip(self, other, strict=True)))

    def usage(self) -> dict[str, int]:
        """As the usage fields of `BatchProgress` and `BatchFilesReady`."""
        return {"input_tokens": self.prompt, "output_tokens": self.completion,
                "cached_tokens": self.cached, "reasoning_tokens": self.reasoning}


class _TokenDetails(msgspec.Struct):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _BodyUsage(msgspec.Struct):
    """A response body's `usage`, whatever the endpoint: `prompt_tokens` and
    `completion_tokens` (chat, completions, embeddings, score, classify, pooling) or
    `input_tokens` and `output_tokens` (Responses), each with its details."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_tokens_details: _TokenDetails | None = None
    completion_tokens_details: _TokenDetails | None = None
    input_tokens_details: _TokenDetails | None = None
    output_tokens_details: _TokenDetails | None = None

    def tokens(self) -> Tokens:
        given = self.prompt_tokens_details or self.input_tokens_details
        made = self.completion_tokens_details or self.output_tokens_details
        return Tokens(self.prompt_tokens or self.input_tokens or 0,
                      self.completion_tokens or self.output_tokens or 0,
                      (given.cached_tokens or 0) if given else 0,
                      (made.reasoning_tokens or 0) if made else 0)


class _Body(msgspec.Struct):
    usage: _BodyUsage | None = None


class _LineResponse(msgspec.Struct):
    status_code: int
    request_id: str
    body: msgspec.Raw


class _OutputLine(msgspec.Struct):
    id: str
    custom_id: str
    response: _LineResponse | None
    error: msgspec.Raw


class SpooledResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A `ResponseRecord` value as the sink reads it: the same required fields, but `body`
    and `error` are kept as the JSON bytes they came as and copied into the output line
    as they are. Building the body as Python objects and serialising it again was half of
    the sink's CPU (py-spy, 50,000-line batch)."""

    batch_id: str
    project: str
    custom_id: str
    id: str
    line: int | None = None
    status_code: int | None
    request_id: str | None
    body: msgspec.Raw
    error: msgspec.Raw = NULL
    reply: bool = False
    ticket: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200

    @property
    def has_response(self) -> bool:
        return self.status_code is not None and self.body != NULL

    def output_line(self) -> bytes:
        """The line of the output or error file (`protocol.OutputLine`, compact JSON)."""
        response = (_LineResponse(self.status_code or 0, self.request_id or "", self.body)
                    if self.has_response else None)
        return _encode(_OutputLine(self.id, self.custom_id, response, self.error))

    def tokens(self) -> Tokens:
        """What the line counts for: its response body's `usage`."""
        return body_tokens(self.body) if self.has_response else Tokens()


_encode = msgspec.json.Encoder().encode
_decode_body = msgspec.json.Decoder(_Body).decode
read_response = msgspec.json.Decoder(SpooledResponse).decode


def body_tokens(body: bytes) -> Tokens:
    """The tokens of a response body (JSON), from its `usage`."""
    try:
        usage = _decode_body(body).usage
    except msgspec.ValidationError:  # not the usual shape: read it the lenient way
        return usage_of(json.loads(bytes(body)))
    return usage.tokens() if usage is not None else Tokens()


def usage_of(body: object) -> Tokens:
    """The tokens of a result line's response body (parsed), from its `usage`; a `usage` of
    another shape counts for nothing."""
    usage = body.get("usage") if isinstance(body, dict) else None
    try:
        return msgspec.convert(usage, _BodyUsage, strict=False).tokens()
    except msgspec.ValidationError:
        return Tokens()


class _WireUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WireError(msgspec.Struct):
    code: str
    message: str


class _ResponseWire(msgspec.Struct, kw_only=True):
    """`ResponseRecord`'s JSON, field for field and in its order."""

    v: int = 1
    batch_id: str
    custom_id: str
    line: int | None
    status_code: int | None
    usage: _WireUsage
    project: str
    id: str
    request_id: str | None
    body: msgspec.Raw | None
    error: _WireError | None
    worker: str
    engine_ms: float | None
    queue_ms: float | None
    finished_at: float
    reply: bool
    ticket: str | None


def response_value(
    request: QueuedRequest, *, id: str, request_id: str | None, status_code: int | None,
    body: bytes | None, tokens: Tokens, error: LineError | None, worker: str,
    engine_ms: float | None, queue_ms: float | None,
) -> bytes:
    """The `ResponseRecord` value of a request's outcome, as a worker produces it (the
    same bytes as `ResponseRecord(...).dumps()`, without building the model); `body` is the
    engine's JSON, copied in as it is."""
    return _encode(_ResponseWire(
        batch_id=request.batch_id, custom_id=request.custom_id, line=request.line,
        status_code=status_code,
        usage=_WireUsage(tokens.prompt, tokens.completion),
        project=request.project, id=id, request_id=request_id,
        body=msgspec.Raw(body) if body is not None else None,
        error=_WireError(error.code, error.message) if error is not None else None,
        worker=worker, engine_ms=engine_ms, queue_ms=queue_ms, finished_at=time.time(),
        reply=request.reply, ticket=request.ticket))
