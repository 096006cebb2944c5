"""Typed, versioned Kafka records: the contract between millrace services and subscribers.

Every record carries `v` (schema version; fields are only ever added) and is serialised as
UTF-8 JSON. Keys are the batch id for all three topics.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from millrace.lifecycle.status import BatchStatus
from millrace.protocol import BatchError, FileObject, LineError, WebhookEndpoint


def now() -> int:
    return int(time.time())


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = 1

    def dumps(self) -> bytes:
        return self.model_dump_json().encode()


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


def line_ticket(line_key: str, line: int, custom_id: str) -> str:
    """What the gateway issues line `line` of a batch with, and the sink checks a response
    against before it counts: an HMAC under the batch's own key (Redis `batch:<id>`
    `line_key`, made at create), so a record for a line the batch does not have, or
    written by someone who never saw the request, reaches no file and no count."""
    mac = hmac.new(bytes.fromhex(line_key), f"{line}:{custom_id}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


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


read_request = msgspec.json.Decoder(QueuedRequest, strict=False).decode


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


class _Event(Record):
    batch_id: str
    at: int = Field(default_factory=now)


class BatchCreated(_Event):
    """The gateway accepted a create call; `batch` is the Batch object as created."""

    type: Literal["created"] = "created"
    project: str
    batch: dict[str, Any]
    output_expires_after_s: int | None = None
    # the batch's own webhook target, `{"url": …}` (create field or metadata.webhook_url)
    webhook: dict[str, Any] | None = None
    # its place in the project's batch list (the list index score)
    listed_at: float | None = None
    # the input file is fetched from here by the explode (`input_file_url`): its file
    # object, `input_file_id`, is registered once it is in the file store
    input_url: str | None = None


class BatchOpened(_Event):
    """A stream batch was created: it is in progress at once and takes lines from the
    ingest topic until sealed (then `validated` carries its total)."""

    type: Literal["opened"] = "opened"


class BatchValidated(_Event):
    """Every line passed validation and is on the requests topic."""

    type: Literal["validated"] = "validated"
    total: int
    model: str | None = None


class BatchValidationFailed(_Event):
    type: Literal["validation_failed"] = "validation_failed"
    errors: list[BatchError]


class BatchCancelRequested(_Event):
    """A user asked to cancel; the aggregator decides whether the batch can be."""

    type: Literal["cancel_requested"] = "cancel_requested"


class BatchExpireDue(_Event):
    """The aggregator's timer saw `expires_at` pass; applied in-stream like any event."""

    type: Literal["expire_due"] = "expire_due"


class BatchTransition(_Event):
    """Published by the aggregator for every status change it applies."""

    type: Literal["transition"] = "transition"
    project: str
    from_status: BatchStatus
    to_status: BatchStatus
    total: int
    completed: int
    failed: int


class BatchProgress(_Event):
    """The sink's count of the batch's result lines so far (absolute, never decreasing):
    exactly what its output and error files hold."""

    type: Literal["progress"] = "progress"
    completed: int
    failed: int
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # of input_tokens
    reasoning_tokens: int = 0  # of output_tokens

    @property
    def done(self) -> int:
        return self.completed + self.failed


class BatchFillRequested(_Event):
    """The batch was cancelled or expired: every line without a result gets an error line
    with `code` (`batch_cancelled` / `batch_expired`), without waiting for workers."""

    type: Literal["fill_requested"] = "fill_requested"
    project: str
    code: str
    input_file_id: str | None = None


class BatchRedriveRequested(_Event):
    """Every line without a result is put on the requests topic again (after a broker lost
    its data, or by an operator's sweep); lines that finish twice are written once."""

    type: Literal["redrive_requested"] = "redrive_requested"
    project: str
    input_file_id: str | None = None


class BatchFilled(_Event):
    """The gateway wrote an error line for every line without a result; `total` is the
    batch's number of lines (a batch that expired while validating learns it here)."""

    type: Literal["filled"] = "filled"
    total: int


class BatchFilesReady(_Event):
    """The sink wrote the batch's output and error files (ids are None when empty); the
    counts and usage are those of the files."""

    type: Literal["files_ready"] = "files_ready"
    output_file_id: str | None
    error_file_id: str | None
    lines: int
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


