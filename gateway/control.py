"""What changes a running batch, whichever surface asks: cancelling one, and sweeping the
stuck ones (`/admin/batches/sweep`, PLai's `check-status`)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.context import Context
from millrace.errors import ConflictError
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch
from millrace.records import BatchCancelRequested
from millrace.recovery import sweep


async def cancel(ctx: Context, batch: Batch) -> Batch:
    """Ask for `batch` to be cancelled; answered as OpenAI does, already `cancelling` (the
    aggregator applies it, and closes an open stream batch as it stands)."""
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        return batch
    if batch.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        raise ConflictError(f"Cannot cancel a batch with status '{batch.status.value}'.",
                            param="batch_id")
    event = BatchCancelRequested(batch_id=batch.id)
    await ctx.send(batch.id, event)
    return batch.model_copy(update={"status": BatchStatus.CANCELLING,
                                    "cancelling_at": event.at})


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a batch that has not changed for this long is moved again (lines without a result
    # enqueued again or filled, a stalled explode restarted); past its window, it expires
    stuck_after_s: float = Field(default=600.0, ge=0)
    dry_run: bool = False


class SweepReport(BaseModel):
    object: Literal["list"] = "list"
    dry_run: bool
    data: list[dict[str, Any]]
    acted: int


async def sweep_batches(ctx: Context, params: Sweep | None = None) -> SweepReport:
    """Every batch not yet finished, with what was done to the stuck ones; nothing it does
    can count a line twice (each step is idempotent)."""
    params = params or Sweep()
    found = await sweep(ctx.store, ctx.producer, ctx.topics, now=time.time(),
                        stuck_after_s=params.stuck_after_s, dry_run=params.dry_run)
    return SweepReport(dry_run=params.dry_run, data=[asdict(s) for s in found],
                       acted=sum(1 for s in found if s.action))
