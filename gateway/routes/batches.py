"""`/v1/batches`: create, retrieve, list, cancel, and the dry-run validator."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from gateway.auth import Caller
from gateway.context import Ctx
from gateway.deps import owned_batch
from gateway.ingest_topic import close_if_complete
from gateway.lines import rules
from gateway.routes.files import new_file_id
from gateway.stream_ledger import StreamLedger
from gateway.validation import validate
from gateway.worker_board import ServedNames
from millrace.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from millrace.protocol import CHAT, Batch, BatchError, ExpiresAfter, ListPage
from millrace.records import (
    CONTROL_HEADER,
    INGEST_TOKEN_HEADER,
    BatchCancelRequested,
    BatchCreated,
    BatchOpened,
)
from millrace.status import BatchStatus
from millrace.webhooks import check_target, signing_key, webhook_guard

router = APIRouter(prefix="/v1/batches", tags=["batches"])

STREAM_INPUT = "stream"  # input_file_id of a stream batch (the SDK types it as a string)
# OpenAI accepts only "24h"; shorter windows are a millrace extension (1s .. 24h).
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 24 * 3600


def window_seconds(window: str) -> int:
    match = _WINDOW.match(window)
    seconds = int(match[1]) * _UNIT_S[match[2]] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequestError(
            "completion_window must be '24h' or a shorter window like '1h', '30m', '90s'",
            param="completion_window", code="invalid_value",
        )
    return seconds


def _metadata_bounds(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's bounds: 16 pairs, keys of 64 and values of 512 characters."""
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError("metadata may hold at most 16 pairs")
    for key, item in value.items():
        if len(key) > 64:
            raise ValueError(f"metadata key '{key[:20]}…' is longer than 64 characters")
        if len(item) > 512:
            raise ValueError(f"metadata value of '{key}' is longer than 512 characters")
    return value


Metadata = Annotated[dict[str, str] | None, AfterValidator(_metadata_bounds)]


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str | None = None
    # millrace extension (as vLLM's run-batch takes a URL): the input file is fetched from
    # here, through the outbound guard, into the file store
    input_file_url: str | None = Field(default=None, max_length=2048)
    # millrace extension: "stream" opens a batch fed from the ingest topic, sealed later
    input: Literal["file", "stream"] = "file"
    endpoint: str
    completion_window: str
    metadata: Metadata = None
    output_expires_after: ExpiresAfter | None = None
    # Inference Cloud's field (seed 003); `metadata.webhook_url` works the same way
    webhook_url: str | None = Field(default=None, max_length=2048)

    @property
    def webhook(self) -> tuple[str, str] | None:
        """(url, the parameter it came from), if the batch asks for a webhook."""
        if self.webhook_url is not None:
            return self.webhook_url, "webhook_url"
        url = (self.metadata or {}).get("webhook_url")
        return (url, "metadata.webhook_url") if url is not None else None


def served_endpoint(ctx: Ctx, endpoint: str) -> None:
    """Refuse `endpoint` unless the workers serve it (every endpoint vLLM's server has
    while no worker has reported yet: the workers judge each line then)."""
    served = ctx.board.endpoints()
    if endpoint not in served:
        raise InvalidRequestError(
            f"endpoint must be one of {', '.join(served)}", param="endpoint",
            code="invalid_value",
        )


@router.post("", response_model=Batch)
async def create(ctx: Ctx, who: Caller, params: CreateBatch) -> Batch | JSONResponse:
    """Create a batch. A stream batch's answer also holds its `ingest_token`, which every
    message written into it must carry (header `millrace-ingest-token`): given once, here."""
    served_endpoint(ctx, params.endpoint)
    window = window_seconds(params.completion_window)
    await check_webhook(ctx, params)
    if params.input == "stream":
        batch, token = await open_stream(ctx, who.project, params, window)
        return JSONResponse({**batch.model_dump(mode="json"), "ingest_token": token})
    if params.input_file_url is not None:
        if params.input_file_id is not None:
            raise InvalidRequestError("Give input_file_id or input_file_url, not both.",
                                      param="input_file_url", code="invalid_value")
        return await from_url(ctx, who.project, params, window, params.input_file_url)
    if params.input_file_id is None:
        raise InvalidRequestError("input_file_id is required (or \"input\": \"stream\")",
                                  param="input_file_id", code="missing_required_parameter")
    source = await ctx.store.get_file(params.input_file_id, who.project)
    if source is None:
        raise NotFoundError(
            f"No such File object: {params.input_file_id}", param="input_file_id"
        )
    if source.obj.purpose != "batch":
        raise InvalidRequestError(
            "The input file must be uploaded with purpose 'batch'.", param="input_file_id",
            code="invalid_file_purpose",
        )
    # a gateway's jobs consumer validates and enqueues it when `created` arrives
    return await register(ctx, who.project, params, window, params.input_file_id,
                          BatchStatus.VALIDATING)


