"""Per-batch aggregate state and the pure functions that advance it.

Kept free of Faust and I/O so the status machine and counting rules are tested directly.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from millrace.protocol import BatchError
from millrace.records import (
    BatchCancelRequested,
    BatchCreated,
    BatchEvent,
    BatchExpireDue,
    BatchFilesReady,
    BatchOpened,
    BatchSealRequested,
    BatchTransition,
    BatchValidated,
    BatchValidationFailed,
    ResponseOutcome,
    now,
)
from millrace.status import TIMESTAMP_FIELD, BatchStatus, can_transition
from millrace.store import RestoredBatch

Emitted = BatchTransition | BatchSealRequested


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
    input_file_id: str | None = None
    expires_at: int | None = None
    output_expires_after_s: int | None = None
    seal_requested: bool = False
    timestamps: dict[str, int] = Field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[BatchError] | None = None
    # Which lines are counted, saved in the same table record as the counts they produced,
    # so a replayed response is recognised whatever crashed when: a bitmap over input line
    # numbers (base64), and custom_ids of responses that carry no line number.
    counted: str = ""
    counted_ids: list[str] = Field(default_factory=list)
    # The gateway's half of the Batch object, as created, kept so that the read model can
    # be restored from this table's changelog if Redis is lost (`millrace rebuild`).
    doc: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None
    listed_at: float | None = None

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

    def _moved(self, to: BatchStatus, at: int | None = None) -> list[Emitted]:
        event = self.transition(to, at)
        return [event] if event else []

    def advance(self) -> list[Emitted]:
        """Once every line has a result: in_progress → finalizing, and ask the sink to seal
        (a cancelling batch stays cancelling until its files are sealed)."""
        if self.total is None or self.done < self.total or self.seal_requested:
            return []
        if self.status not in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            return []
        emitted = self._moved(BatchStatus.FINALIZING)
        return [*emitted, self._seal()]

    def _seal(self, fill: str | None = None) -> BatchSealRequested:
        self.seal_requested = True
        return BatchSealRequested(
            batch_id=self.batch_id, project=self.project, total=self.total or 0,
            done=self.done, input_file_id=self.input_file_id, fill=fill,
            output_expires_after_s=self.output_expires_after_s,
        )

    @property
    def due(self) -> bool:
        """Past its window and still running (the timer's question)."""
        return (
            self.status is BatchStatus.IN_PROGRESS
            and self.expires_at is not None
            and self.expires_at <= now()
        )

    def count_new(self, responses: Iterable[ResponseOutcome]) -> list[Emitted]:
        """Count each response whose line is not counted yet (redeliveries are skipped)."""
        bits = bytearray(base64.b64decode(self.counted))
        ids = set(self.counted_ids)
        emitted: list[Emitted] = []
        for response in responses:
            if response.line is None:
                if response.custom_id in ids:
                    continue
                ids.add(response.custom_id)
            else:
                byte, bit = divmod(response.line, 8)
                if byte >= len(bits):
                    bits.extend(bytes(byte + 1 - len(bits)))
                if bits[byte] >> bit & 1:
                    continue
                bits[byte] |= 1 << bit
            emitted += self.count(response)
        if self.status.terminal:
            bits, ids = bytearray(), set()  # nothing is counted any more: drop the index
        self.counted = base64.b64encode(bits).decode()
        self.counted_ids = sorted(ids)
        return emitted

    def count(self, response: ResponseOutcome) -> list[Emitted]:
        """Count one response; the caller guarantees each line is counted once."""
        if self.status.terminal:
            return []  # e.g. expired: its counts come from the files the sink sealed
        if response.ok:
            self.completed += 1
        else:
            self.failed += 1
        self.input_tokens += response.usage.prompt_tokens
        self.output_tokens += response.usage.completion_tokens
        return self.advance()

    def apply(self, event: BatchEvent) -> list[Emitted]:
        """Apply a lifecycle event from the gateway or the sink."""
        if isinstance(event, BatchCreated):
            self.project = event.project
            self.input_file_id = event.batch.get("input_file_id")
            self.expires_at = event.batch.get("expires_at")
            self.output_expires_after_s = event.output_expires_after_s
            self.doc = event.batch
            self.webhook = event.webhook
            self.listed_at = event.listed_at if event.listed_at is not None else event.at
            return []
        if isinstance(event, BatchExpireDue):
            if not self.due:
                return []
            return [*self._moved(BatchStatus.EXPIRED, event.at), self._seal("batch_expired")]
        if isinstance(event, BatchOpened):
            return self._moved(BatchStatus.IN_PROGRESS, event.at)
        if isinstance(event, BatchValidated):
            self.total = event.total
            self.model = event.model
            return self._moved(BatchStatus.IN_PROGRESS, event.at) + self.advance()
        if isinstance(event, BatchValidationFailed):
            self.errors = event.errors
            if self.status is BatchStatus.CANCELLING:  # nothing was enqueued: done
                return self._moved(BatchStatus.CANCELLED, event.at)
            return self._moved(BatchStatus.FAILED, event.at)
        if isinstance(event, BatchCancelRequested):
            return self._moved(BatchStatus.CANCELLING, event.at) + self.advance()
        if isinstance(event, BatchFilesReady):
            self.output_file_id = event.output_file_id
            self.error_file_id = event.error_file_id
            if self.status is BatchStatus.EXPIRED:
                self.completed, self.failed = event.completed, event.failed
            after_seal = {BatchStatus.FINALIZING: BatchStatus.COMPLETED,
                          BatchStatus.CANCELLING: BatchStatus.CANCELLED}
            target = after_seal.get(self.status)
            return self._moved(target, event.at) if target else []
        return []  # transitions and seal requests are our own output

    def restorable(self) -> RestoredBatch | None:
        """The gateway's half, for putting the batch back into a lost read model."""
        if self.doc is None or self.listed_at is None:
            return None
        return RestoredBatch(self.project, self.doc, self.listed_at, self.webhook)

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
