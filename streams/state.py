"""Per-batch aggregate state and the pure functions that advance it.

Kept free of Faust and I/O so the status machine and counting rules are tested directly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from millrace.protocol import BatchError
from millrace.records import (
    BatchCreated,
    BatchEvent,
    BatchFilesReady,
    BatchTransition,
    BatchValidated,
    BatchValidationFailed,
    ResponseRecord,
    now,
)
from millrace.status import TIMESTAMP_FIELD, BatchStatus, can_transition


class BatchState(BaseModel):
    batch_id: str
    project: str = ""
    status: BatchStatus = BatchStatus.VALIDATING
    total: int | None = None
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    timestamps: dict[str, int] = Field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[BatchError] | None = None

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def transition(self, to: BatchStatus, at: int | None = None) -> BatchTransition | None:
        """Move to `to` if legal; the returned event is what gets published."""
        if not can_transition(self.status, to):
            return None
        event = BatchTransition(
            batch_id=self.batch_id, project=self.project, from_status=self.status,
            to_status=to, total=self.total or 0, completed=self.completed, failed=self.failed,
        )
        self.status = to
        self.timestamps[TIMESTAMP_FIELD[to]] = at or now()
        return event

    def advance(self) -> list[BatchTransition]:
        """in_progress → finalizing once every line has a result."""
        if (
            self.status is BatchStatus.IN_PROGRESS
            and self.total is not None
            and self.done >= self.total
        ):
            event = self.transition(BatchStatus.FINALIZING)
            return [event] if event else []
        return []

    def count(self, response: ResponseRecord) -> list[BatchTransition]:
        """Count one response; the caller guarantees each custom_id is counted once."""
        if response.ok:
            self.completed += 1
        else:
            self.failed += 1
        self.input_tokens += response.usage.prompt_tokens
        self.output_tokens += response.usage.completion_tokens
        return self.advance()

    def apply(self, event: BatchEvent) -> list[BatchTransition]:
        """Apply a lifecycle event from the gateway or the sink."""
        if isinstance(event, BatchCreated):
            self.project = event.project
            return []
        if isinstance(event, BatchValidated):
            self.total = event.total
            self.model = event.model
            moved = self.transition(BatchStatus.IN_PROGRESS, event.at)
            return ([moved] if moved else []) + self.advance()
        if isinstance(event, BatchValidationFailed):
            self.errors = event.errors
            moved = self.transition(BatchStatus.FAILED, event.at)
            return [moved] if moved else []
        if isinstance(event, BatchFilesReady):
            self.output_file_id = event.output_file_id
            self.error_file_id = event.error_file_id
            moved = self.transition(BatchStatus.COMPLETED, event.at)
            return [moved] if moved else []
        return []  # transitions are our own output

    def batch_fields(self) -> dict[str, Any]:
        """The aggregator-owned half of the Batch object, as stored in Redis."""
        return {
            "status": self.status.value,
            "model": self.model,
            "request_counts": {
                "total": self.total or 0, "completed": self.completed, "failed": self.failed,
            },
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "errors": (
                {"object": "list", "data": [e.model_dump() for e in self.errors]}
                if self.errors else None
            ),
            **self.timestamps,
        }
