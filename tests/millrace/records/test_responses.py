"""`<prefix>.responses` records: round trips, the sink's and the worker's fast views of one,
and what a line counts for in its batch's usage."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from millrace.protocol import LineError, LineResponse, OutputLine
from millrace.records import (
    RequestRecord,
    ResponseRecord,
    SpooledResponse,
    Tokens,
    Usage,
    body_tokens,
    read_request,
    read_response,
    response_value,
    usage_of,
)


def test_response_record_round_trips_and_knows_success() -> None:
    ok = ResponseRecord(batch_id="b", project="p", custom_id="c", id="i", request_id="r",
                        status_code=200, body={"x": 1}, usage=Usage(prompt_tokens=3))
    assert ResponseRecord.model_validate_json(ok.dumps()) == ok
    assert ok.ok
    failed = ok.model_copy(update={"status_code": 400})
    assert not failed.ok


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)


@given(
    status=st.sampled_from([200, 400, 500, None]),
    body=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    usage=st.none() | st.fixed_dictionaries({"prompt_tokens": st.integers(0, 99),
                                             "completion_tokens": st.integers(0, 99)}),
    error=st.none() | st.builds(LineError, code=st.text(max_size=6), message=st.text(max_size=9)),
    request_id=st.none() | st.text(max_size=6),
)
def test_the_sink_writes_a_response_record_as_the_openai_output_line(
    status: int | None, body: dict[str, object] | None, usage: dict[str, int] | None,
    error: LineError | None, request_id: str | None,
) -> None:
    """The sink copies body and error bytes instead of building them: the line it writes
    is the one `OutputLine` would serialise, and it counts the body's usage."""
    if body is not None and usage is not None:
        body = {**body, "usage": usage}
    record = ResponseRecord(batch_id="batch_1", project="p", custom_id="c", line=3, id="i",
                            request_id=request_id, status_code=status, body=body, error=error)
    seen = read_response(record.dumps())
    response = (LineResponse(status_code=status, request_id=request_id or "", body=body)
                if status is not None and body is not None else None)
    expected = OutputLine(id="i", custom_id="c", response=response, error=error)
    assert seen.output_line() == expected.model_dump_json().encode()
    assert seen.ok == record.ok
    assert seen.tokens() == (usage_of(body) if response is not None else Tokens())


def test_the_sink_s_view_of_a_response_requires_what_the_record_requires() -> None:
    required = {name for name, f in ResponseRecord.model_fields.items() if f.is_required()}
    viewed = set(SpooledResponse.__struct_fields__)
    assert viewed <= set(ResponseRecord.model_fields)
    assert required <= viewed
    for missing in sorted(required):
        value = ResponseRecord(batch_id="b", project="p", custom_id="c", id="i",
                               request_id=None, status_code=None, body=None).model_dump()
        del value[missing]
        with pytest.raises(msgspec.ValidationError):
            read_response(msgspec.json.encode(value))


@given(
    status=st.sampled_from([200, 400, None]),
    body=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    error=st.none() | st.builds(LineError, code=st.text(max_size=6), message=st.text(max_size=9)),
    usage=st.builds(Usage, prompt_tokens=st.integers(0, 999),
                    completion_tokens=st.integers(0, 999)),
    timings=st.tuples(st.none() | st.floats(0, 1e6), st.none() | st.floats(0, 1e6)),
    reply=st.booleans(),
)
def test_a_worker_s_response_value_is_the_response_record(
    status: int | None, body: dict[str, object] | None, error: LineError | None,
    usage: Usage, timings: tuple[float | None, float | None], reply: bool,
) -> None:
    """Workers encode responses without building the pydantic model: same fields, same
    order, same values as `ResponseRecord(...).dumps()` for the request they read."""
    request = read_request(RequestRecord(
        batch_id="batch_1", project="p", custom_id="c", line=7, url="/v1/chat/completions",
        body={"model": "m"}, reply=reply).dumps())
    value = response_value(request, id="batch_req_1", request_id=None if status is None else "r",
                           status_code=status,
                           body=None if body is None else msgspec.json.encode(body),
                           tokens=Tokens(usage.prompt_tokens, usage.completion_tokens),
                           error=error, worker="w", engine_ms=timings[0], queue_ms=timings[1])
    seen = ResponseRecord.model_validate_json(value)
    expected = ResponseRecord(
        batch_id="batch_1", project="p", custom_id="c", line=7, id="batch_req_1",
        request_id=None if status is None else "r", status_code=status, body=body, usage=usage,
        error=error, worker="w", engine_ms=timings[0], queue_ms=timings[1], reply=reply,
        finished_at=seen.finished_at)
    assert value == expected.dumps()
    assert seen == expected


def test_usage_in_an_unusual_shape_is_still_counted() -> None:
    record = ResponseRecord(batch_id="b", project="p", custom_id="c", id="i", request_id="r",
                            status_code=200, body={"usage": {"prompt_tokens": 2.0,
                                                             "completion_tokens": "3"}})
    assert read_response(record.dumps()).tokens() == (2, 3, 0, 0)


@pytest.mark.parametrize(("usage", "tokens"), [
    # chat and completions (vLLM with --enable-prompt-tokens-details)
    ({"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47,
      "prompt_tokens_details": {"cached_tokens": 32}, "completion_tokens_details": None},
     Tokens(40, 7, 32, 0)),
    # Responses
    ({"input_tokens": 37, "input_tokens_details": {"cached_tokens": 16},
      "output_tokens": 8, "output_tokens_details": {"reasoning_tokens": 3},
      "total_tokens": 45}, Tokens(37, 8, 16, 3)),
    # embeddings, score, pooling
    ({"prompt_tokens": 11, "total_tokens": 11}, Tokens(11)),
    ({"prompt_tokens": "x"}, Tokens()),
])
def test_every_endpoint_s_usage_counts(usage: dict[str, object], tokens: Tokens) -> None:
    body = msgspec.json.encode({"id": "x", "usage": usage})
    assert body_tokens(body) == tokens
    assert usage_of({"usage": usage}) == tokens