async def check_webhook(ctx: Ctx, params: CreateBatch) -> None:
    if params.webhook is None:
        return
    url, param = params.webhook
    signing_key(ctx.settings, param)
    await check_target(url, ctx.settings, param)


async def from_url(ctx: Ctx, project: str, params: CreateBatch, window: int, url: str,
                   ext: Mapping[str, Any] | None = None) -> Batch:
    """A batch whose input file a gateway's explode fetches from `url` first (the URL is
    checked now, so a refused one is a 400 at once)."""
    await webhook_guard(ctx.settings).check(url, "input_file_url", "invalid_url")
    return await register(ctx, project, params, window, new_file_id(),
                          BatchStatus.VALIDATING, input_url=url,
                          ext={**(ext or {}), "input_file_url": url})


async def register(ctx: Ctx, project: str, params: CreateBatch, window: int,
                   input_file_id: str, status: BatchStatus, *, input_url: str | None = None,
                   ext: Mapping[str, Any] | None = None, webhook_format: str = "openai"
                   ) -> Batch:
    """Store a new Batch object and publish `created` (file and stream batches alike).

    Only a batch whose `created` the broker acknowledged is answered with a 2xx; if it
    cannot be published, the batch is taken back and the caller gets a 503. `ext` holds
    what a PromptLoop or PLai client gave beyond the OpenAI fields.
    """
    listed_at = time.time()
    now = int(listed_at)
    batch = Batch(
        id="batch_" + secrets.token_hex(12),
        endpoint=params.endpoint,
        input_file_id=input_file_id,
        completion_window=params.completion_window,
        status=status,
        created_at=now,
        in_progress_at=now if status is BatchStatus.IN_PROGRESS else None,
        expires_at=now + window,
        metadata=params.metadata,
    )
    webhook = {"url": params.webhook[0], "format": webhook_format} if params.webhook else None
    created = BatchCreated(
        batch_id=batch.id, project=project, batch=batch.model_dump(mode="json"),
        output_expires_after_s=(
            params.output_expires_after.seconds if params.output_expires_after else None),
        webhook=webhook, listed_at=listed_at, input_url=input_url,
    )
    if ext:
        await ctx.store.put_ext(batch.id, ext)
    await ctx.store.create_batch(batch, project, listed_at=listed_at,
                                 created=created.dumps().decode())
    try:
        await ctx.send(batch.id, created)
    except ServiceUnavailableError:
        await ctx.store.forget_batch(batch.id, project)
        raise
    return batch


async def open_stream(ctx: Ctx, project: str, params: CreateBatch, window: int
                      ) -> tuple[Batch, str]:
    """A batch whose lines producers write to `<prefix>.ingest`, in progress at once, and
    the ingest token its messages must carry."""
    if params.input_file_id is not None:
        raise InvalidRequestError("a stream batch takes no input_file_id",
                                  param="input_file_id", code="invalid_value")
    batch = await register(ctx, project, params, window, STREAM_INPUT, BatchStatus.IN_PROGRESS)
    # open for lines before the caller learns the id, so no early line is rejected
    token = "mrit_" + secrets.token_urlsafe(24)
    await StreamLedger(ctx.store).open(batch.id, batch.endpoint, project, token)
    await ctx.send(batch.id, BatchOpened(batch_id=batch.id, at=batch.created_at))
    return batch, token


class ValidateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str = CHAT


class ValidationResult(BaseModel):
    valid: bool
    total: int
    errors: list[BatchError]
    # what this deployment serves: each model name a line may give → its endpoints
    served: dict[str, list[str]] = Field(default_factory=dict)


