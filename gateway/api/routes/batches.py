"""`/v1/batches`: create, retrieve, list, cancel, and the dry-run validator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from gateway.api.auth import Caller
from gateway.api.deps import owned_batch
from gateway.context import Context, Ctx
from gateway.control import cancel as cancel_batch
from gateway.control import delete as delete_batch
from gateway.estimate import Counted, count
from gateway.ingest import close_if_complete
from gateway.intake import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    CreateBatch,
    check_webhook,
    create_batch,
    from_url,
    inline_file,
    open_stream,
    served_endpoint,
    window_seconds,
    with_priority,
)
from gateway.lines import rules
from gateway.validation import validate
from gateway.worker_board import ServedNames
from millrace.errors import APIError, ConflictError, InvalidRequestError, NotFoundError
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import CHAT, Batch, BatchError, BatchEstimate, ListPage
from millrace.records import CONTROL_HEADER, INGEST_TOKEN_HEADER
from millrace.storage.ledger import StreamLedger
from millrace.storage.principals import Principal

router = APIRouter(prefix="/v1/batches", tags=["batches"])

@router.post("", response_model=Batch)
async def create(ctx: Ctx, who: Caller, params: CreateBatch,
                 request: Request) -> Batch | JSONResponse:
    """Create a batch. A stream batch's answer also holds its `ingest_token`, which every
    message written into it must carry (header `millrace-ingest-token`): given once, here."""
    served_endpoint(ctx, params.endpoint)
    window = window_seconds(params.completion_window, ctx.settings)
    params = with_priority(who, params)
    await check_webhook(ctx, params)
    if params.requests is not None:
        return await from_requests(ctx, who, params, window, request, params.requests)
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
    return await from_file(ctx, who, params, window, request, params.input_file_id)


async def from_file(ctx: Context, who: Principal, params: CreateBatch, window: int,
                    request: Request, input_file_id: str) -> Batch:
    source = await ctx.store.get_file(input_file_id, who.project)
    if source is None:
        raise NotFoundError(f"No such File object: {input_file_id}", param="input_file_id")
    if source.obj.purpose != "batch":
        raise InvalidRequestError(
            "The input file must be uploaded with purpose 'batch'.", param="input_file_id",
            code="invalid_file_purpose",
        )
    # refused here, before anything is stored, if it cannot finish in its window or its
    # project has too many tokens enqueued (`gateway/estimate.py`)
    admitted = await ctx.admission.admit(
        who, input_file_id, source.path, params.endpoint,
        params.queue_priority, window, params.completion_window)
    if admitted is not None and admitted.budget is not None:
        request.state.token_budget = admitted.budget  # x-ratelimit-*-tokens
    # a gateway's jobs consumer validates and enqueues it when `created` arrives
    return await create_batch(ctx, who.project, params, window, input_file_id,
                              BatchStatus.VALIDATING, admitted=admitted)


async def from_requests(ctx: Context, who: Principal, params: CreateBatch, window: int,
                        request: Request, requests: list[dict[str, Any]]) -> Batch:
    """An inline batch: its `requests` become its input file, and it goes on as a batch of
    that file (refused by admission: the file goes again)."""
    if params.input_file_id is not None or params.input_file_url is not None or (
            params.input == "stream"):
        raise InvalidRequestError("Give requests, input_file_id, input_file_url or "
                                  "\"input\": \"stream\" — one of them.", param="requests",
                                  code="invalid_value")
    made = await inline_file(ctx, who.project, requests)
    inline = params.model_copy(update={"requests": None, "input_file_id": made.id})
    try:
        return await from_file(ctx, who, inline, window, request, made.id)
    except APIError:
        found = await ctx.store.get_file(made.id, who.project)
        await ctx.registry.delete_file(made.id, who.project)
        if found is not None:
            await asyncio.to_thread(ctx.files.delete, found.path)
        raise


class ValidateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str = CHAT
    # the priority the batch would be created with (none: the key's default): the
    # estimate counts the queue ahead
    priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY)


class ValidationResult(BaseModel):
    valid: bool
    total: int
    errors: list[BatchError]
    # what this deployment serves: each model name a line may give → its endpoints
    served: dict[str, list[str]] = Field(default_factory=dict)
    # what admission at create would find (None: admission is off, or no valid line)
    estimate: BatchEstimate | None = None


@router.post("/validate", response_model=ValidationResult)
async def dry_run(ctx: Ctx, who: Caller, request: Request) -> ValidationResult:
    """PromptLoop-style `validate-data`: every check of create, nothing created, and the
    `estimate` admission at create would make (at `priority`).

    Takes JSON `{input_file_id, endpoint, priority}` or a multipart upload (`file`,
    `endpoint`, `priority`).
    """
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload, given = form.get("file"), form.get("endpoint") or CHAT
        if not isinstance(upload, UploadFile) or not isinstance(given, str):
            raise InvalidRequestError("multipart validation needs 'file' and a valid "
                                      "'endpoint'", param="file")
        endpoint, priority = given, _form_priority(form.get("priority"), who.default_priority)
        content = upload.file

        def lines() -> Iterator[bytes]:
            content.seek(0)
            return (line.rstrip(b"\r\n") for line in content)

        def counted() -> Awaitable[Counted]:
            return asyncio.to_thread(count, lines(), endpoint, ctx.admission.tokenizers,
                                     ctx.settings.default_max_tokens)
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
        endpoint, path = params.endpoint, source.path
        priority = who.default_priority if params.priority is None else params.priority

        def lines() -> Iterator[bytes]:
            return ctx.files.iter_lines(path)

        def counted() -> Awaitable[Counted]:
            return ctx.admission.counted(params.input_file_id, path, endpoint)
    served_endpoint(ctx, endpoint)
    report = await asyncio.to_thread(validate, lines(), rules(ctx.settings, endpoint, ctx.board))
    estimate = None
    if ctx.settings.admission != "off" and report.model is not None:
        estimate = await ctx.admission.estimate(await counted(), priority)
    return ValidationResult(valid=not report.errors, total=report.total, errors=report.errors,
                            served=served(ctx), estimate=estimate)


def _form_priority(given: object, default: int) -> int:
    try:
        priority = int(str(given)) if given else default
    except ValueError:
        priority = MAX_PRIORITY + 1
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidRequestError(
            f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}",
            param="priority", code="invalid_value")
    return priority


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
    return await cancel_batch(ctx, await owned_batch(ctx, who, batch_id))


class DeletedBatch(BaseModel):
    id: str
    object: Literal["batch.deleted"] = "batch.deleted"
    deleted: bool = True
    # the files that went with it (its input file stays while another batch uses it)
    deleted_files: list[str]


@router.delete("/{batch_id}", response_model=DeletedBatch)
async def delete(ctx: Ctx, who: Caller, batch_id: str) -> DeletedBatch:
    """Delete a batch that has ended, with its output and error files and its input file
    (unless another batch uses it), as Anthropic, Gemini and Doubleword can (an
    extension: OpenAI's files are deleted one by one). 409 while it runs."""
    batch = await owned_batch(ctx, who, batch_id)
    files = await delete_batch(ctx, who.project, batch)
    return DeletedBatch(id=batch.id, deleted_files=files)


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
