"""The OpenAI wire format: batch input/output lines, files, batches, models, errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from millrace.lifecycle.status import BatchStatus

# Every endpoint a batch line may name: vLLM's server paths. A deployment serves those its
# models support, as its workers advertise them on the worker board.
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
SCORE = ("/v1/score", "/score")
RERANK = ("/v1/rerank", "/rerank", "/v2/rerank")
CLASSIFY = "/classify"
POOLING = "/pooling"
GENERATE_ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES)
SUPPORTED_ENDPOINTS = (*GENERATE_ENDPOINTS, EMBEDDINGS, *SCORE, *RERANK, CLASSIFY, POOLING)

# The webhook events a batch sends when it ends (OpenAI's names).
BATCH_EVENT_TYPES = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")

# Error lines for requests that were never run, as OpenAI words them.
BATCH_LINE_ERRORS = {
    "batch_cancelled": "This request was not run because the batch was cancelled.",
    "batch_expired": "This request could not be executed before the completion window expired.",
}


class RequestLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """Every HTTP error body and every per-line error body."""

    error: ErrorDetail


class LineResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class LineError(BaseModel):
    code: str
    message: str


class OutputLine(BaseModel):
    """One line of a batch output or error file."""

    model_config = ConfigDict(extra="forbid")

    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None


class ExpiresAfter(BaseModel):
    """`expires_after` of a file, `output_expires_after` of a batch: OpenAI's bounds, one
    hour to thirty days after creation."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class BatchEstimate(BaseModel):
    """millrace extension: what admission at create found (issue 28). Tokens are estimated
    from the input file (prompts by the model's tokenizer where the gateway has it, else 4
    bytes a token; outputs at each line's `max_tokens`, times `n`); `queued_tokens` are
    those of the same model's unfinished batches of at least its priority; `eta_seconds`
    is over the workers' measured `tokens_per_s` (None while no worker measured it) of
    its prompts and the outputs it is likely to take — at the tokens a request of the model
    has generated on average (`expected_output_tokens`, never above the maximum) — after
    those queued ahead of it, counted the same way."""

    model: str | None = None
    prompt_tokens: int = 0
    max_output_tokens: int = 0
    expected_output_tokens: int = 0
    queued_tokens: int = 0
    tokens_per_s: float | None = None
    eta_seconds: int | None = None


class Batch(BaseModel):
    """The Batch object as the OpenAI SDK types it, plus `priority` and `estimate` (millrace
    extensions the SDK keeps as extra fields)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    usage: BatchUsage = Field(default_factory=BatchUsage)
    # millrace extension (as Gemini's batch `priority`): higher is served first
    priority: int = 0
    # millrace extension: admission's estimate at create (None: none was made — a batch
    # whose input is fetched from a URL or streamed, or admission off)
    estimate: BatchEstimate | None = None

    @property
    def settled(self) -> bool:
        """Finished, with its result files attached (an expired batch gets them after it
        entered `expired`: the sink seals them then)."""
        if not self.status.terminal:
            return False
        if self.status is BatchStatus.EXPIRED:
            # an expired batch always has an error line, unless it never had any line
            # (a stream batch that expired before its first message)
            counts = self.request_counts
            nothing = counts.total == counts.completed == counts.failed == 0
            return bool(self.output_file_id or self.error_file_id) or nothing
        return True


class WebhookEndpoint(BaseModel):
    """A project's webhook endpoint, in OpenAI's shape (`client.webhooks.create/list/...`):
    `event_types` are the events it hears. `events` is millrace's older field for the same
    thing (None = every batch event), still accepted and shown."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    name: str = ""
    event_types: list[str] = Field(default_factory=lambda: list(BATCH_EVENT_TYPES))
    events: list[str] | None = None
    created_at: int
    updated_at: int | None = None
    signing_secret_hint: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _older(cls, data: Any) -> Any:
        """A record from before `event_types`: its `events` are its event types."""
        if isinstance(data, dict) and "event_types" not in data and data.get("events"):
            return {**data, "event_types": data["events"]}
        return data


class StoredEndpoint(WebhookEndpoint):
    """The endpoint as the read model and the registry keep it: which of its secrets sign.
    No secret is stored; each is derived from the deployment's signing key
    (`millrace.webhooks.endpoint_secret`). Generation 0 is the project's secret (endpoints
    made with `{url, events}` before per-endpoint secrets, and until their first rotation);
    the previous generation still signs until `previous_until`."""

    generation: int = 0
    previous_generation: int | None = None
    previous_until: int | None = None

    def public(self) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(self.model_dump(
            exclude={"generation", "previous_generation", "previous_until"}))


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "millrace"


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[Any], has_more: bool = False) -> ListPage:
        """A page whose first_id/last_id come from the ids of its items."""
        return cls(data=data, first_id=data[0].id if data else None,
                   last_id=data[-1].id if data else None, has_more=has_more)
