"""Aggregate state: counting, transitions, and the Batch fields it owns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from millrace.protocol import Batch, BatchError
from millrace.records import (
    BatchCreated,
    BatchFilesReady,
    BatchValidated,
    BatchValidationFailed,
    ResponseRecord,
)
from millrace.status import BatchStatus
from streams.state import BatchState


def response(custom_id: str, status: int = 200) -> ResponseRecord:
    return ResponseRecord(batch_id="b", project="p", custom_id=custom_id, id="i",
                          request_id="r", status_code=status, body={})


def test_happy_path_reaches_completed() -> None:
    state = BatchState(batch_id="b")
    assert state.apply(BatchCreated(batch_id="b", project="p", batch={})) == []
    moved = state.apply(BatchValidated(batch_id="b", total=2))
    assert [t.to_status for t in moved] == [BatchStatus.IN_PROGRESS]
    assert state.count(response("a")) == []
    moved = state.count(response("b", 500))
    assert [t.to_status for t in moved] == [BatchStatus.FINALIZING]
    assert (moved[0].total, moved[0].completed, moved[0].failed) == (2, 1, 1)
    moved = state.apply(BatchFilesReady(batch_id="b", output_file_id="o", error_file_id="e",
                                        lines=2))
    assert [t.to_status for t in moved] == [BatchStatus.COMPLETED]
    assert state.status is BatchStatus.COMPLETED


def test_responses_before_validated_are_counted_then_finalize() -> None:
    state = BatchState(batch_id="b")
    state.count(response("a"))
    state.count(response("b"))
    assert state.status is BatchStatus.VALIDATING
    moved = state.apply(BatchValidated(batch_id="b", total=2))
    assert [t.to_status for t in moved] == [BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING]


def test_validation_failure_is_terminal() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchValidationFailed(batch_id="b", errors=[BatchError(code="c", message="m")]))
    assert state.status is BatchStatus.FAILED
    assert state.apply(BatchValidated(batch_id="b", total=1)) == []
    assert state.status is BatchStatus.FAILED


def test_batch_fields_merge_into_a_valid_batch_object() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchValidated(batch_id="b", total=1, model="m"))
    state.count(response("a"))
    doc = {"id": "b", "endpoint": "/v1/chat/completions", "input_file_id": "f",
           "completion_window": "24h", "status": "validating", "created_at": 1}
    batch = Batch.model_validate({**doc, **state.batch_fields()})
    assert batch.status == "finalizing"
    assert batch.request_counts.completed == 1
    assert batch.in_progress_at is not None and batch.finalizing_at is not None


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(0, 60))
def test_counters_never_exceed_total_nor_decrease(outcomes: list[bool], split: int) -> None:
    state = BatchState(batch_id="b")
    total = len(outcomes)
    previous = 0
    for i, ok in enumerate(outcomes):
        if i == min(split, total - 1):
            state.apply(BatchValidated(batch_id="b", total=total))
        state.count(response(str(i), 200 if ok else 400))
        assert state.done >= previous
        previous = state.done
        assert state.done <= total
    assert state.status is BatchStatus.FINALIZING
    assert state.completed == sum(outcomes)
