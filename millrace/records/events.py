"""`<prefix>.batch-events`: a batch's life, keyed by batch, and `EVENT_FLOW`: who writes
and who reacts to each event type."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from millrace.lifecycle.status import BatchStatus
from millrace.protocol import BatchError
from millrace.records.base import Record, now


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


def parse_event(raw: bytes | str) -> BatchEvent:
    return _event_adapter.validate_json(raw)


class Flow(NamedTuple):
    """Who writes an event type, and who reacts to it (besides subscribers, who may read
    every event)."""

    writers: frozenset[str]
    readers: frozenset[str]


def _flow(writers: str, readers: str) -> Flow:
    return Flow(frozenset(writers.split()), frozenset(readers.split()))


# Event type → its writers → its readers. `recovery` is `millrace/recovery.py` (the resume
# and rebuild commands, the launcher after a broker restart, the gateway's admin sweep);
# `worker` is gpu_consumer. Each reader dispatches through a `{type: handler}` table whose
# keys a test compares with this one (tests/millrace/records/test_events.py).
EVENT_FLOW: dict[str, Flow] = {
    "created": _flow("gateway recovery", "gateway aggregator sink"),
    "opened": _flow("gateway", "aggregator"),
    "validated": _flow("gateway recovery", "aggregator sink"),
    "validation_failed": _flow("gateway", "aggregator"),
    "cancel_requested": _flow("gateway", "aggregator"),
    "expire_due": _flow("aggregator recovery", "aggregator"),
    "transition": _flow("aggregator", "worker"),
    "progress": _flow("sink", "aggregator"),
    "fill_requested": _flow("aggregator recovery", "gateway sink"),
    "redrive_requested": _flow("recovery", "gateway sink"),
    "filled": _flow("gateway", "aggregator sink"),
    "files_ready": _flow("sink", "aggregator"),
    "finished": _flow("aggregator recovery", "gateway sink"),
}


def readers_of(service: str) -> set[str]:
    """The event types `service` reacts to."""
    return {kind for kind, flow in EVENT_FLOW.items() if service in flow.readers}


def writers_of(service: str) -> set[str]:
    """The event types `service` writes."""
    return {kind for kind, flow in EVENT_FLOW.items() if service in flow.writers}
