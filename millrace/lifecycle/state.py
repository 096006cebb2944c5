"""A batch's status machine: pure decisions, no I/O, so every rule is tested directly.

Invariants:
- Only legal transitions (`millrace/lifecycle/status.py`) happen, each stamped and published once.
- Counts come from the sink (`progress`, then `files_ready`), which counts the lines its
  files hold; they never decrease, and a final batch's counts and usage are its files'.
- Every event may be applied twice (a crash replays what was not committed): applying one
  again changes nothing and emits nothing new, except that an event emitted just before a
  crash may be emitted again (subscribers and the sink treat repeats as no-ops).
- Every non-final status has a way out: `validating`/`in_progress` by the window
  (`expire_due`), `cancelling`/`expired` by a fill request (every line without a result
  gets an error line), after which the sink writes the files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from millrace.lifecycle.status import TIMESTAMP_FIELD, BatchStatus, can_transition
from millrace.protocol import Batch, BatchError
from millrace.records import (
    BatchCancelRequested,
    BatchCreated,
    BatchEvent,
    BatchExpireDue,
    BatchFilesReady,
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchOpened,
    BatchProgress,
    BatchTransition,
    BatchValidated,
    BatchValidationFailed,
    WebhookTarget,
    now,
    parse_event,
)
from millrace.storage.store import RestoredBatch, StoredBatch, Version

S = BatchStatus
Emitted = BatchTransition | BatchFillRequested | BatchFinished

STREAM_INPUT = "stream"  # input_file_id of a batch fed from the ingest topic
# status a batch entered → the error code of its lines without a result
FILL_CODES = {S.CANCELLING: "batch_cancelled", S.EXPIRED: "batch_expired"}
# what files_ready completes
AFTER_FILES = {S.FINALIZING: S.COMPLETED, S.CANCELLING: S.CANCELLED}


class BatchState(BaseModel):
    batch_id: str
    project: str = ""
    status: BatchStatus = S.VALIDATING
    total: int | None = None
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    input_file_id: str | None = None
    expires_at: int | None = None
    output_expires_after_s: int | None = None
    timestamps: dict[str, int] = Field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    files_ready: bool = False
    errors: list[BatchError] | None = None
    fill: str | None = None  # the fill code requested, once
    finished: bool = False  # `finished` published
    updated_at: float | None = None  # when the aggregator last saved a change (unix s)
    # The gateway's half of the Batch object, as created: the read model can be restored
    # from this state if Redis loses it, and the final Batch travels in `finished`.
    doc: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None
    listed_at: float | None = None
    input_url: str | None = None  # where the explode fetches the input file from
    # the state's version: the batch-events offset of the last event applied, on the broker
    # of this cluster id (a new embedded broker starts its offsets again). An aggregator
    # that froze and woke up with an older view can neither apply old events again nor
    # save over a newer state (`Store.save_aggregate`).
    epoch: str = ""
    offset: int = -1

    @classmethod
    def restored(cls, batch_id: str, stored: StoredBatch) -> BatchState | None:
        """A batch's state as Redis keeps it: the aggregator's own; else, if its `created`
        never reached the aggregator (lost with a broker), that event as the gateway kept
        it — webhook target and output expiry included; else its Batch document."""
        if stored.agg:
            return cls.model_validate_json(stored.agg)
        if stored.created is not None:
            event = parse_event(stored.created)
            if isinstance(event, BatchCreated):
                state = cls(batch_id=batch_id)
                state.apply(event)
                return state
        if stored.doc is not None and stored.project is not None:
            return cls.from_doc(batch_id, stored.doc, stored.project)
        return None

    @classmethod
    def from_doc(cls, batch_id: str, doc: dict[str, Any], project: str) -> BatchState:
        """The state of a batch known only from its read-model document (its `created`
        event was lost): enough to expire, cancel, fill and finish it."""
        state = cls(batch_id=batch_id)
        state._created(project, doc, None, None, float(doc.get("created_at") or now()))
        return state

    def applied(self, epoch: str, offset: int) -> bool:
        """The event at `offset` of this broker is already in this state."""
        return self.epoch == epoch and offset <= self.offset

    def newer(self, version: Version) -> bool:
        """A stored version is past what this state has seen."""
        if version.final and not self.status.terminal:
            return True
        return version.epoch == self.epoch and version.offset > self.offset

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def deadline(self) -> int | None:
        """When the window closes, while the batch can still expire."""
        expirable = self.status in (S.VALIDATING, S.IN_PROGRESS)
        return self.expires_at if expirable else None

    def due(self, at: float) -> bool:
        return self.deadline is not None and self.deadline <= at

    # --- events ----------------------------------------------------------------------
    def apply(self, event: BatchEvent) -> list[Emitted]:
        """Apply one event from the gateway, the sink or the aggregator's timer;
        transitions, fill/redrive requests and `finished` are not ours to apply."""
        handler = HANDLERS.get(event.type)
        return handler(self, event) if handler is not None else []

    def _on_created(self, event: BatchCreated) -> list[Emitted]:
        self._created(event.project, event.batch, event.webhook, event.output_expires_after_s,
                      event.listed_at if event.listed_at is not None else event.at)
        self.input_url = event.input_url
        return []

    def _on_opened(self, event: BatchOpened) -> list[Emitted]:
        return self._move(S.IN_PROGRESS, event.at) if self.status is S.VALIDATING else []

    def _on_progress(self, event: BatchProgress) -> list[Emitted]:
        if event.done >= self.done and not self.files_ready:
            self._count(event)
        return self._counted(event.at)

    def _count(self, event: BatchProgress | BatchFilesReady) -> None:
        """The sink's counts and usage: what the files hold (so far)."""
        self.completed, self.failed = event.completed, event.failed
        self.input_tokens, self.output_tokens = event.input_tokens, event.output_tokens
        self.cached_tokens, self.reasoning_tokens = event.cached_tokens, event.reasoning_tokens

    def _on_filled(self, event: BatchFilled) -> list[Emitted]:
        if self.total is None:
            self.total = event.total
        return self._counted(event.at)

    def _on_cancel(self, event: BatchCancelRequested) -> list[Emitted]:
        if self.status not in (S.VALIDATING, S.IN_PROGRESS):
            return []
        return self._move(S.CANCELLING, event.at) + self._fill_if_due()

    def _on_expire_due(self, event: BatchExpireDue) -> list[Emitted]:
        if not self.due(event.at):
            return []
        return self._move(S.EXPIRED, event.at) + self._fill_if_due()

    def _created(self, project: str, doc: dict[str, Any], webhook: dict[str, Any] | None,
                 output_expires_after_s: int | None, listed_at: float) -> None:
        self.project = project
        self.input_file_id = doc.get("input_file_id")
        self.expires_at = doc.get("expires_at")
        self.output_expires_after_s = output_expires_after_s
        self.doc = doc
        self.webhook = webhook
        self.listed_at = listed_at

    def _on_validated(self, event: BatchValidated) -> list[Emitted]:
        self.total = event.total
        self.model = event.model or self.model
        emitted = self._move(S.IN_PROGRESS, event.at) if self.status is S.VALIDATING else []
        return emitted + self._fill_if_due() + self._counted(event.at)

    def _on_validation_failed(self, event: BatchValidationFailed) -> list[Emitted]:
        self.errors = event.errors
        if self.status is S.CANCELLING:  # nothing was enqueued: done
            return self._move(S.CANCELLED, event.at) + self._finish()
        if self.status is S.VALIDATING:
            return self._move(S.FAILED, event.at) + self._finish()
        if self.status is S.EXPIRED:  # expired while validating; nothing ran
            return self._finish()
        return []

    def _counted(self, at: int) -> list[Emitted]:
        """Once every line has a result, a running batch is finalizing (files next)."""
        if self.status is S.IN_PROGRESS and self.total is not None and self.done >= self.total:
            return self._move(S.FINALIZING, at)
        return []

    def _on_files_ready(self, event: BatchFilesReady) -> list[Emitted]:
        if self.files_ready or (self.status.terminal and self.status is not S.EXPIRED):
            return []
        self.files_ready = True
        self.output_file_id, self.error_file_id = event.output_file_id, event.error_file_id
        self._count(event)
        self.total = self.total if self.total is not None else event.lines
        emitted = self._move(S.FINALIZING, event.at) if self.status is S.IN_PROGRESS else []
        target = AFTER_FILES.get(self.status)
        if target is not None:
            emitted += self._move(target, event.at)
        return emitted + self._finish()

    # --- what the state emits -----------------------------------------------------------
    def _move(self, to: BatchStatus, at: int | None = None) -> list[Emitted]:
        if not can_transition(self.status, to):
            return []
        event = BatchTransition(
            batch_id=self.batch_id, project=self.project, from_status=self.status,
            to_status=to, total=self.total or 0, completed=self.completed, failed=self.failed,
            at=at or now())
        self.status = to
        self.timestamps[TIMESTAMP_FIELD[to]] = event.at
        return [event]

    def _fill_if_due(self) -> list[Emitted]:
        """A cancelled or expired batch's lines without a result get error lines; a file
        batch once its lines are known (validated), a stream batch at once (the fill
        closes it)."""
        code = FILL_CODES.get(self.status)
        known = self.total is not None or self.input_file_id == STREAM_INPUT
        if code is None or self.fill is not None or not known:
            return []
        self.fill = code
        return [BatchFillRequested(batch_id=self.batch_id, project=self.project, code=code,
                                   input_file_id=self.input_file_id)]

    def _finish(self) -> list[Emitted]:
        """`finished`, once."""
        if self.finished or not self.status.terminal:
            return []
        self.finished = True
        return [self.finished_event()]

    def finished_event(self, at: int | None = None) -> BatchFinished:
        """The final Batch object, with the batch's own webhook target (the aggregator adds
        the project's endpoints)."""
        own = [WebhookTarget(url=str(self.webhook["url"]), source="batch",
                             format=self.webhook.get("format") or "openai")] if (
            self.webhook and self.webhook.get("url")) else []
        batch = self.batch()
        return BatchFinished(batch_id=self.batch_id, project=self.project, status=self.status,
                             batch=batch.model_dump(mode="json") if batch else {},
                             webhooks=own, at=at or now())

    # --- the read model -------------------------------------------------------------------
    def batch(self) -> Batch | None:
        """The Batch object as the gateway serves it (None before `created` is known)."""
        if self.doc is None:
            return None
        return Batch.model_validate({**self.doc, **self.batch_fields()})

    def restorable(self) -> RestoredBatch | None:
        """The gateway's half, for putting the batch back into a lost read model."""
        if self.doc is None or self.listed_at is None:
            return None
        return RestoredBatch(self.project, self.doc, self.listed_at)

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
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
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


# event type → what it does to a batch (the aggregator's readers in `EVENT_FLOW`)
HANDLERS: dict[str, Callable[[BatchState, Any], list[Emitted]]] = {
    "created": BatchState._on_created,
    "opened": BatchState._on_opened,
    "validated": BatchState._on_validated,
    "validation_failed": BatchState._on_validation_failed,
    "progress": BatchState._on_progress,
    "filled": BatchState._on_filled,
    "cancel_requested": BatchState._on_cancel,
    "expire_due": BatchState._on_expire_due,
    "files_ready": BatchState._on_files_ready,
}
