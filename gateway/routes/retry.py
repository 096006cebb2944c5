"""`POST /v1/batches/{id}/retry`: a new batch of a finished batch's failed lines.

The lines to run again are the ones in the batch's error file — lines the engine refused or
failed, and lines that never ran because the batch expired or was cancelled — or the subset
named by `custom_ids`. Their request lines are copied, unchanged and in input order, from
the original input file into a new input file, and the new batch runs like any other (same
endpoint and window, the original's metadata plus `retry_of`). The original is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import Caller
from gateway.context import Context, Ctx
from gateway.deps import owned_batch
from gateway.routes.batches import (
    STREAM_INPUT,
    CreateBatch,
    check_webhook,
    register,
    window_seconds,
)
from gateway.routes.files import new_file_id
from millrace.errors import ConflictError, InvalidRequestError
from millrace.protocol import Batch, FileObject
from millrace.status import BatchStatus

router = APIRouter(prefix="/v1/batches", tags=["batches"])

RETRYABLE = (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
MAX_METADATA = 16


class RetryBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # which of the failed lines to run again (default: all of them)
    custom_ids: list[Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, min_length=1, max_length=50_000)
    webhook_url: str | None = Field(default=None, max_length=2048)


@router.post("/{batch_id}/retry", response_model=Batch)
async def retry(ctx: Ctx, who: Caller, batch_id: str, params: RetryBatch | None = None
                ) -> Batch:
    params = params or RetryBatch()
    batch = await owned_batch(ctx, who, batch_id)
    if batch.status not in RETRYABLE:
        why = ("it failed validation, so none of its lines ran: fix the input file"
               if batch.status is BatchStatus.FAILED else "it has not finished")
        raise ConflictError(f"Cannot retry batch {batch_id}: {why}.", param="batch_id")
    if batch.input_file_id == STREAM_INPUT:
        raise ConflictError("A stream batch's lines are not kept after it ends: produce the "
                            "failed ones again to a new batch.", param="batch_id")
    failed = await failed_ids(ctx, who.project, batch)
    chosen = failed if params.custom_ids is None else set(params.custom_ids)
    if unknown := sorted(chosen - failed):
        raise InvalidRequestError(
            f"{len(unknown)} custom_ids are not failed lines of {batch_id} "
            f"(first: {unknown[0]!r}).", param="custom_ids", code="invalid_value")
    if not chosen:
        raise ConflictError(f"Batch {batch_id} has no failed lines to retry.",
                            param="batch_id")
    metadata = {**(batch.metadata or {}), "retry_of": batch.id}
    if len(metadata) > MAX_METADATA:
        raise InvalidRequestError(
            f"Batch {batch_id} has 16 metadata pairs: no room for retry_of.", param="metadata",
            code="invalid_value")
    create = CreateBatch(endpoint=batch.endpoint, completion_window=batch.completion_window,
                         metadata=metadata, webhook_url=params.webhook_url)
    await check_webhook(ctx, create)
    file_id = await copy_lines(ctx, who.project, batch, chosen)
    return await register(ctx, who.project, create, window_seconds(batch.completion_window),
                          file_id, BatchStatus.VALIDATING)


async def failed_ids(ctx: Context, project: str, batch: Batch) -> set[str]:
    """The custom_ids of the batch's error file."""
    if batch.error_file_id is None:
        return set()
    found = await ctx.store.get_file(batch.error_file_id, project)
    if found is None:
        raise ConflictError(f"The error file of {batch.id} is gone (expired or deleted).",
                            param="batch_id")
    return await asyncio.to_thread(
        lambda: {str(json.loads(line)["custom_id"]) for line in _lines(ctx, found.path)})


async def copy_lines(ctx: Context, project: str, batch: Batch, chosen: set[str]) -> str:
    """A new input file of the original's lines whose custom_id is chosen: its id."""
    source = await ctx.store.get_file(batch.input_file_id, project)
    if source is None:
        raise ConflictError(f"The input file of {batch.id} is gone (expired or deleted).",
                            param="batch_id")
    file_id = new_file_id()
    key = f"files/{file_id}"

    def write() -> int:
        with tempfile.TemporaryFile() as out:
            for line in _lines(ctx, source.path):
                if str(json.loads(line)["custom_id"]) in chosen:
                    out.write(line + b"\n")
            out.seek(0)
            size, _ = ctx.files.write_from(key, out)
        return size

    size = await asyncio.to_thread(write)
    await ctx.registry.put_file(FileObject(
        id=file_id, bytes=size, created_at=int(time.time()),
        filename=f"{batch.id}-retry.jsonl", purpose="batch"), project, key)
    return file_id


def _lines(ctx: Context, path: str) -> Iterator[bytes]:
    return (line for line in ctx.files.iter_lines(path) if line.strip())
