"""`POST /v1/batches/{id}/retry`: a new batch of a finished batch's failed lines.

The lines to run again are the ones in the batch's error file — lines the engine refused or
failed, and lines that never ran because the batch expired or was cancelled — or the subset
named by `custom_ids`. Their request lines are copied, unchanged and in input order, from
the original input file into a new input file, and the new batch runs like any other (same
endpoint and window, the original's metadata plus `retry_of`). The original is unchanged.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.auth import Caller
from gateway.api.deps import owned_batch
from gateway.context import Ctx
from gateway.intake import retry_failed
from millrace.protocol import Batch

router = APIRouter(prefix="/v1/batches", tags=["batches"])



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
    return await retry_failed(ctx, who.project, batch, params.custom_ids, params.webhook_url)
