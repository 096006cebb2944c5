"""The aggregator's status machine: every path to a final status, fills, finished events,
replays, and the Batch fields it owns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from millrace.lifecycle.state import BatchState, Emitted
from millrace.lifecycle.status import BatchStatus
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
)
from millrace.storage.store import StoredBatch

S = BatchStatus
DOC = {"id": "b", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
       "completion_window": "24h", "status": "validating", "created_at": 1000,
       "expires_at": 2000}


def created(webhook: str | None = None, doc: dict[str, object] | None = None) -> BatchCreated:
    return BatchCreated(batch_id="b", project="p", batch=doc or DOC, listed_at=1000.5,
                        webhook={"url": webhook} if webhook else None,
                        output_expires_after_s=3600)


def progress(completed: int, failed: int = 0) -> BatchProgress:
    return BatchProgress(batch_id="b", completed=completed, failed=failed,
                         input_tokens=3 * completed, output_tokens=5 * completed)


def files(completed: int, failed: int = 0) -> BatchFilesReady:
    return BatchFilesReady(batch_id="b", output_file_id="o" if completed else None,
                           error_file_id="e" if failed else None, lines=completed + failed,
                           completed=completed, failed=failed, input_tokens=3 * completed,
                           output_tokens=5 * completed)


def moves(emitted: list[Emitted]) -> list[str]:
    names = {BatchFillRequested: "fill", BatchFinished: "finished"}
    return [e.to_status.value if isinstance(e, BatchTransition) else names[type(e)]
            for e in emitted]


def run(state: BatchState, *events: BatchEvent) -> list[str]:
    return [m for e in events for m in moves(state.apply(e))]


def test_happy_path_reaches_completed_with_the_files_counts() -> None:
    state = BatchState(batch_id="b")
    assert run(state, created(), BatchValidated(batch_id="b", total=2, model="m")) == [
        "in_progress"]
    assert run(state, progress(1)) == []
    assert run(state, progress(1, 1)) == ["finalizing"]
    emitted = state.apply(files(1, 1))
    assert moves(emitted) == ["completed", "finished"]
    finished = emitted[-1]
    assert isinstance(finished, BatchFinished)
    batch = Batch.model_validate(finished.batch)
    assert batch.status is S.COMPLETED and batch.output_file_id == "o"
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (2, 1, 1)
    assert batch.usage.input_tokens == 3 and batch.usage.total_tokens == 8
    assert batch.completed_at is not None and batch.model == "m"


def test_files_before_the_last_progress_still_finalize_then_complete() -> None:
    state = BatchState(batch_id="b")
    run(state, created(), BatchValidated(batch_id="b", total=2))
    assert run(state, files(2)) == ["finalizing", "completed", "finished"]


def test_lines_done_before_validated_finalize_on_validated() -> None:
    state = BatchState(batch_id="b")
    run(state, created(), progress(2))
    assert state.status is S.VALIDATING
    assert run(state, BatchValidated(batch_id="b", total=2)) == ["in_progress", "finalizing"]


def test_validation_failure_is_final_and_finished() -> None:
    state = BatchState(batch_id="b")
    state.apply(created())
    failed = BatchValidationFailed(batch_id="b", errors=[BatchError(code="c", message="m")])
    assert run(state, failed) == ["failed", "finished"]
    assert run(state, BatchValidated(batch_id="b", total=1), BatchCancelRequested(batch_id="b"),
               failed) == []
    assert state.batch_fields()["errors"]["data"][0]["code"] == "c"


def test_cancel_fills_the_rest_then_cancels_on_files() -> None:
    state = BatchState(batch_id="b")
    run(state, created(), BatchValidated(batch_id="b", total=3), progress(1))
    emitted = state.apply(BatchCancelRequested(batch_id="b"))
    assert moves(emitted) == ["cancelling", "fill"]
    fill = emitted[1]
    assert isinstance(fill, BatchFillRequested)
    assert (fill.code, fill.input_file_id, fill.project) == ("batch_cancelled", "file-1", "p")
    assert run(state, BatchFilled(batch_id="b", total=3), progress(1, 2)) == []
    assert state.status is S.CANCELLING  # files decide
    assert run(state, files(1, 2)) == ["cancelled", "finished"]


def test_cancel_while_validating_fills_once_the_lines_are_known() -> None:
    state = BatchState(batch_id="b")
    state.apply(created())
    assert run(state, BatchCancelRequested(batch_id="b")) == ["cancelling"]
    assert run(state, BatchValidated(batch_id="b", total=4)) == ["fill"]
    assert run(state, BatchValidated(batch_id="b", total=4)) == []  # once


def test_cancel_of_a_batch_that_then_fails_validation_ends_cancelled() -> None:
    state = BatchState(batch_id="b")
    run(state, created(), BatchCancelRequested(batch_id="b"))
    failed = BatchValidationFailed(batch_id="b", errors=[BatchError(code="c", message="m")])
    assert run(state, failed) == ["cancelled", "finished"]


def test_a_stream_batch_is_filled_at_once_its_lines_counted_by_the_fill() -> None:
    state = BatchState(batch_id="b")
    run(state, created(doc={**DOC, "input_file_id": "stream"}), BatchOpened(batch_id="b"))
    assert state.status is S.IN_PROGRESS and state.total is None
    assert run(state, progress(2), BatchCancelRequested(batch_id="b")) == ["cancelling", "fill"]
    assert run(state, BatchFilled(batch_id="b", total=5)) == []
    assert state.total == 5
    assert run(state, files(2, 3)) == ["cancelled", "finished"]


def test_expiry_covers_validating_and_running_batches_only_once_due() -> None:
    for before in ([], [BatchValidated(batch_id="b", total=2)]):
        state = BatchState(batch_id="b")
        run(state, created(), *before)
        assert state.deadline == 2000
        assert run(state, BatchExpireDue(batch_id="b", at=1999)) == []
        expected = ["expired", "fill"] if before else ["expired"]  # file lines unknown yet
        assert run(state, BatchExpireDue(batch_id="b", at=2000)) == expected
        assert state.deadline is None  # nothing more to expire
        assert run(state, BatchExpireDue(batch_id="b", at=3000)) == []


def test_an_expired_batch_gets_its_files_and_finishes_with_their_counts() -> None:
    state = BatchState(batch_id="b")
    run(state, created(), BatchValidated(batch_id="b", total=3), progress(1))
    run(state, BatchExpireDue(batch_id="b", at=2001))
    assert run(state, files(1, 2)) == ["finished"]
    batch = state.batch()
    assert batch is not None and batch.status is S.EXPIRED and batch.settled
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)


def test_a_batch_that_expired_while_validating_fills_when_validated() -> None:
    state = BatchState(batch_id="b")
    run(state, created(), BatchExpireDue(batch_id="b", at=2500))
    assert run(state, BatchValidated(batch_id="b", total=2)) == ["fill"]
    assert state.status is S.EXPIRED


def test_finalizing_and_cancelling_batches_do_not_expire() -> None:
    for events in ([BatchValidated(batch_id="b", total=1), progress(1)],
                   [BatchCancelRequested(batch_id="b")]):
        state = BatchState(batch_id="b")
        run(state, created(), *events)
        assert state.deadline is None
        assert run(state, BatchExpireDue(batch_id="b", at=9999)) == []


def test_finished_names_the_batch_s_own_webhook() -> None:
    state = BatchState(batch_id="b")
    run(state, created(webhook="https://hooks.example.com/x"),
        BatchValidated(batch_id="b", total=1))
    finished = state.apply(files(1))[-1]
    assert isinstance(finished, BatchFinished)
    assert [(t.url, t.source) for t in finished.webhooks] == [
        ("https://hooks.example.com/x", "batch")]


def test_a_state_built_from_the_document_alone_can_expire_fill_and_finish() -> None:
    state = BatchState.from_doc("b", DOC, "p")  # its `created` event never arrived
    assert (state.project, state.input_file_id, state.deadline) == ("p", "file-1", 2000)
    assert run(state, BatchExpireDue(batch_id="b", at=2000)) == ["expired"]
    assert run(state, BatchValidated(batch_id="b", total=1), files(0, 1)) == [
        "fill", "finished"]


EVENTS = [created(), BatchValidated(batch_id="b", total=3), progress(1), progress(2),
          BatchCancelRequested(batch_id="b"), BatchFilled(batch_id="b", total=3), progress(2, 1),
          files(2, 1)]


@given(st.lists(st.integers(min_value=0, max_value=len(EVENTS) - 1), max_size=12))
def test_replaying_events_changes_nothing_and_emits_nothing_new(replays: list[int]) -> None:
    """A crash replays a suffix of what was applied; every event applied twice is a no-op."""
    state = BatchState(batch_id="b")
    first = run(state, *EVENTS)
    assert first == ["in_progress", "cancelling", "fill", "cancelled", "finished"]
    final = state.model_dump_json()
    assert run(state, *(EVENTS[i] for i in replays)) == []
    assert state.model_dump_json() == final


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=20))
def test_counts_never_decrease_whatever_order_progress_arrives_in(
        seen: list[tuple[int, int]]) -> None:
    state = BatchState(batch_id="b")
    run(state, created(), BatchValidated(batch_id="b", total=200))
    last = 0
    for completed, failed in seen:
        state.apply(progress(completed, failed))
        assert state.done >= last
        last = state.done
    assert state.done == max([c + f for c, f in seen], default=0)


def test_the_created_document_is_kept_for_restoring_the_read_model() -> None:
    state = BatchState(batch_id="b")
    state.apply(created())
    restored = state.restorable()
    assert restored is not None
    assert (restored.project, restored.doc, restored.listed_at) == ("p", DOC, 1000.5)


def test_a_created_event_lost_with_the_broker_is_rebuilt_as_the_gateway_kept_it() -> None:
    """Everything died right after a create: the aggregator never saw `created`. The state
    comes from the event the gateway kept with the batch, so the batch's own webhook and
    output expiry are not lost (from the document alone they would be)."""
    kept = created(webhook="https://hooks.example.com/x")  # output expiry 3600 s
    stored = StoredBatch(agg=None, doc=DOC, project="p", created=kept.dumps().decode())
    state = BatchState.restored("b", stored)
    assert state is not None and state.output_expires_after_s == 3600
    run(state, BatchValidated(batch_id="b", total=1))
    finished = state.apply(files(1))[-1]
    assert isinstance(finished, BatchFinished)
    assert [t.url for t in finished.webhooks] == ["https://hooks.example.com/x"]
    alone = BatchState.restored("b", StoredBatch(agg=None, doc=DOC, project="p"))
    assert alone is not None and alone.webhook is None
    saved = BatchState.restored("b", StoredBatch(agg=state.model_dump_json(), doc=DOC,
                                                 project="p", created=None))
    assert saved == state
