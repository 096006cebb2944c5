"""Aggregate state: counting, transitions, seal requests, and the Batch fields it owns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from millrace.protocol import Batch, BatchError
from millrace.records import (
    BatchCancelRequested,
    BatchCreated,
    BatchExpireDue,
    BatchFilesReady,
    BatchSealRequested,
    BatchTransition,
    BatchValidated,
    BatchValidationFailed,
    ResponseRecord,
)
from millrace.status import BatchStatus
from streams.state import BatchState, Emitted

S = BatchStatus


def response(custom_id: str, status: int = 200) -> ResponseRecord:
    return ResponseRecord(batch_id="b", project="p", custom_id=custom_id, id="i",
                          request_id="r", status_code=status, body={})


def moves(emitted: list[Emitted]) -> list[BatchStatus | str]:
    return [e.to_status if isinstance(e, BatchTransition) else "seal" for e in emitted]


def files_ready() -> BatchFilesReady:
    return BatchFilesReady(batch_id="b", output_file_id="o", error_file_id="e", lines=2)


def test_happy_path_reaches_completed() -> None:
    state = BatchState(batch_id="b")
    assert state.apply(BatchCreated(batch_id="b", project="p",
                                    batch={"input_file_id": "f"})) == []
    assert moves(state.apply(BatchValidated(batch_id="b", total=2))) == [S.IN_PROGRESS]
    assert state.count(response("a")) == []
    emitted = state.count(response("b", 500))
    assert moves(emitted) == [S.FINALIZING, "seal"]
    transition, seal = emitted
    assert isinstance(transition, BatchTransition) and isinstance(seal, BatchSealRequested)
    assert (transition.total, transition.completed, transition.failed) == (2, 1, 1)
    assert (seal.total, seal.project, seal.input_file_id) == (2, "p", "f")
    assert moves(state.apply(files_ready())) == [S.COMPLETED]
    assert state.status is S.COMPLETED


def test_responses_before_validated_are_counted_then_finalize() -> None:
    state = BatchState(batch_id="b")
    state.count(response("a"))
    state.count(response("b"))
    assert state.status is S.VALIDATING
    emitted = state.apply(BatchValidated(batch_id="b", total=2))
    assert moves(emitted) == [S.IN_PROGRESS, S.FINALIZING, "seal"]


def test_validation_failure_is_terminal() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchValidationFailed(batch_id="b", errors=[BatchError(code="c", message="m")]))
    assert state.status is S.FAILED
    assert state.apply(BatchValidated(batch_id="b", total=1)) == []
    assert state.apply(BatchCancelRequested(batch_id="b")) == []
    assert state.status is S.FAILED


def test_cancel_waits_for_every_line_then_seals_then_cancels() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchValidated(batch_id="b", total=2))
    state.count(response("a"))
    assert moves(state.apply(BatchCancelRequested(batch_id="b"))) == [S.CANCELLING]
    assert moves(state.count(response("b", 400))) == ["seal"]  # stays cancelling
    assert state.status is S.CANCELLING
    assert moves(state.apply(files_ready())) == [S.CANCELLED]
    assert state.timestamps.keys() >= {"cancelling_at", "cancelled_at"}


def test_cancel_while_validating_keeps_counting_until_all_lines_are_back() -> None:
    state = BatchState(batch_id="b")
    assert moves(state.apply(BatchCancelRequested(batch_id="b"))) == [S.CANCELLING]
    assert state.apply(BatchValidated(batch_id="b", total=1)) == []
    assert moves(state.count(response("a", 400))) == ["seal"]


def test_cancel_of_a_batch_that_then_fails_validation_ends_cancelled() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchCancelRequested(batch_id="b"))
    emitted = state.apply(BatchValidationFailed(batch_id="b", errors=[]))
    assert moves(emitted) == [S.CANCELLED]


def test_expiry_moves_a_running_batch_and_asks_for_a_filling_seal() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchCreated(batch_id="b", project="p",
                             batch={"input_file_id": "f", "expires_at": 1}))
    assert state.apply(BatchExpireDue(batch_id="b")) == []  # validating: not yet
    state.apply(BatchValidated(batch_id="b", total=3))
    state.count(response("a"))
    assert state.due
    emitted = state.apply(BatchExpireDue(batch_id="b"))
    assert moves(emitted) == [S.EXPIRED, "seal"]
    seal = emitted[1]
    assert isinstance(seal, BatchSealRequested)
    assert (seal.fill, seal.done, seal.total) == ("batch_expired", 1, 3)
    assert state.count(response("b")) == []  # late results no longer count
    assert state.completed == 1
    assert state.apply(BatchFilesReady(batch_id="b", output_file_id="o", error_file_id="e",
                                       lines=3, completed=2, failed=1)) == []
    assert (state.status, state.completed, state.failed) == (S.EXPIRED, 2, 1)
    assert state.output_file_id == "o" and "expired_at" in state.timestamps


def test_a_batch_within_its_window_is_not_due() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchCreated(batch_id="b", project="p",
                             batch={"expires_at": 4_000_000_000}))
    state.apply(BatchValidated(batch_id="b", total=1))
    assert not state.due
    assert state.apply(BatchExpireDue(batch_id="b")) == []


def test_seal_is_requested_once() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchValidated(batch_id="b", total=1))
    assert "seal" in moves(state.count(response("a")))
    assert state.advance() == []


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
    assert state.status is S.FINALIZING
    assert state.completed == sum(outcomes)


def numbered(line: int, status: int = 200) -> ResponseRecord:
    return ResponseRecord(batch_id="b", project="p", custom_id=f"c{line}", id="i",
                          request_id="r", status_code=status, body={}, line=line)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=200), st.integers(1, 199),
       st.booleans())
def test_redelivered_responses_are_counted_once_even_across_a_restore(
        deliveries: list[int], cut: int, with_lines: bool) -> None:
    """Any order and number of redeliveries, with the state saved and restored (as after a
    crash) at any point: each line counts once."""
    def record(line: int) -> ResponseRecord:
        return numbered(line, 200 if line % 3 else 500) if with_lines else response(
            f"c{line}", 200 if line % 3 else 500)

    state = BatchState(batch_id="b")
    state.apply(BatchValidated(batch_id="b", total=40))
    state.count_new(record(n) for n in deliveries[:cut])
    state = BatchState.model_validate(state.model_dump(mode="json"))  # the table round trip
    state.count_new(record(n) for n in deliveries[cut:])
    distinct = set(deliveries)
    assert state.done == len(distinct)
    assert state.failed == sum(1 for n in distinct if n % 3 == 0)


def test_the_counted_index_is_dropped_once_nothing_counts_any_more() -> None:
    state = BatchState(batch_id="b")
    state.apply(BatchValidated(batch_id="b", total=2))
    state.count_new([numbered(1), numbered(2)])
    state.apply(files_ready())
    assert state.status is S.COMPLETED
    state.count_new([numbered(1)])
    assert (state.counted, state.counted_ids, state.completed) == ("", [], 2)


def test_the_created_document_is_kept_for_restoring_the_read_model() -> None:
    state = BatchState(batch_id="b")
    assert state.restorable() is None  # nothing to restore before `created`
    doc = {"id": "b", "object": "batch", "endpoint": "/v1/chat/completions",
           "input_file_id": "f", "completion_window": "24h", "status": "validating",
           "created_at": 7, "metadata": {"k": "v"}}
    state.apply(BatchCreated(batch_id="b", project="p", batch=doc,
                             webhook={"url": "http://127.0.0.1/h"}, listed_at=7.25))
    state.apply(BatchValidated(batch_id="b", total=1))
    state.count_new([numbered(0)])
    state.apply(files_ready())
    saved = BatchState.model_validate_json(state.model_dump_json())  # the changelog record
    restored = saved.restorable()
    assert restored is not None
    assert (restored.project, restored.listed_at, restored.webhook) == (
        "p", 7.25, {"url": "http://127.0.0.1/h"})
    batch = Batch.model_validate({**restored.doc, **saved.batch_fields()})
    assert batch.status == "completed" and batch.metadata == {"k": "v"}
    assert batch.request_counts.completed == 1 and batch.output_file_id == "o"
    assert batch.settled
