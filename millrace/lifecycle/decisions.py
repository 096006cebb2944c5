"""What moves a batch that a fault left behind: the events a resume publishes after Kafka
lost its data, and what a sweep publishes for a batch stuck past its window or idle too
long. Pure: `millrace/recovery.py` reads the states and publishes what these return."""

from __future__ import annotations

from millrace.lifecycle.state import FILL_CODES, STREAM_INPUT, BatchState
from millrace.lifecycle.status import BatchStatus
from millrace.records import (
    BatchCreated,
    BatchExpireDue,
    BatchFillRequested,
    BatchRedriveRequested,
    BatchValidated,
    Record,
)


def resume_events(state: BatchState) -> list[Record]:
    """What to publish so that an active batch carries on (pure: tested directly); a batch
    already final whose `finished` the sink never took gets it again (its webhooks)."""
    if state.doc is None:
        return []
    if state.finished:
        return [state.finished_event()]
    events: list[Record] = [BatchCreated(
        batch_id=state.batch_id, project=state.project, batch=state.doc,
        output_expires_after_s=state.output_expires_after_s, webhook=state.webhook,
        listed_at=state.listed_at, input_url=state.input_url)]
    if state.total is not None:
        events.append(BatchValidated(batch_id=state.batch_id, total=state.total,
                                     model=state.model))
    code = state.fill or FILL_CODES.get(state.status)
    stream = state.input_file_id == STREAM_INPUT
    if code is not None and (state.total is not None or stream):
        events.append(BatchFillRequested(batch_id=state.batch_id, project=state.project,
                                         code=code, input_file_id=state.input_file_id))
    elif stream and state.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING):
        events.append(BatchRedriveRequested(batch_id=state.batch_id, project=state.project,
                                            input_file_id=state.input_file_id))
    return events


def sweep_events(state: BatchState, now: float, stuck_after_s: float
                 ) -> tuple[str | None, list[Record]]:
    """What gets an active batch moving again (pure): past its window, it expires; idle
    for `stuck_after_s`, a final batch gets `finished` again, a cancelled or expired one a
    fill, a running or finalizing one a re-drive (the sink also announces written files
    again), a validating one its explode again."""
    if state.due(now):
        return "expire", [BatchExpireDue(batch_id=state.batch_id, at=int(now))]
    changed = state.updated_at or float((state.doc or {}).get("created_at") or now)
    if now - changed < stuck_after_s or state.doc is None:
        return None, []
    if state.finished:
        return "finish", [state.finished_event()]
    code = state.fill or FILL_CODES.get(state.status)
    if code is not None and (state.total is not None or state.input_file_id == STREAM_INPUT):
        return "fill", [BatchFillRequested(batch_id=state.batch_id, project=state.project,
                                           code=code, input_file_id=state.input_file_id)]
    if state.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING):
        return "redrive", [BatchRedriveRequested(batch_id=state.batch_id,
                                                 project=state.project,
                                                 input_file_id=state.input_file_id)]
    if state.status is BatchStatus.VALIDATING and state.input_file_id != STREAM_INPUT:
        return "explode", resume_events(state)[:1]  # its `created`
    return None, []
