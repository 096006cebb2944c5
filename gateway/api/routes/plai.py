"""PLai's batch API (seed 001) under `/plai/batches`: a PLai client changes only its base URL.

A PLai batch is a `/v1` batch whose input file is fetched from `input_file_url` (through the
outbound guard, into the file store, by the gateway's explode) and whose webhook goes to
`callback_url` (Standard Webhooks signed, `batch.completed` / `failed` / `expired` /
`cancelled`). Its object is the Batch object with PLai's fields beside OpenAI's; `created_at`
and `updated_at` are ISO 8601 there, as PLai writes them.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.auth import Admin, Caller
from gateway.api.deps import owned_batch
from gateway.context import Ctx
from gateway.control import SweepReport, sweep_batches
from gateway.intake import CreateBatch, check_webhook, from_url, window_seconds
from gateway.outputs import download_url, processing_errors
from millrace.errors import ConflictError
from millrace.protocol import Batch

router = APIRouter(prefix="/plai/batches", tags=["plai"])

ENDPOINT_OF_TYPE = {"COMPLETIONS": "/v1/chat/completions", "EMBEDDINGS": "/v1/embeddings"}


class PlaiCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=2000)
    type: Literal["COMPLETIONS", "EMBEDDINGS"]
    input_file_url: str = Field(max_length=2048)
    callback_url: str = Field(max_length=2048)
    # millrace: COMPLETIONS lines may be legacy completions instead of chat
    endpoint: Literal["/v1/chat/completions", "/v1/completions"] | None = None
    completion_window: str = "24h"


def iso(ts: int | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


def plai_object(batch: Batch, ext: dict[str, Any]) -> dict[str, Any]:
    """PLai's fields, then every OpenAI field (PLai's ISO `created_at` wins the name)."""
    stamps = [batch.created_at, batch.in_progress_at, batch.finalizing_at, batch.completed_at,
              batch.failed_at, batch.expired_at, batch.cancelling_at, batch.cancelled_at]
    return {
        **batch.model_dump(mode="json"),
        "name": ext.get("name"), "description": ext.get("description"),
        "type": ext.get("type") or ("EMBEDDINGS" if batch.endpoint == "/v1/embeddings"
                                    else "COMPLETIONS"),
        "input_file_url": ext.get("input_file_url"), "callback_url": ext.get("callback_url"),
        "output_available": batch.output_file_id is not None,
        "errors_available": batch.error_file_id is not None,
        "created_at": iso(batch.created_at),
        "updated_at": iso(max(s for s in stamps if s)),
    }


@router.post("")
async def create(ctx: Ctx, who: Caller, params: PlaiCreate) -> dict[str, Any]:
    """The batch, `validating` while its input file is fetched and checked."""
    endpoint = ENDPOINT_OF_TYPE[params.type]
    if params.endpoint is not None and params.type == "COMPLETIONS":
        endpoint = params.endpoint
    batch_params = CreateBatch(endpoint=endpoint, completion_window=params.completion_window,
                               webhook_url=params.callback_url)
    window = window_seconds(params.completion_window, ctx.settings)
    await check_webhook(ctx, batch_params)
    ext = {"surface": "plai", "name": params.name, "description": params.description,
           "type": params.type, "input_file_url": params.input_file_url,
           "callback_url": params.callback_url}
    batch = await from_url(ctx, who.project, batch_params, window, params.input_file_url, ext)
    return plai_object(batch, ext)


@router.get("")
async def list_batches(ctx: Ctx, who: Caller,
                       skip: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                       take: Annotated[int, Query(ge=1, le=100)] = 100,
                       order: Literal["asc", "desc"] = "desc") -> list[dict[str, Any]]:
    """The project's batches, `take` of them after the first `skip` (newest first unless
    `order=asc`)."""
    ids = await ctx.store.batch_ids_at(who.project, skip, take, newest_first=order == "desc")
    found = []
    for batch_id in ids:
        batch = await ctx.store.get_batch(batch_id, who.project)
        if batch is not None:
            found.append(plai_object(batch, await ctx.store.get_ext(batch_id)))
    return found


@router.post("/check-status", response_model=SweepReport)
async def check_status(ctx: Ctx, who: Admin, request: Request) -> SweepReport:
    """PLai's administrative sweep: every unfinished batch checked, stuck ones moved on."""
    return await sweep_batches(ctx)


@router.get("/{batch_id}")
async def retrieve(ctx: Ctx, who: Caller, batch_id: str) -> dict[str, Any]:
    """The batch with its error details: why validation failed, and the processing errors
    by code with the first few lines."""
    batch = await owned_batch(ctx, who, batch_id)
    ext = await ctx.store.get_ext(batch_id)
    summary = ext.get("processing_errors")
    if summary is None:
        summary = await asyncio.to_thread(processing_errors, ctx.files, batch)
        if batch.settled:  # its error file will not change: read it once, not per poll
            await ctx.store.put_ext(batch_id, {**ext, "processing_errors": summary})
    found = plai_object(batch, ext)
    found["error_details"] = {
        "validation_errors": [e.model_dump() for e in batch.errors.data] if batch.errors
        else [],
        "processing_errors": summary,
    }
    return found


class Download(BaseModel):
    output_file_url: str | None
    errors_file_url: str | None
    expires_at: int


@router.get("/{batch_id}/download", response_model=Download)
async def download(ctx: Ctx, who: Caller, batch_id: str) -> Download:
    """Pre-signed URLs of the output and error files (null when there is none), working
    without an API key until `expires_at`."""
    batch = await owned_batch(ctx, who, batch_id)
    if not batch.settled:
        raise ConflictError(f"Batch {batch_id} is still {batch.status.value}: its files come "
                            "when it has finished.", param="batch_id", code="batch_not_finished")
    urls: dict[str, str | None] = {}
    expires_at = int(time.time()) + ctx.settings.signed_url_ttl_s  # with no file at all
    for name, file_id in (("output_file_url", batch.output_file_id),
                          ("errors_file_url", batch.error_file_id)):
        stored = await ctx.store.get_file(file_id, who.project) if file_id else None
        signed = await asyncio.to_thread(download_url, ctx.settings, ctx.files, stored.obj.id,
                                         stored.path) if stored else None
        urls[name] = signed.url if signed else None
        expires_at = min(expires_at, signed.expires_at) if signed else expires_at
    return Download(**urls, expires_at=expires_at)

