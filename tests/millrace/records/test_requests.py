"""`<prefix>.requests` records round-trip, and the worker's fast view of one is the record."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from millrace.records import (
    QueuedRequest,
    RequestRecord,
    read_request,
)

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


def test_the_worker_s_view_of_a_request_is_the_request_record() -> None:
    """`QueuedRequest` mirrors `RequestRecord` for msgspec: the same fields, the same
    defaults, so a record read either way is the same request."""
    assert set(QueuedRequest.__struct_fields__) == set(RequestRecord.model_fields) - {"v"}
    record = RequestRecord(batch_id="b", project="p", custom_id="c", line=4, url="/v1/x",
                           body={"model": "m", "n": [1, 2.5, None]}, reply=True)
    seen = read_request(record.dumps())
    assert {name: getattr(seen, name) for name in QueuedRequest.__struct_fields__} == (
        record.model_dump(exclude={"v"}))
