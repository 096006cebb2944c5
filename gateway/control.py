"""What changes a running batch, whichever surface asks: cancelling one, and sweeping the
stuck ones (`/admin/batches/sweep`, PLai's `check-status`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict
from typing import Any, Literal

from confluent_kafka import KafkaException
from pydantic import BaseModel, ConfigDict, Field

from gateway.context import Context
from millrace.errors import ConflictError, ServiceUnavailableError
from millrace.filestore import FileStore
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch
from millrace.records import BatchCancelRequested
from millrace.recovery import sweep
from millrace.result_files import final_key, partial_dir


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


async def delete(ctx: Context, project: str, batch: Batch) -> list[str]:
    """Delete a batch in a final status with its files (its input file unless another of
    the project's batches uses it); returns the ids of the files deleted. Its state's
    tombstone on the compacted batch-state topic keeps `millrace rebuild` from bringing it
    back; the read model keeps a tombstone that fences the aggregator off it."""
    if not batch.status.terminal:
        raise ConflictError(
            f"Cannot delete a batch with status '{batch.status.value}': only a batch that "
            f"has ended (completed, failed, expired, cancelled) can be deleted. Cancel it "
            f"first.", param="batch_id", code="batch_not_finished")
    files = [f for f in (batch.output_file_id, batch.error_file_id) if f]
    if batch.input_file_id and await ctx.store.batches_using(
            project, batch.input_file_id) == [batch.id]:
        files.append(batch.input_file_id)
    # the tombstone first: without the broker nothing is deleted (503, try again)
    try:
        await ctx.producer.send(ctx.topics.batch_state, batch.id, None)
    except KafkaException as exc:
        raise ServiceUnavailableError(
            "millrace cannot reach its broker right now; the batch was not deleted, try "
            "again shortly.") from exc
    await ctx.store.delete_batch(batch.id, project)
    deleted = []
    for file_id in files:
        found = await ctx.store.get_file(file_id, project)
        if found is None:
            continue  # deleted already, or expired
        await ctx.registry.delete_file(file_id, project)
        await asyncio.to_thread(_remove, ctx.files, found.path)
        deleted.append(file_id)
    await asyncio.to_thread(_remove_results, ctx.files, batch.id)
    return deleted


def _remove(files: FileStore, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        files.delete(path)


def _remove_results(files: FileStore, batch_id: str) -> None:
    """The final files' folder and the partial results' segments."""
    files.delete_tree(partial_dir(batch_id))
    files.delete_tree(final_key(batch_id, "output").rpartition("/")[0])


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
