"""Every record carries a version and tolerates fields a newer writer added."""

from __future__ import annotations

from millrace.records import (
    RequestRecord,
)


def test_newer_records_with_extra_fields_still_parse() -> None:
    record = RequestRecord.model_validate_json(
        b'{"v": 2, "batch_id": "b", "project": "p", "custom_id": "c", "line": 1,'
        b' "url": "/v1/completions", "body": {}, "added_later": true}'
    )
    assert record.v == 2
