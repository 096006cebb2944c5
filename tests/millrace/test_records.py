"""Wire records round-trip, carry a version, and reject what they should."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from millrace.protocol import BatchError, OutputLine, RequestLine
from millrace.records import (
    BatchCancelRequested,
    BatchCreated,
    BatchFilesReady,
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchProgress,
    BatchRedriveRequested,
    BatchTransition,
    BatchValidated,
    BatchValidationFailed,
    RequestRecord,
    ResponseRecord,
    Usage,
    WebhookTarget,
    parse_event,
)
from millrace.status import BatchStatus

text = st.text(min_size=1, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=10,
)


@given(batch_id=text, custom_id=text, line=st.integers(1, 50_000),
       body=st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_request_record_round_trips(batch_id: str, custom_id: str, line: int,
                                    body: dict[str, object]) -> None:
    record = RequestRecord(batch_id=batch_id, project="p", custom_id=custom_id, line=line,
                           url="/v1/chat/completions", body=body)
    again = RequestRecord.model_validate_json(record.dumps())
    assert again == record
    assert again.v == 1


def test_response_record_round_trips_and_knows_success() -> None:
    ok = ResponseRecord(batch_id="b", project="p", custom_id="c", id="i", request_id="r",
                        status_code=200, body={"x": 1}, usage=Usage(prompt_tokens=3))
    assert ResponseRecord.model_validate_json(ok.dumps()) == ok
    assert ok.ok
    failed = ok.model_copy(update={"status_code": 400})
    assert not failed.ok


def test_events_parse_by_type() -> None:
    events = [
        BatchCreated(batch_id="b", project="p", batch={"id": "b"}),
        BatchValidated(batch_id="b", total=3, model="m"),
        BatchValidationFailed(batch_id="b", errors=[BatchError(code="x", message="y", line=1)]),
        BatchTransition(batch_id="b", project="p", from_status=BatchStatus.IN_PROGRESS,
                        to_status=BatchStatus.FINALIZING, total=3, completed=2, failed=1),
        BatchFilesReady(batch_id="b", output_file_id="f", error_file_id=None, lines=3),
        BatchCancelRequested(batch_id="b"),
        BatchProgress(batch_id="b", completed=2, failed=1, input_tokens=7, output_tokens=9),
        BatchFillRequested(batch_id="b", project="p", code="batch_expired", input_file_id="f"),
        BatchRedriveRequested(batch_id="b", project="p", input_file_id="stream"),
        BatchFilled(batch_id="b", total=3),
        BatchFinished(batch_id="b", project="p", status=BatchStatus.COMPLETED,
                      batch={"id": "b", "status": "completed"},
                      webhooks=[WebhookTarget(url="https://x.example/h", source="batch")]),
    ]
    for event in events:
        assert parse_event(event.dumps()) == event


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(ValidationError):
        parse_event(b'{"v": 1, "batch_id": "b", "type": "exploded"}')


def test_newer_records_with_extra_fields_still_parse() -> None:
    record = RequestRecord.model_validate_json(
        b'{"v": 2, "batch_id": "b", "project": "p", "custom_id": "c", "line": 1,'
        b' "url": "/v1/completions", "body": {}, "added_later": true}'
    )
    assert record.v == 2


def test_request_line_and_output_line_are_strict() -> None:
    with pytest.raises(ValidationError):
        RequestLine.model_validate({"custom_id": "a", "method": "GET", "url": "/v1/x", "body": {}})
    with pytest.raises(ValidationError):
        OutputLine.model_validate({"id": "x", "custom_id": "a", "response": None, "error": None,
                                   "extra": 1})