@router.post("/validate", response_model=ValidationResult)
async def dry_run(ctx: Ctx, who: Caller, request: Request) -> ValidationResult:
    """PromptLoop-style `validate-data`: every check of create, nothing created.

    Takes JSON `{input_file_id, endpoint}` or a multipart upload (`file`, `endpoint`).
    """
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload, endpoint = form.get("file"), form.get("endpoint") or CHAT
        if not isinstance(upload, UploadFile) or not isinstance(endpoint, str):
            raise InvalidRequestError("multipart validation needs 'file' and a valid "
                                      "'endpoint'", param="file")
        lines: Iterable[bytes] = (line.rstrip(b"\r\n") for line in upload.file)
    else:
        try:
            params = ValidateBatch.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        source = await ctx.store.get_file(params.input_file_id, who.project)
        if source is None:
            raise NotFoundError(
                f"No such File object: {params.input_file_id}", param="input_file_id"
            )
        lines, endpoint = ctx.files.iter_lines(source.path), params.endpoint
    served_endpoint(ctx, endpoint)
    report = await asyncio.to_thread(validate, lines, rules(ctx.settings, endpoint, ctx.board))
    return ValidationResult(valid=not report.errors, total=report.total, errors=report.errors,
                            served=served(ctx))


def served(ctx: Ctx) -> dict[str, list[str]]:
    """Each model name → the endpoints it answers (the configured models that no worker
    has reported yet: [], until one does)."""
    board = ctx.board.served()
    return {name: sorted(board.get(name, ())) for name in ServedNames(ctx.settings, ctx.board)}


@router.get("/{batch_id}", response_model=Batch)
async def retrieve(ctx: Ctx, who: Caller, batch_id: str) -> Response:
    """The hottest call (clients poll it): the Batch serialized once, by pydantic-core,
    instead of validated again and encoded by FastAPI."""
    batch = await owned_batch(ctx, who, batch_id)
    return Response(batch.model_dump_json(), media_type="application/json")


@router.post("/{batch_id}/cancel", response_model=Batch)
async def cancel(ctx: Ctx, who: Caller, batch_id: str) -> Batch:
    batch = await owned_batch(ctx, who, batch_id)
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        return batch
    if batch.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        raise ConflictError(f"Cannot cancel a batch with status '{batch.status.value}'.",
                            param="batch_id")
    # The aggregator applies it (and closes an open stream batch as it stands); answer as
    # OpenAI does, already cancelling.
    event = BatchCancelRequested(batch_id=batch.id)
    await ctx.send(batch.id, event)
    return batch.model_copy(update={"status": BatchStatus.CANCELLING,
                                    "cancelling_at": event.at})


class SealBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    total: int | None = Field(default=None, ge=0)


@router.post("/{batch_id}/seal", response_model=Batch)
async def seal(ctx: Ctx, who: Caller, batch_id: str, params: SealBatch | None = None) -> Batch:
    """Close a stream batch.

    With `{"total": N}` (the messages the producers wrote for this batch) it is sealed once
    all N have been processed, whatever partitions they landed on. Without it, a control
    message goes to the batch's partition (murmur2 of the batch id): exact only for lines
    produced before it to that same partition, i.e. with a Java-compatible partitioner.
    """
    batch = await owned_batch(ctx, who, batch_id)
    ledger = StreamLedger(ctx.store)
    stream = await ledger.get(batch_id)
    if stream is None:
        raise ConflictError("Only a batch created with \"input\": \"stream\" can be sealed.",
                            param="batch_id")
    if params is not None and params.total is not None:
        await ledger.expect(batch_id, params.total)
        for delivery in await close_if_complete(ledger, ctx.producer, ctx.topics, batch_id):
            await delivery
    else:
        headers: dict[str, str | bytes | None] = {CONTROL_HEADER: b"seal"}
        if "token" in stream:
            headers[INGEST_TOKEN_HEADER] = stream["token"].encode()
        await ctx.producer.send(ctx.topics.ingest, batch_id, b"", headers=headers)
    return batch


@router.get("", response_model=ListPage)
async def list_batches(
    ctx: Ctx, who: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> ListPage:
    data = await ctx.store.list_batches(who.project, after=after, limit=limit + 1)
    return ListPage.of(data[:limit], has_more=len(data) > limit)
