"""`/v1/batches`: create, retrieve, list."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from gateway.auth import Caller
from gateway.context import Ctx
from gateway.ingest import ingest
from millrace.errors import InvalidRequestError, NotFoundError
from millrace.protocol import Batch, ListPage
from millrace.records import BatchCreated
from millrace.status import BatchStatus

router = APIRouter(prefix="/v1/batches", tags=["batches"])

# /v1/embeddings arrives with the pooling runner (issue 3); until then it is refused.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOWS = {"24h": 24 * 3600}


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None)


@router.post("", response_model=Batch)
async def create(ctx: Ctx, who: Caller, params: CreateBatch) -> Batch:
    if params.endpoint not in ENDPOINTS:
        raise InvalidRequestError(
            f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint",
            code="invalid_value",
        )
    if params.completion_window not in WINDOWS:
        raise InvalidRequestError(
            "completion_window must be '24h'", param="completion_window", code="invalid_value"
        )
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
    now = int(time.time())
    batch = Batch(
        id="batch_" + secrets.token_hex(12),
        endpoint=params.endpoint,
        input_file_id=params.input_file_id,
        completion_window=params.completion_window,
        status=BatchStatus.VALIDATING,
        created_at=now,
        expires_at=now + WINDOWS[params.completion_window],
        metadata=params.metadata,
    )
    await ctx.store.create_batch(batch, who.project)
    created = BatchCreated(
        batch_id=batch.id, project=who.project, batch=batch.model_dump(mode="json")
    )
    await ctx.producer.send(ctx.topics.batch_events, batch.id, created.dumps())
    task = asyncio.create_task(ingest(ctx, batch, who.project, source.path))
    ctx.tasks.add(task)
    task.add_done_callback(ctx.tasks.discard)
    return batch


@router.get("/{batch_id}", response_model=Batch)
async def retrieve(ctx: Ctx, who: Caller, batch_id: str) -> Batch:
    batch = await ctx.store.get_batch(batch_id, who.project)
    if batch is None:
        raise NotFoundError(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


@router.get("", response_model=ListPage)
async def list_batches(
    ctx: Ctx, who: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> ListPage:
    data = await ctx.store.list_batches(who.project, limit + 1)
    page = data[:limit]
    return ListPage.of(page, has_more=len(data) > limit)