class WebhookTarget(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str
    # "batch": the batch's own webhook_url; "endpoint": a project's configured endpoint
    source: Literal["batch", "endpoint"]
    endpoint_id: str | None = None
    # the body's shape: OpenAI's event, or PromptLoop's `{job_id, status, data: [rows]}`
    format: Literal["openai", "promptloop"] = "openai"


class BatchFinished(_Event):
    """The batch reached its final status with its files: one record per batch for
    subscribers, and what the sink sends webhooks from."""

    type: Literal["finished"] = "finished"
    project: str
    status: BatchStatus
    batch: dict[str, Any]  # the final Batch object, as GET /v1/batches/{id} returns it
    webhooks: list[WebhookTarget] = Field(default_factory=list)


BatchEvent = Annotated[
    BatchCreated
    | BatchOpened
    | BatchValidated
    | BatchValidationFailed
    | BatchCancelRequested
    | BatchExpireDue
    | BatchTransition
    | BatchProgress
    | BatchFillRequested
    | BatchRedriveRequested
    | BatchFilled
    | BatchFilesReady
    | BatchFinished,
    Field(discriminator="type"),
]
_event_adapter: TypeAdapter[BatchEvent] = TypeAdapter(BatchEvent)


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


def parse_event(raw: bytes | str) -> BatchEvent:
    return _event_adapter.validate_json(raw)


# --- `<prefix>.registry`: what the gateway and sink register, for rebuilding Redis ---------
# Compacted; keyed `<type>:<id>`; a deletion is a tombstone (null value) under the same key.


class FileEntry(Record):
    type: Literal["file"] = "file"
    file: FileObject
    project: str
    path: str
    listed_at: float

    @property
    def key(self) -> str:
        return f"file:{self.file.id}"


class ApiKeyEntry(Record):
    """An API key, by its SHA-256 only: the key itself is never written anywhere."""

    type: Literal["api_key"] = "api_key"
    key_hash: str
    project: str
    admin: bool = False
    rpm: int = 0
    routes: dict[str, int] = Field(default_factory=dict)
    created_at: int = Field(default_factory=now)

    @property
    def key(self) -> str:
        return f"api_key:{self.key_hash}"


class EndpointEntry(Record):
    type: Literal["webhook_endpoint"] = "webhook_endpoint"
    project: str
    endpoint: WebhookEndpoint

    @property
    def key(self) -> str:
        return endpoint_key(self.project, self.endpoint.id)


def endpoint_key(project: str, endpoint_id: str) -> str:
    return f"webhook_endpoint:{project}:{endpoint_id}"


class Fence(Record):
    """Written by a reader to every partition, to know when it has read everything before."""

    type: Literal["fence"] = "fence"
    token: str


RegistryEntry = Annotated[FileEntry | ApiKeyEntry | EndpointEntry | Fence,
                          Field(discriminator="type")]
_registry_adapter: TypeAdapter[RegistryEntry] = TypeAdapter(RegistryEntry)


def parse_registry(raw: bytes | str) -> RegistryEntry:
    return _registry_adapter.validate_json(raw)


class ModelLoad(BaseModel):
    """One served model on one worker."""

    model_config = ConfigDict(frozen=True)

    running: int = 0  # requests in the engine
    waiting: int = 0  # lines read from Kafka, waiting for room in the engine
    lag: int = 0  # lines of the model's requests topic not yet read (this worker's partitions)
    finished: int = 0  # answered with 200 since the worker started
    failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # the endpoints it answers, and the LoRA adapters served on it (each a model name a
    # line may give, run on this model)
    endpoints: list[str] = Field(default_factory=list)
    adapters: list[str] = Field(default_factory=list)


class WorkerStatus(Record):
    """`<prefix>.workers` (key: the worker's name): a worker's load, every few seconds, for
    the dashboard. `history` holds (unix time, finished, generation tokens) sampled every
    `HISTORY_EVERY_S` over the last minutes; `stopped` is the last record of a worker that
    stopped."""

    worker: str
    at: float = Field(default_factory=time.time)
    started_at: float
    models: dict[str, ModelLoad]
    history: list[tuple[float, int, int]] = Field(default_factory=list)
    stopped: bool = False
