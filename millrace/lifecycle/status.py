"""Batch status and the only legal transitions between statuses (OpenAI's machine)."""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


S = BatchStatus
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLING, S.EXPIRED}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.EXPIRED, S.CANCELLING}),
    S.FINALIZING: frozenset({S.COMPLETED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.FAILED: frozenset(),
    S.COMPLETED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}

# The Batch object field stamped when a batch enters each status.
TIMESTAMP_FIELD: dict[BatchStatus, str] = {
    S.IN_PROGRESS: "in_progress_at",
    S.FINALIZING: "finalizing_at",
    S.COMPLETED: "completed_at",
    S.FAILED: "failed_at",
    S.EXPIRED: "expired_at",
    S.CANCELLING: "cancelling_at",
    S.CANCELLED: "cancelled_at",
}


def can_transition(current: BatchStatus, new: BatchStatus) -> bool:
    return new in TRANSITIONS[current]


def job_status(status: BatchStatus) -> str:
    """PromptLoop's three job statuses: a batch still moving is `in_progress`, a completed
    one `completed`, and one that failed, expired or was cancelled `failed` (its rows that
    ran are still in its results)."""
    if not status.terminal:
        return "in_progress"
    return "completed" if status is BatchStatus.COMPLETED else "failed"
